"""One ONNX spec per kind of task: which inputs and outputs, which axes vary, how to check it.

``SPECS`` maps a task's ``kind`` to the function building its :class:`~deltatune.export.spec.OnnxSpec`
from a loaded (and merged) model; ``GGUF_KINDS`` says which kinds llama.cpp can run. Adding a
task kind to the exporter is one function and one line here.

- ``classification``, text (encoders): ``input_ids``, ``attention_mask`` (batch, sequence) ->
  ``logits`` (batch, labels). The tokenizer and label names are written beside the model.
- ``classification``, images (the task's batches hold ``pixel_values`` only): ``pixel_values``
  (batch, 3, size, size) -> ``logits``; ``preprocessing.json`` (size, mean, std, labels) beside it.
- ``causal-lm`` (decoders), one step with a KV cache, as ONNX Runtime GenAI and Optimum lay it out:
  ``input_ids``, ``position_ids`` (batch, sequence), ``attention_mask`` (batch, past + sequence),
  ``past_key_values.{i}.key|value`` (batch, kv heads, past, head dim) -> ``logits`` (batch,
  sequence, vocab), ``present.{i}.key|value`` (batch, kv heads, past + sequence, head dim). The
  first step takes a past of length 0; :func:`deltatune.export.runtime.generate` loops it.
- ``recommendation`` (SASRec): ``input_ids`` (batch, history) item rows, left-padded with 0 -> ``scores``
  (batch, 1 + items), the padding row at -inf; the item names are ``labels`` in export.json.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.export.spec import OnnxSpec, dims

_PROBE = ["deltatune exports the merged model.", "What a lovely day!", "I did not like it at all, sadly.",
          "ok", "The weather is terrible today and the trains are late again.", "Thanks!"]


# --- encoders: text classification ----------------------------------------------------------------

class _Logits(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the classifier without transformers' output object."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, C)


class _ImageLogits(nn.Module):
    """``pixel_values -> logits`` for an image classifier (``model(pixel_values=...).logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits  # (B, 3, H, W) -> (B, C)


def classifier_spec(task: Any, model: nn.Module, tokenizer: Any, labels: list[str] | None, config: Any,
                    examples: list[tuple]) -> OnnxSpec:
    """A classifier: text (token ids) or images (``pixel_values``), as the task's own ``collate`` batches them."""
    items = task.encode(tokenizer, examples[:8], config.max_length) if examples else []
    if items and set(_collate(task, items[:1], tokenizer)) == {"pixel_values"}:
        spec = image_spec(task, model, tokenizer, labels, items)
        spec.calibrate = lambda some: [_collate(task, [item], tokenizer)
                                       for item in task.encode(tokenizer, some, config.max_length)]
        return spec
    return encoder_spec(model, tokenizer, labels, config, examples)


def _collate(task: Any, items: list, tokenizer: Any) -> dict[str, Tensor]:
    try:
        batch = task.collate(items, tokenizer, augment=False)  # an image task: no flips or shifts
    except TypeError:
        batch = task.collate(items, tokenizer)
    batch.pop("labels", None)
    return batch


def image_spec(task: Any, model: nn.Module, preprocess: Any, labels: list[str] | None, items: list) -> OnnxSpec:
    """An image classifier: ``pixel_values`` (batch, 3, size, size), normalised as ``preprocessing.json`` says."""
    def batch(some: list) -> dict[str, Tensor]:
        return _collate(task, some, preprocess)

    return OnnxSpec(
        kind="image-classification", module=_ImageLogits(model).eval(),
        inputs=["pixel_values"], outputs=["logits"],
        dynamic={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        sample=batch(items[:2]), checks=[batch(items[:1]), batch(items[2:5] or items[:1]), batch(items)],
        write_beside=lambda where: preprocess.save_pretrained(where),
        meta={"labels": labels,
              "inputs": "pixel_values float32 (batch, 3, size, size): RGB resized and normalised as "
                        "preprocessing.json says",
              "outputs": "logits (batch, labels); the label is labels[argmax]"},
    )


def encoder_spec(model: nn.Module, tokenizer: Any, labels: list[str] | None, config: Any,
                 examples: list[tuple]) -> OnnxSpec:
    """A text sequence classifier; ``examples``: (text, label) from the test split, to trace and check with."""
    texts = [str(ex[0]) for ex in examples if str(ex[0]).strip()][:8] + _PROBE
    texts.sort(key=len)

    def encode(batch: list[str]) -> dict[str, Tensor]:
        e = tokenizer(batch, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}  # (B, T) each

    axes = {0: "batch", 1: "sequence"}
    return OnnxSpec(
        kind="classification", module=_Logits(model).eval(),
        inputs=["input_ids", "attention_mask"], outputs=["logits"],
        dynamic={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
        sample=encode([texts[0], texts[-1]]),          # two lengths: padding in the traced batch
        checks=[encode(texts[:1]), encode(texts[-1:]), encode(texts[1:4]), encode(texts)],
        write_beside=lambda where: tokenizer.save_pretrained(where),
        meta={"labels": labels, "max_length": config.max_length,
              "inputs": "tokenizer(texts, padding=True, truncation=True, max_length=max_length): "
                        "input_ids and attention_mask as int64",
              "outputs": "logits (batch, labels); the label is labels[argmax]"},
    )


# --- decoders: one step with a KV cache ---------------------------------------------------------------

def cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers decoder."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


class _DecoderStep(nn.Module):
    """``(input_ids, attention_mask, position_ids, past) -> (logits, *present)``.

    ``past``: 2·layers tensors (key, value of layer 0, then layer 1, ...), each (B, H_kv, P, D);
    they fill a ``DynamicCache`` exactly as ``generate`` fills it, and the model appends this step's
    keys and values, which come back as ``present`` (B, H_kv, P + T, D).
    """

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past: list[Tensor]) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def positions(attention_mask: Tensor, new: int) -> Tensor:
    """Position ids of the last ``new`` tokens: their index among the real (unpadded) tokens."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -new:]  # (B, T)


def decoder_spec(task: Any, model: nn.Module, tokenizer: Any, labels: list[str] | None, config: Any,
                 examples: list[tuple]) -> OnnxSpec:
    """A causal LM, one step with a KV cache; ``examples``: (prompt, reply) from the test split."""
    from deltatune.export.runtime import check_generation
    from deltatune.train.chat import encode_pair

    prompts = [encode_pair(tokenizer, str(ex[0]), None)[0][:48] for ex in examples[:4]]  # short: a document may be long

    layers, heads, head_dim = cache_shape(model)
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [p for p in prompts if p][:4] or [tokenizer("Hello, how are you?")["input_ids"]]
    gen = torch.Generator().manual_seed(0)

    def feed(ids: list[list[int]], past: int) -> dict[str, Tensor]:
        """Left-padded token ids after ``past`` cached positions (random keys and values)."""
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids])                 # (B, T)
        mask = torch.tensor([[1] * past + [0] * (width - len(r)) + [1] * len(r) for r in ids])  # (B, P+T)
        out = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions(mask, width)}
        for name in past_names:
            out[name] = torch.randn(len(ids), heads, past, head_dim, generator=gen)            # (B, H_kv, P, D)
        return out

    def complete(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A task batch (input_ids, attention_mask) as a first step: positions and an empty past."""
        mask = batch["attention_mask"]
        empty = torch.zeros(mask.shape[0], heads, 0, head_dim)
        return {**batch, "position_ids": positions(mask, batch["input_ids"].shape[1]),
                **{name: empty for name in past_names}}

    def compare(inputs: dict[str, Tensor], outputs: list[Tensor]) -> list[Tensor]:
        """Logits of real tokens, and cached keys/values at real positions: a padded query attends to
        nothing, so what it computes (and what later layers cache for it) is arbitrary in both."""
        real = inputs["attention_mask"].bool()                                        # (B, P+T)
        new = real[:, -inputs["input_ids"].shape[1]:]                                 # (B, T)
        return [outputs[0][new], *(t.transpose(1, 2)[real] for t in outputs[1:])]

    axes = {0: "batch", 1: "sequence"}
    past_axes = {0: "batch", 2: "past"}
    dynamic = {"input_ids": axes, "position_ids": axes, "attention_mask": {0: "batch", 1: "total"},
               **{name: past_axes for name in past_names}, "logits": axes,
               **{name: {0: "batch", 2: "total"} for name in present_names}}
    few = [p[:6] for p in prompts]
    return OnnxSpec(
        kind="causal-lm", module=_DecoderStep(model, layers).eval(),
        inputs=["input_ids", "attention_mask", "position_ids", *past_names], outputs=["logits", *present_names],
        dynamic=dynamic,
        sample=feed([[5, 6, 7], [8, 9]], past=3),
        checks=[feed(few[:1], 0), feed(few, 0), feed([p[:1] for p in few], 4)],
        pack=lambda f: (f["input_ids"], f["attention_mask"], f["position_ids"], [f[n] for n in past_names]),
        dynamic_shapes={"input_ids": dims(axes), "attention_mask": dims({0: "batch", 1: "total"}),
                        "position_ids": dims(axes), "past": [dims(past_axes) for _ in past_names]},
        compare=compare, complete=complete,
        verify=lambda session: check_generation(session, model, tokenizer, prompts[:2], past_names, (heads, head_dim)),
        write_beside=lambda where: tokenizer.save_pretrained(where),
        meta={"layers": layers, "kv_heads": heads, "head_dim": head_dim,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad,
              "inputs": "input_ids, position_ids (batch, sequence); attention_mask (batch, past + sequence); "
                        "past_key_values.{i}.key|value (batch, kv_heads, past, head_dim), past = 0 at the first step",
              "outputs": "logits (batch, sequence, vocab); present.{i}.key|value: the next step's past"},
    )


# --- recommenders: a history of items -> a score for every item ---------------------------------------

class _Scores(nn.Module):
    """``input_ids -> scores``: the recommender's scores after the last item of each history."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids).logits  # (B, T) item rows -> (B, items)


def recommender_spec(task: Any, model: nn.Module, tokenizer: Any, labels: list[str] | None, config: Any,
                     examples: list[tuple]) -> OnnxSpec:
    """A sequential recommender (SASRec): item rows (batch, history), left-padded with 0, -> a score for
    every item row (batch, items), row 0 (padding) at -inf; ``examples``: test (user, history, target)."""
    from deltatune.train.sasrec import collate

    histories = [it["input_ids"] for it in task.encode(tokenizer, examples[:8], config.max_length) if it["input_ids"]]
    histories = histories or [[1, 2, 3], [4, 5]]
    longest = getattr(getattr(model, "spec", None), "max_len", config.max_length)

    def feed(rows: list[list[int]]) -> dict[str, Tensor]:
        return {"input_ids": collate([(r, [-100] * len(r)) for r in rows], max_len=longest)["input_ids"]}

    def finite(inputs: dict[str, Tensor], outputs: list[Tensor]) -> list[Tensor]:
        return [outputs[0][:, 1:]]  # the padding row is -inf in both

    batch, history = torch.export.Dim("batch"), torch.export.Dim("history", max=longest)
    short = [h[-3:] for h in histories]
    return OnnxSpec(
        kind="recommendation", module=_Scores(model).eval(),
        inputs=["input_ids"], outputs=["scores"],
        dynamic={"input_ids": {0: "batch", 1: "history"}, "scores": {0: "batch"}},
        dynamic_shapes=({0: batch, 1: history},),
        sample=feed([short[0], short[-1][:2] or [1, 2]]),
        checks=[feed(histories[:1]), feed(histories), feed([h[-1:] for h in histories[:3]])],
        compare=finite,
        meta={"labels": labels, "max_length": longest,
              "inputs": "input_ids int64 (batch, history): each history's item rows, oldest first, left-padded "
                        "with 0, at most max_length; the item labels[j - 1] is row j",
              "outputs": "scores (batch, 1 + items): row 0 (padding) is -inf; recommend the top rows not in "
                         "the history"},
    )


Builder = Callable[..., OnnxSpec]
#: task kind -> spec builder (see the module docstring); the kinds ``deltatune export`` accepts.
SPECS: dict[str, Builder] = {
    "classification": classifier_spec,
    "causal-lm": decoder_spec,
    "recommendation": recommender_spec,
}
#: task kinds whose adapters llama.cpp can run (decoders it has an architecture for).
GGUF_KINDS = ("causal-lm",)


def spec_for(kind: str) -> Builder:
    if kind not in SPECS:
        raise ValueError(f"ONNX export knows task kinds {', '.join(SPECS)}; this run's task is a {kind!r}")
    return SPECS[kind]


