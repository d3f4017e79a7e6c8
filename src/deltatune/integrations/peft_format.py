"""Hugging Face PEFT checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's
field and key names, read and written losslessly, so adapters move between deltatune and the tools
that speak this format (PEFT itself, vLLM, SGLang, torchtune, Unsloth, LLaMA-Factory).

Everything goes through deltatune's own saved form (a ``meta`` dict + tensors keyed
``<module>.<adapter tensor>``, see :mod:`deltatune.core.io`). The per-method knowledge is a table
(``peft_methods.py``, ``peft_prompt.py``), applied by ``peft_translate.py``; this file reads and
writes the files and attaches adapters to models:

- :func:`load_peft_adapter` / :func:`save_peft_adapter`, reached through ``deltatune.load_adapter``
  (which recognises a PEFT directory) and ``deltatune.save_adapter(..., format="peft")``;
- :func:`convert` between the two formats without a model (``deltatune convert``).

Loading takes module names from the tensor keys (as vLLM does), never from the config's target
patterns, and checks every tensor against the shape the config implies, naming PEFT's key on a
mismatch. Fields a newer PEFT writes that the table does not know are ignored with one warning;
a PEFT feature deltatune lacks is an error naming it. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deltatune.integrations.peft_spec import Site
from deltatune.integrations.peft_translate import (
    Locate,
    config_to_peft,
    entry_for,
    peft_key,
    plan_from_peft,
    split_key,
    tensors_to_peft,
)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
# PEFT's task_type by the model class's name ending; the first match wins (GPT2LMHeadModel is a causal LM).
_TASKS = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
          "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
          "ForConditionalGeneration": "SEQ_2_SEQ_LM", "ForSeq2SeqLM": "SEQ_2_SEQ_LM", "Model": "FEATURE_EXTRACTION"}
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def is_peft_config(meta: Mapping[str, Any]) -> bool:
    """Whether a parsed ``adapter_config.json`` was written in PEFT's format."""
    return "peft_type" in meta and "format" not in meta


# --- files -------------------------------------------------------------------------------------------


def read_peft_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    from deltatune.core.io import read_json_file

    return read_json_file(Path(directory) / PEFT_CONFIG)


