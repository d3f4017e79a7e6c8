"""The PEFT translation table: one :class:`~deltatune.formats.peft_spec.PeftMethod` entry per
deltatune method, keyed by the method's registry name.

An entry says which PEFT ``peft_type`` the method is, how its config fields are named (with PEFT's
defaults, used when a file omits a field), and how each adapter tensor is named and shaped in
PEFT's file for each kind of base layer. Adding a method's conversion is one entry in
:data:`PEFT_METHODS`; ``peft_translate.py`` and ``peft.py`` do the rest. The virtual-token
methods (prompt tuning, P-tuning, prefix tuning) are in ``peft_prompt.py``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from deltatune.formats.peft_prompt import PROMPT_METHODS
from deltatune.formats.peft_spec import Field, Key, Meta, PeftMethod, Site, Tensors, cast, patterns, targets_to_peft

RANK_PATTERN = Field("rank_pattern", {}, *patterns(int))


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


ALPHA_PATTERN = Field("alpha_pattern", {}, *patterns(_number))
NUMBER = (cast(_number), cast(float))
INT, FLOAT, BOOL = (cast(int), cast(int)), (cast(float), cast(float)), (cast(bool), cast(bool))
CONVS = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}


def _conv_type(ndim: int) -> str:
    return {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}.get(ndim, "*")


# --- LoRA and DoRA -------------------------------------------------------------------------------------

_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian"}
# PEFT initialisations that change the base weights: the file's factors then fit PEFT's residual base.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _init_to_peft(init: str, site: Site) -> Any:
    if init not in _INIT_TO_PEFT:  # pissa/olora are folded into plain factors by _fold_reference first
        raise ValueError(f"LoRA init {init!r} has no PEFT form here; save in deltatune format")
    return _INIT_TO_PEFT[init]


def _init_from_peft(value: Any, site: Site) -> str:
    if isinstance(value, str) and value.lower().startswith(_RESIDUAL_INITS):
        warnings.warn(
            f"init_lora_weights={value!r}: PEFT trained this adapter on a modified base model; its factors "
            "reproduce PEFT's outputs only on that saved residual model. To use the original base, convert it "
            "in PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=...)", stacklevel=2)
    return "gaussian" if value == "gaussian" else "default"


def _lora_type(shapes: Mapping[str, tuple[int, ...]]) -> str:
    if "lora_embedding_A" in shapes:
        return "Embedding"
    return _conv_type(len(shapes.get("lora_A.weight", ())))


def _fold_reference(meta: Meta, tensors: Tensors) -> tuple[Meta, Tensors]:
    """PiSSA/OLoRA keep frozen start factors A₀, B₀ and apply s·(B A − B₀ A₀) to the original base.
    PEFT's shareable form of that is a plain LoRA of rank 2r: [B, −B₀] [A; A₀] at the same scaling
    (what PEFT's ``path_initial_model_for_weight_conversion`` writes)."""
    config = dict(meta["config"])
    if config.get("init") not in ("pissa", "olora"):
        return meta, tensors
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith("A0")]:
        stem = key[:-2]
        out[stem + "A"] = torch.cat([tensors[stem + "A"], tensors[stem + "A0"]])            # (2r, d_in)
        out[stem + "B"] = torch.cat([tensors[stem + "B"], -tensors[stem + "B0"]], dim=1)    # (d_out, 2r)
        del out[stem + "A0"], out[stem + "B0"]
    grow = math.sqrt(2) if config.get("rslora") else 2.0  # keeps α/r (or α/√r) as r doubles
    config.update(init="default", rank=2 * config["rank"], alpha=grow * config["alpha"],
                  rank_pattern={k: 2 * v for k, v in config.get("rank_pattern", {}).items()},
                  alpha_pattern={k: grow * v for k, v in config.get("alpha_pattern", {}).items()})
    return {**meta, "config": config}, out


def _channels_first(t: Tensor, site: Site) -> Tensor:
    # PEFT keeps a convolution's per-channel vector as (1, C, 1[, 1]); ours is (C,).
    n = CONVS.get(site.module_type)
    return t.reshape(1, -1, *([1] * n)) if n else t


def _flat(t: Tensor, site: Site) -> Tensor:
    return t.reshape(-1)


