"""PEFT table entries for the virtual-token methods: prompt tuning, P-tuning, prefix tuning.

PEFT saves these as one tensor, ``prompt_embeddings``, outside any module, holding what the
adapter feeds the model: the N virtual token embeddings (prompt tuning and P-tuning, whose saved
tensor is its prompt encoder's *output*), or the N prefixes of every layer's keys and values
flattened ``(N, L·2·H·D)`` (prefix tuning, after its MLP when it has one). So:

- a PEFT P_TUNING file reads as deltatune prompt tuning, and a PREFIX_TUNING file with
  ``prefix_projection`` as a plain prefix; both give PEFT's outputs exactly;
- writing P-tuning or a reparameterised prefix first computes the tokens or prefixes the
  encoder produces (PEFT's form; deltatune's ``drop_reparameterization`` does the same), so
  P-tuning is written as PROMPT_TUNING.

deltatune keeps the tensor on the model's input embedding; reading a file therefore needs the
model to name that module. PEFT applies these adapters only through its task-specific model
classes, so ``task_type`` is required when writing.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.core.contract import ReparameterizedConfig
from deltatune.formats.peft_spec import Field, Meta, PeftMethod, Site, Tensors, cast

INT = (cast(int), cast(int))
PROMPT_COMMON = dict(
    tensors={"*": {}},
    targeting=frozenset(),
    unsupported={"num_transformer_submodules": 1},
    ignored=frozenset({"token_dim", "num_attention_heads", "num_layers"}),  # read from the model
    saved_prefix="base_model.",
    needs_task=True,
)


def _materialize(meta: Meta, tensors: Tensors) -> tuple[Meta, Tensors]:
    """Replace a trained reparameterisation by what it outputs (``drop_reparameterization`` on files)."""
    from deltatune.methods import config_from_dict

    config = config_from_dict(dict(meta["config"]))
    if not (isinstance(config, ReparameterizedConfig) and config.reparameterized):
        return meta, tensors
    (module,) = meta["targets"]
    own = {k[len(module) + 1:]: t for k, t in tensors.items() if k.startswith(module + ".")}
    adapter = _rebuild(config, own)
    adapter.load_state_dict(own)
    plain = adapter.eval().materialized()
    out = {k: t for k, t in tensors.items() if not k.startswith(module + ".")}
    out.update({f"{module}.{k}": t.detach().contiguous() for k, t in plain.state_dict().items()})
    return {**meta, "config": config.materialized().to_dict()}, out


def _rebuild(config: Any, own: Tensors) -> nn.Module:
    """The adapter module of ``config`` at the shapes of its saved tensors (no base model needed)."""
    if config.method == "ptuning":
        from deltatune.methods.ptuning import PromptEncoder

        n, dim = own["embedding"].shape
        return PromptEncoder(n, dim, config.encoder_hidden_size or dim, config.encoder,
                             config.encoder_num_layers, config.encoder_dropout)
    from deltatune.methods.prefix import PrefixKV

    adapter = PrefixKV(config.num_virtual_tokens, config.projection_dim)
    adapter.setup(*config.layout)
    return adapter


def _token_dim(head_dim: int | None, site: Site) -> int | None:
    heads = site.config.get("num_kv_heads")
    return None if head_dim is None or heads is None else head_dim * heads


def _head_dim(token_dim: int | None, site: Site) -> int | None:
    heads = site.config.get("num_attention_heads")  # PEFT counts the key/value heads here
    return None if token_dim is None or not heads else token_dim // heads


PROMPT_METHODS: dict[str, PeftMethod] = {
    "prompt": PeftMethod(
        peft_type="PROMPT_TUNING",
        fields={"num_virtual_tokens": Field("num_virtual_tokens", None, *INT)},
        model_keys={"prompt": "prompt_embeddings"},
        init_only=frozenset({"init", "init_text", "init_token_ids", "tokenizer"}),
        passthrough=frozenset({"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                               "tokenizer_kwargs"}),
        **PROMPT_COMMON,
    ),
    "ptuning": PeftMethod(
        peft_type="P_TUNING",
        fields={"num_virtual_tokens": Field("num_virtual_tokens", None, *INT),
                "encoder": Field("encoder_reparameterization_type", "MLP", lambda v, s: v.upper(),
                                 lambda v, s: str(v).lower()),
                "encoder_hidden_size": Field("encoder_hidden_size", None, *INT),
                "encoder_num_layers": Field("encoder_num_layers", 2, *INT),
                "encoder_dropout": Field("encoder_dropout", 0.0, cast(float), cast(float))},
        model_keys={"embedding": "prompt_embeddings"},  # never written: P-tuning is written materialized
        reads_materialized=True,
        export=_materialize,
        **PROMPT_COMMON,
    ),
    "prefix": PeftMethod(
        peft_type="PREFIX_TUNING",
        fields={"num_virtual_tokens": Field("num_virtual_tokens", None, *INT),
                "projection_dim": Field("encoder_hidden_size", None, *INT),
                "num_layers": Field("num_layers", None, *INT),
                "num_kv_heads": Field("num_attention_heads", None, *INT),
                "head_dim": Field("token_dim", None, _token_dim, _head_dim)},
        model_keys={"prefix": "prompt_embeddings"},
        writes={"prefix_projection": False},
        reads_materialized=True,
        export=_materialize,
        **{**PROMPT_COMMON, "ignored": frozenset({"prefix_projection", "init_weights"})},
    ),
}