def _weights(directory: Path) -> Path:
    path = directory / PEFT_WEIGHTS
    if not path.is_file():
        if (directory / PEFT_PICKLE).is_file():
            raise ValueError(
                f"{directory / PEFT_PICKLE} is a pickle, which deltatune never loads (unpickling runs code). "
                "Convert it to safetensors first, e.g. in PEFT: PeftModel.from_pretrained(base, dir)"
                ".save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"{path} not found")
    return path


def read_peft_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A PEFT directory's adapter as deltatune's meta (reads key names and shapes, not the tensors)."""
    directory = Path(directory)
    peft = read_peft_config(directory)
    weights = _weights(directory)
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors' own error type: a truncated or empty file
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); it is probably truncated") from None
    return _plan(peft, shapes, directory).meta


def _plan(peft: dict[str, Any], shapes: dict[str, tuple[int, ...]], directory: Path, *args: Any) -> Any:
    """``plan_from_peft``, with a config of the wrong shape reported as one error naming the file."""
    try:
        return plan_from_peft(peft, shapes, str(directory), *args)
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{directory / PEFT_CONFIG}: cannot read this PEFT config ({type(err).__name__}: {err})") \
            from None


def read_peft(directory: str | os.PathLike[str], module_types: Mapping[str, str] | None = None,
              locate: Locate | None = None) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    """(deltatune meta, tensors by our key, our key -> PEFT key) for a PEFT directory."""
    directory = Path(directory)
    peft = read_peft_config(directory)
    from deltatune.core.io import read_tensors

    raw = read_tensors(_weights(directory))
    plan = _plan(peft, {k: tuple(t.shape) for k, t in raw.items()}, directory, module_types, locate)
    check = entry_for(plan.meta["config"]["method"]).check
    if check is not None:
        try:
            check(peft, {k: raw[k] for k in plan.extra})
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from None
    tensors = {ours: (spec.from_peft(raw[k], site) if spec else raw[k]) for k, (ours, spec, site) in plan.keys.items()}
    return plan.meta, tensors, {ours: k for k, (ours, _, _) in plan.keys.items()}


def write_peft(directory: str | os.PathLike[str], meta: Mapping[str, Any], tensors: Mapping[str, Tensor],
               names: list[str] | None = None) -> Path:
    """Write deltatune ``meta`` + ``tensors`` as a PEFT directory (replaced atomically)."""
    from deltatune.core.io import atomic_directory, write_json

    entry = entry_for(meta["config"].get("method", ""))
    if entry.export is not None:
        meta, tensors = entry.export(dict(meta), dict(tensors))
    peft, out = config_to_peft(meta, names), tensors_to_peft(meta, tensors)
    with atomic_directory(directory) as tmp:
        save_file(out, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / PEFT_CONFIG, peft)
    return Path(directory)


# --- with a model --------------------------------------------------------------------------------------


def model_info(model: nn.Module, saved: list[str]) -> dict[str, Any]:
    """What PEFT records about the base model: its task type and where it came from.

    For classification tasks PEFT itself adds the head (``classifier``, ``score``...) to
    ``modules_to_save`` and then requires its tensors, so that task type is written only when
    the adapter saved the head.
    """
    from deltatune.core.layer import logical_modules

    info: dict[str, Any] = {}
    task = next((t for suffix, t in _TASKS.items() if type(model).__name__.endswith(suffix)), None)
    heads = [n for n, _ in logical_modules(model) if n.endswith(_TASK_HEADS.get(task or "", ()))]
    if task and all(h in saved for h in heads):
        info["task_type"] = task
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if path:
        info["base_model_name_or_path"] = str(path)
    return info


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str = "default") -> Path:
    """Write adapter ``name`` of ``model`` as a PEFT checkpoint that ``PeftModel.from_pretrained`` loads."""
    from deltatune.core.io import adapter_payload
    from deltatune.core.layer import logical_modules

    meta, tensors = adapter_payload(model, name)
    entry_for(meta["config"]["method"])  # refuse a method without a PEFT form before any work
    meta["peft"] = model_info(model, meta["modules_to_save"])
    return write_peft(directory, meta, tensors, names=[n for n, _ in logical_modules(model) if n])


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None, *,
                      activate: bool = True, trainable: bool = False) -> str:
    """Attach the PEFT adapter in ``directory`` to ``model``; every key and shape is checked first."""
    from deltatune.core.inject import attach, detach
    from deltatune.core.io import finish_load
    from deltatune.core.layer import logical_modules

    modules = dict(logical_modules(model))
    meta, tensors, origin = read_peft(directory, {n: type(m).__name__ for n, m in modules.items()},
                                      locate=lambda config: config.select_modules(model))
    targets, saved = meta["targets"], meta["modules_to_save"]
    for key, peft_name in origin.items():
        module = split_key(key, targets + saved)[0]
        if module not in modules:
            raise ValueError(f"{directory}: tensor {peft_name!r} is for module {module!r}, which this model does "
                             "not have; the adapter was trained on a different base model")
    from deltatune.methods import config_from_dict

    name = name or "default"
    attach(model, config_from_dict(meta["config"]), name, activate=activate, module_names=targets, save_names=saved)
    try:
        _check_and_copy(model, name, meta, tensors, origin, directory)
    except Exception:
        detach(model, name)
        raise
    finish_load(model, name, activate=activate, trainable=trainable)
    return name


def _check_and_copy(model: nn.Module, name: str, meta: Mapping[str, Any], tensors: Mapping[str, Tensor],
                    origin: Mapping[str, str], directory: Any) -> None:
    """Compare every tensor with what the attached adapter holds (naming PEFT's key), then copy."""
    from deltatune.core.inject import adapted_layers
    from deltatune.core.io import adapter_state

    entry = entry_for(meta["config"]["method"])
    targets, saved = meta["targets"], meta["modules_to_save"]
    site = Site(targets, meta["module_types"], meta["config"])
    expected, _, _ = adapter_state(model, name)
    for key, want in expected.items():
        module, tensor = split_key(key, targets + saved)
        shown = origin.get(key) or peft_key(entry, dataclasses.replace(site, module=module), tensor, module in saved)[0]
        if key not in tensors:
            raise ValueError(f"{directory}: tensor {shown!r} is missing from {PEFT_WEIGHTS}")
        if tuple(tensors[key].shape) != tuple(want.shape):
            raise ValueError(
                f"{directory}: tensor {shown!r} has shape {tuple(tensors[key].shape)} but {PEFT_CONFIG} on this "
                f"model implies {tuple(want.shape)}; the config does not match the tensors, or the adapter was "
                "trained on a different base model")
    for key in tensors:
        if key not in expected:
            raise ValueError(f"{directory}: unexpected tensor {origin[key]!r} in {PEFT_WEIGHTS}")
    with torch.no_grad():
        for layer_name, layer in adapted_layers(model):
            if name in layer.adapters:
                adapter = layer.adapters[name]
                adapter.load_state_dict({k: tensors[f"{layer_name}.{k}"] for k in adapter.state_dict()})


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: Literal["peft", "deltatune"]) -> Path:
    """Convert an adapter directory between deltatune's format and PEFT's, without loading a model."""
    from deltatune.core.io import CONFIG_FILE, WEIGHTS_FILE, atomic_directory, read_adapter_config, read_tensors, write_json

    src = Path(src)
    if to not in ("peft", "deltatune"):
        raise ValueError(f"--to must be 'peft' or 'deltatune', got {to!r}")
    source = "peft" if is_peft_config(read_peft_config(src)) else "deltatune"
    if source == to:
        raise ValueError(f"{src} is already a {to} adapter; nothing to convert")
    if to == "peft":
        return write_peft(dst, read_adapter_config(src), read_tensors(src / WEIGHTS_FILE))
    meta, tensors, _ = read_peft(src)
    with atomic_directory(dst) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, meta)
    return Path(dst)