LORA_FIELDS = {
    "rank": Field("r", 8, *INT),
    "alpha": Field("lora_alpha", 8, *NUMBER),
    "dropout": Field("lora_dropout", 0.0, *FLOAT),
    "rslora": Field("use_rslora", False, *BOOL),
    "init": Field("init_lora_weights", True, _init_to_peft, _init_from_peft),
    "rank_pattern": RANK_PATTERN,
    "alpha_pattern": ALPHA_PATTERN,
}
LORA_UNSUPPORTED = {
    "bias": "none", "use_dora": False, "lora_bias": False, "layer_replication": None, "use_qalora": False,
    "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None,
    "megatron_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "monteclora_config": None, "ensure_weight_tying": False,
}
LORA_IGNORED = frozenset({"loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
                          "runtime_config", "megatron_core", "qalora_group_size"})
LORA_COMMON = dict(infer=_lora_type, ignored=LORA_IGNORED, passthrough=frozenset({"fan_in_fan_out", "layers_pattern"}),
                   export=_fold_reference)

# --- (IA)³ ---------------------------------------------------------------------------------------------


def _peft_ff(spec: str | list[str] | None, name: str) -> bool:
    # PEFT: a string is a full-match regex; a list entry matches as a plain ``endswith``.
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(t) for t in spec or [])


def _ff_to_peft(value: tuple[str, ...], site: Site) -> str | list[str]:
    """Our feedforward patterns in PEFT's form, or the feedforward targets by name if PEFT's
    matching rules would classify the adapted modules differently."""
    from deltatune.core.targeting import any_matches

    wanted = [t for t in site.targets if any_matches(t, value)]
    for spec in (targets_to_peft(value) if value else [], wanted, "|".join(map(re.escape, wanted))):
        if [t for t in site.targets if _peft_ff(spec, t)] == wanted:
            return spec
    raise AssertionError("an escaped alternation of the names always matches exactly them")


def _ff_from_peft(spec: str | list[str] | None, site: Site) -> tuple[str, ...]:
    from deltatune.core.targeting import any_matches

    wanted = [t for t in site.targets if _peft_ff(spec, t)]
    mine = (f"re:{spec}",) if isinstance(spec, str) else tuple(spec or ())
    return mine if [t for t in site.targets if any_matches(t, mine)] == wanted else tuple(wanted)


def _ia3_to_peft(t: Tensor, site: Site) -> Tensor:
    # PEFT: (d_out, 1) on the output side, (1, d_in) on the input side (feedforward); convs (1, C, 1, ...).
    from deltatune.core.targeting import any_matches

    if site.module_type in CONVS:
        return _channels_first(t, site)
    return t.reshape(1, -1) if any_matches(site.module, site.config.get("feedforward", ())) else t.reshape(-1, 1)


