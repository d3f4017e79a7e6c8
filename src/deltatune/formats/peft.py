"""Hugging Face PEFT checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's
field and key names, read and written losslessly, so adapters move between deltatune and the tools
that speak this format (PEFT itself, vLLM, SGLang, torchtune, Unsloth, LLaMA-Factory).

Everything goes through the format-neutral value, :class:`~deltatune.core.stored.StoredAdapter`
(config, placement, tensors keyed ``<module>.<adapter tensor>``); the translation works on our
format's meta dict (:func:`deltatune.formats.native.to_meta` / ``from_meta``). The per-method
knowledge is a table (``peft_methods.py``, ``peft_prompt.py``), applied by ``peft_translate.py``;
this file reads and writes the files: :func:`detect`, :func:`read`, :func:`write`, reached through
``deltatune.load_adapter`` (which recognises a PEFT directory), ``deltatune.save_adapter(...,
format="peft")`` and ``deltatune.convert``. Attaching to a model is ``core.stored.install``'s, as
for our format; the value's ``Source`` makes its errors name PEFT's keys.

Reading takes module names from the tensor keys (as vLLM does), never from the config's target
patterns, and checks every tensor against the shape the config implies, naming PEFT's key on a
mismatch. Fields a newer PEFT writes that the table does not know are ignored with one warning;
a PEFT feature deltatune lacks is an error naming it. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deltatune.core.files import atomic_directory, read_json_file, read_tensors, write_json
from deltatune.core.layer import logical_modules
from deltatune.core.stored import Source, StoredAdapter
from deltatune.formats.native import from_meta, to_meta
from deltatune.formats.peft_translate import (
    Locate,
    config_to_peft,
    entry_for,
    peft_key,
    plan_from_peft,
    split_key,
    tensors_to_peft,
)
from deltatune.formats.peft_spec import Site

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


def detect(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory``'s ``adapter_config.json`` is PEFT's."""
    return is_peft_config(read_peft_config(directory))


def read_peft_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
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
    info: dict[str, Any] = {}
    task = next((t for suffix, t in _TASKS.items() if type(model).__name__.endswith(suffix)), None)
    heads = [n for n, _ in logical_modules(model) if n.endswith(_TASK_HEADS.get(task or "", ()))]
    if task and all(h in saved for h in heads):
        info["task_type"] = task
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if path:
        info["base_model_name_or_path"] = str(path)
    return info


def read(directory: str | os.PathLike[str], model: nn.Module | None = None) -> StoredAdapter:
    """The PEFT adapter in ``directory`` as a value. With ``model``, its layer types and module
    selection settle what the files alone leave open (prompt learning names no module)."""
    module_types, locate = None, None
    if model is not None:
        module_types = {n: type(m).__name__ for n, m in logical_modules(model)}
        locate = lambda config: config.select_modules(model)  # noqa: E731
    meta, tensors, origin = read_peft(directory, module_types, locate)
    return from_meta(meta, tensors, Source(str(directory), PEFT_WEIGHTS, _namer(meta, origin)))


def _namer(meta: Mapping[str, Any], origin: Mapping[str, str]) -> Callable[[str], str]:
    """Our tensor key -> PEFT's: the file's own key, or (for a key the file lacks) the one PEFT would use."""
    entry = entry_for(meta["config"]["method"])
    targets, saved = meta["targets"], meta["modules_to_save"]
    site = Site(targets, meta["module_types"], meta["config"])

    def show(key: str) -> str:
        if key in origin:
            return origin[key]
        module, tensor = split_key(key, targets + saved)
        return peft_key(entry, dataclasses.replace(site, module=module), tensor, module in saved)[0]

    return show


def write(value: StoredAdapter, directory: str | os.PathLike[str], model: nn.Module | None = None) -> Path:
    """Write ``value`` as a PEFT checkpoint that ``PeftModel.from_pretrained`` loads. With ``model``,
    record its task type and origin, and write target patterns that match only the adapted modules."""
    meta = to_meta(value)
    entry_for(meta["config"]["method"])  # refuse a method without a PEFT form before any work
    names = None
    if model is not None:
        meta["peft"] = model_info(model, meta["modules_to_save"])
        names = [n for n, _ in logical_modules(model) if n]
    return write_peft(directory, meta, value.tensors, names=names)
