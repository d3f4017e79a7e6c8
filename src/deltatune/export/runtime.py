"""Running an exported model with ONNX Runtime: a session, a model-like shim, greedy generation.

:class:`OrtModel` lets a task's own ``evaluate`` score an ONNX file: the task calls
``run(model, batch).logits`` on a torch batch, and the shim feeds that batch (completed by the
spec: a decoder's positions and empty past) to the session. So the accuracy after int8
quantization is computed by exactly the code that computed it in training.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltatune.export.spec import OnnxSpec


def need_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("ONNX export needs onnx and onnxruntime: pip install 'deltatune[export]'") from None
    return onnxruntime


def session(path: Path, threads: int | None = None, spin: bool = True) -> Any:
    """An ONNX Runtime CPU session on ``path``, with ``threads`` intra-op threads (default: torch's).

    ``spin=False``: idle pool threads sleep instead of spinning (ORT's default spins for a while
    after each run, which takes the cores from anything else running beside it, e.g. PyTorch
    in a side-by-side benchmark)."""
    ort = need_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess: Any, feed: dict[str, Tensor]) -> list[Tensor]:
    """The session's outputs (as torch tensors) for a feed of torch tensors (ints as int64)."""
    wanted = {i.name for i in sess.get_inputs()}
    arrays = {k: _array(v) for k, v in feed.items() if k in wanted}
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, arrays)]


def _array(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.long().numpy() if not t.is_floating_point() else t.float().numpy()


class OrtModel:
    """Looks enough like the torch model for a task's ``evaluate``: ``model(**batch).logits`` and ``model.config``."""

    def __init__(self, sess: Any, spec: OnnxSpec, config: Any) -> None:
        self.sess, self.spec, self.config = sess, spec, config

    def __call__(self, **batch: Tensor) -> SimpleNamespace:
        feed = self.spec.complete(batch) if self.spec.complete else batch
        return SimpleNamespace(logits=run_session(self.sess, feed)[0])


def run_ort(model: OrtModel, batch: dict[str, Tensor]) -> SimpleNamespace:
    """The ``run(model, batch)`` a task's ``evaluate`` takes, for an :class:`OrtModel`."""
    return model(**batch)


def generate(sess: Any, prompt: list[int], past_names: list[str], cache: tuple[int, int],
             max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Greedy decoding with an exported decoder step: the prompt once, then one token per step."""
    heads, head_dim = cache
    past = {name: torch.zeros(1, heads, 0, head_dim) for name in past_names}
    ids, total, out = torch.tensor([prompt]), len(prompt), []
    for _ in range(max_new_tokens):
        mask = torch.ones(1, total, dtype=torch.long)                          # (1, P + T)
        step = torch.arange(total - ids.shape[1], total).unsqueeze(0)          # (1, T)
        logits, *present = run_session(sess, {"input_ids": ids, "attention_mask": mask, "position_ids": step, **past})
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos_token_id:
            break
        past = dict(zip(past_names, present))
        ids, total = torch.tensor([[token]]), total + 1
    return out


@torch.no_grad()
def check_generation(sess: Any, model: nn.Module, tokenizer: Any, prompts: list[list[int]],
                     past_names: list[str], cache: tuple[int, int], new_tokens: int = 16) -> dict[str, Any]:
    """Greedy replies from ONNX Runtime (with its KV cache) against ``model.generate``'s, token for token."""
    same, replies = 0, []
    for prompt in prompts:
        ours = generate(sess, prompt, past_names, cache, new_tokens, tokenizer.eos_token_id)
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
        same += ours == ref
        replies.append(tokenizer.decode(ours, skip_special_tokens=True).strip())
    return {"greedy_generation_equal": f"{same} of {len(prompts)} prompts ({new_tokens} new tokens)",
            "greedy_generation_all_equal": same == len(prompts), "onnx_replies": replies}


def file_bytes(path: Path) -> int:
    """Size of an ONNX model with its external data files, if any."""
    extra = [p for p in path.parent.glob(path.name + ".data")]
    return os.path.getsize(path) + sum(os.path.getsize(p) for p in extra)