def _ia3_type(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return _conv_type(len(shapes.get("ia3_l", ())))


# --- LoHa, LoKr ----------------------------------------------------------------------------------------

def _cp_core_to_peft(t: Tensor, site: Site) -> Tensor:
    return t.unsqueeze(-1) if site.module_type == "Conv1d" else t  # PEFT's Conv1d core is (r, r, k, 1)


def _cp_core_from_peft(t: Tensor, site: Site) -> Tensor:
    return t.squeeze(-1) if site.module_type == "Conv1d" and t.dim() == 4 else t


LYCORIS_FIELDS = {
    "rank": Field("r", 8, *INT),
    "alpha": Field("alpha", 8, *NUMBER),
    "rank_dropout": Field("rank_dropout", 0.0, *FLOAT),
    "module_dropout": Field("module_dropout", 0.0, *FLOAT),
    "effective_conv": Field("use_effective_conv2d", False, *BOOL),
    "rank_pattern": RANK_PATTERN,
    "alpha_pattern": ALPHA_PATTERN,
}


def _cp(peft: str) -> Key:
    return Key(peft, _cp_core_to_peft, _cp_core_from_peft)


def _lokr_init_from_peft(value: Any, site: Site) -> str:
    return "lycoris" if value == "lycoris" else "default"


# --- VeRA ----------------------------------------------------------------------------------------------

def _vera_check(peft: Mapping[str, Any], extra: Tensors) -> None:
    """PEFT may store the shared projection; deltatune draws it from the seed: they must agree."""
    from deltatune.methods.vera import VeraProjection

    a, b = extra.get("base_model.vera_A"), extra.get("base_model.vera_B")
    if a is None or b is None:
        return
    seed = int(peft.get("projection_prng_key", 0))
    drawn = VeraProjection(a.shape[0], a.shape[1], b.shape[0], seed)
    for key, mine, theirs in (("base_model.vera_A", drawn.A, a), ("base_model.vera_B", drawn.B, b)):
        if not torch.equal(mine, theirs.to(mine.dtype)):
            raise ValueError(f"tensor {key!r} is not the projection drawn from projection_prng_key={seed}; "
                             "deltatune's VeRA can only use projections drawn from the seed")


PEFT_METHODS: dict[str, PeftMethod] = {
    "lora": PeftMethod(
        peft_type="LORA",
        fields=LORA_FIELDS,
        tensors={"*": {"A": "lora_A.weight", "B": "lora_B.weight"},
                 "Embedding": {"A": "lora_embedding_A", "B": "lora_embedding_B"}},
        unsupported=LORA_UNSUPPORTED,
        **LORA_COMMON,
    ),
    "dora": PeftMethod(
        peft_type="LORA",
        flags={"use_dora": True},
        fields=LORA_FIELDS,
        tensors={"*": {"lora.A": "lora_A.weight", "lora.B": "lora_B.weight",
                       "magnitude": Key("lora_magnitude_vector", _channels_first, _flat)},
                 "Embedding": {"lora.A": "lora_embedding_A", "lora.B": "lora_embedding_B",
                               "magnitude": "lora_magnitude_vector"}},
        unsupported={k: v for k, v in LORA_UNSUPPORTED.items() if k != "use_dora"},
        **LORA_COMMON,
    ),
    "ia3": PeftMethod(
        peft_type="IA3",
        fields={"feedforward": Field("feedforward_modules", None, _ff_to_peft, _ff_from_peft)},
        tensors={"*": {"scale": Key("ia3_l", _ia3_to_peft, _flat)}},
        infer=_ia3_type,
        targeting=frozenset({"target_modules", "exclude_modules"}),
        ignored=frozenset({"init_ia3_weights"}),
        passthrough=frozenset({"fan_in_fan_out"}),
    ),
    "loha": PeftMethod(
        peft_type="LOHA",
        fields=LYCORIS_FIELDS,
        tensors={"*": {"w1_a": "hada_w1_a", "w1_b": "hada_w1_b", "w2_a": "hada_w2_a", "w2_b": "hada_w2_b",
                       "t1": _cp("hada_t1"), "t2": _cp("hada_t2")}},
        infer=lambda shapes: _conv_type(len(shapes["hada_t1"])) if "hada_t1" in shapes else "*",
        ignored=frozenset({"init_weights"}),
        passthrough=frozenset({"layers_pattern"}),
    ),
    "lokr": PeftMethod(
        peft_type="LOKR",
        fields={**LYCORIS_FIELDS,
                "rescale_rank_dropout": Field("rank_dropout_scale", False, *BOOL),
                "decompose_both": Field("decompose_both", False, *BOOL),
                "decompose_factor": Field("decompose_factor", -1, *INT),
                "init": Field("init_weights", True, lambda v, s: True if v == "default" else v, _lokr_init_from_peft)},
        tensors={"*": {"w1": "lokr_w1", "w1_a": "lokr_w1_a", "w1_b": "lokr_w1_b", "w2": "lokr_w2",
                       "w2_a": "lokr_w2_a", "w2_b": "lokr_w2_b", "t2": _cp("lokr_t2")}},
        infer=lambda shapes: _conv_type(len(shapes["lokr_w2"])) if "lokr_w2" in shapes else (
            _conv_type(len(shapes["lokr_t2"])) if "lokr_t2" in shapes else "*"),
        passthrough=frozenset({"layers_pattern"}),
    ),
    "vera": PeftMethod(
        peft_type="VERA",
        fields={"rank": Field("r", 256, *INT), "projection_seed": Field("projection_prng_key", 0, *INT),
                "d_initial": Field("d_initial", 0.1, *FLOAT), "dropout": Field("vera_dropout", 0.0, *FLOAT)},
        tensors={"*": {"d": "vera_lambda_d", "b": "vera_lambda_b"}},
        targeting=frozenset({"target_modules", "layers_to_transform", "layers_pattern"}),
        unsupported={"bias": "none"},
        writes={"save_projection": False},  # the projection is drawn from the seed again
        ignored=frozenset({"init_weights", "save_projection"}),
        passthrough=frozenset({"fan_in_fan_out", "layers_pattern"}),
        extra_keys=frozenset({"base_model.vera_A", "base_model.vera_B"}),
        check=_vera_check,
    ),
    "ln": PeftMethod(
        peft_type="LN_TUNING",
        fields={},
        tensors={"*": {"tuned.weight": "ln_tuning_layers.weight", "tuned.bias": "ln_tuning_layers.bias"}},
        targeting=frozenset({"target_modules", "exclude_modules"}),
    ),
    **PROMPT_METHODS,
}
