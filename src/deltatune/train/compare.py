"""Train several methods on one task, split and budget, and compare them (``deltatune compare``).

This is the comparison of the Delta Tuning paper (Ding et al., Nature Machine Intelligence 2023)
on our own tasks: full fine-tuning as the reference row, then methods of the addition,
specification and reparameterization families, each trained with the same task, data split,
seed, epochs, batch size and maximum length. Beside test accuracy and macro-F1 we report what
each method costs: trainable parameters, bytes to ship, training time and peak memory.

Only what a method needs to train well differs between rows: its own ``adapter:`` settings (its
config's defaults plus the task's ``method_defaults``; the new classifier head is trained by
every method, ``prepare`` adds it to ``modules_to_save``) and the learning rate its
config suggests (``suggested_lr``; :data:`deltatune.train.config.FULL_DEFAULTS` for full fine-tuning; the same defaults as ``train``). ``--set`` overrides apply to every run (``adapter.*`` ones to every
adapter method); ``--set-method lora.adapter.rank=16`` to one method. A per-method override of a
key in :data:`SHARED_KEYS` is refused up front, so the budget stays the same for all.

Each method trains in a fresh Python process by default (:func:`worker`). On CPU the only peak
memory we can read is the process's peak resident set size (``VmHWM``), which never goes down:
in one shared process every row after the first would report the largest peak so far.
The runs stay in ``OUTPUT/<method>/`` as ``deltatune train`` leaves them (minus the resume
checkpoint, plus ``log.txt``); the comparison goes to ``compare.json`` (every metric of every
run), ``compare.md`` (the table) and ``compare.png`` (the chart); ``compare_report`` draws them.

A method that fails (it matches nothing in the model, it raises, its process dies) becomes a row
holding its error; the other methods still run.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.methods import METHODS
from deltatune.train.compare_report import one_line, write_reports
from deltatune.train.config import TrainConfig, apply_override, validate_config

FULL = "full"
FAMILY_ORDER = ("full", "addition", "specification", "reparameterization", "hybrid", "other")
#: Keys every method shares, so that the rows compare: the per-method override may not touch them.
SHARED_KEYS = ("model", "task", "data", "seed", "epochs", "batch_size", "eval_batch_size", "eval_every",
               "max_length", "precision", "device", "threads")
LOG_FILE = "log.txt"
RESULT_FILE = "compare-result.json"


HYBRID = "hybrid"  # several methods under one adapter: its parts come from --set adapter.parts or the task's defaults


def available_methods() -> list[str]:
    return [FULL, *METHODS, HYBRID]


def family_of(method: str) -> str:
    """The method's place in the taxonomy, as its config declares it (``full`` for full fine-tuning)."""
    if method in (FULL, HYBRID):
        return method
    declared = getattr(METHODS.get(method), "family", "other")
    return declared if declared in FAMILY_ORDER else "other"


def parse_methods(spec: str | Sequence[str]) -> tuple[list[str], bool]:
    """``"full,lora"`` (or a list) -> (names, whether they came from ``all``)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = [n.strip() for part in parts for n in part.split(",") if n.strip()]
    known = available_methods()
    if names == ["all"]:
        return [n for n in known if n != HYBRID], True  # every method, each alone
    if not names:
        raise ValueError("--methods is empty; give e.g. --methods full,lora,bitfit, or --methods all")
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, [*known, "all"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown method {name!r} in --methods (available: all, {', '.join(known)}){hint}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--methods names {repeated[0]!r} twice; give each method once")
    return names, False


@dataclass
class Planned:
    """One row to run: its validated config, or why the method cannot run on this task."""

    method: str
    config: TrainConfig | None
    error: str | None = None
    option: str | None = None  # with ``grid``: the method and its changed settings, e.g. "lora rank=16"


def _per_method(assignments: Sequence[str], methods: list[str]) -> dict[str, list[str]]:
    """``lora.adapter.rank=16`` -> ``{"lora": ["adapter.rank=16"]}``, refusing shared keys."""
    out: dict[str, list[str]] = {}
    for assignment in assignments:
        method, dot, rest = assignment.partition(".")
        if not dot or "=" in method or "=" not in rest:
            raise ValueError(f"--set-method expects METHOD.key=value (e.g. lora.adapter.rank=16), got {assignment!r}")
        if method not in methods:
            raise ValueError(f"--set-method {assignment!r}: {method!r} is not one of the compared methods "
                             f"({', '.join(methods)})")
        key = rest.partition("=")[0].strip()
        if key.split(".")[0] in (*SHARED_KEYS, "method", "output"):
            raise ValueError(f"--set-method {assignment!r}: {key!r} is the same for every method so that they "
                             f"compare; change it for all with --set {rest}")
        out.setdefault(method, []).append(rest)
    return out


def plan_comparison(methods: str | Sequence[str], output: str | Path, overrides: Sequence[str] = (),
                    method_overrides: Sequence[str] = (), grid: bool = False) -> list[Planned]:
    """Validate every run's config before any training. Bad input raises ``ValueError``.

    With ``methods="all"``, a method whose config does not validate for the task is a planned
    error row instead (unless none validates: then the settings themselves are wrong). With
    ``grid``, each method also runs with each setting of its declared search space changed in
    turn (``space.candidates``: the rows ``deltatune plan`` predicts and ``tune`` searches).
    """
    from deltatune.train.space import Candidate, candidates

    names, implied = parse_methods(methods)
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if key.split(".")[0] in ("method", "output"):
            raise ValueError(f"--set {key}: the comparison sets it for each run; use --methods / --output")
    per_method = _per_method(method_overrides, names)
    planned = []
    for method in names:
        data: dict[str, Any] = {"method": method}  # validate_config fills method_defaults(method)
        for assignment in overrides:
            if method == FULL and assignment.strip().startswith("adapter."):
                continue  # full fine-tuning has no adapter settings
            apply_override(data, assignment)
        for assignment in per_method.get(method, []):
            apply_override(data, assignment)
        for cand in candidates([method]) if grid else [Candidate(method)]:
            planned.append(_planned(cand, data, output, overrides, implied))
    valid = [p.config for p in planned if p.config is not None]

    if not valid:
        raise ValueError(str(planned[0].error).removeprefix("not applicable: "))
    first = valid[0].model_dump(mode="json")
    for config in valid[1:]:  # the property the table rests on; _per_method already guards it
        other = config.model_dump(mode="json")
        differ = [k for k in SHARED_KEYS if other.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"{differ[0]!r} differs between {valid[0].method} and {config.method}; "
                             "every method must share it")
    return planned


def _planned(cand: Any, data: dict[str, Any], output: str | Path, overrides: Sequence[str], implied: bool) -> Planned:
    method = cand.method
    data = {**cand.apply(data), "output": str(Path(output) / cand.slug)}
    try:
        return Planned(method, validate_config(data, source=f"method {cand.label}"), option=cand.label)
    except ValueError as err:
        hint = ("; --set adapter.* applies to every adapter method, use --set-method METHOD.adapter.KEY=VALUE "
                "for one") if any(a.strip().startswith("adapter.") for a in overrides) else ""
        if not implied:
            raise ValueError(f"{err}{hint}") from None
        return Planned(method, None, f"not applicable: {err}", option=cand.label)


# --- running ------------------------------------------------------------------------------------


def _train(config: TrainConfig) -> dict[str, Any]:
    """``{"metrics": ...}`` or ``{"error": ...}``: a failing method is a row, not the end of the comparison."""
    from deltatune.train.run import run_training

    try:
        return {"metrics": run_training(config, progress=False, overwrite=True)}  # compare has no --resume
    except Exception as err:  # noqa: BLE001 - reported in the table, traceback in the log
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}


def worker(argv: Sequence[str] | None = None) -> None:
    """One isolated run: ``python -c "...; worker()" CONFIG_JSON RESULT_FILE`` (see :func:`_run_isolated`)."""
    config_json, result_file = list(argv if argv is not None else sys.argv[1:])[:2]
    result = _train(validate_config(json.loads(config_json), source="compare worker"))
    tmp = Path(f"{result_file}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_file)  # the parent never reads half a file


def _log_tail(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return lines[-1].strip() if lines else "(empty log)"


def _run_isolated(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    result_file = run_dir / RESULT_FILE
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-c", "from deltatune.train.compare import worker; worker()",
               json.dumps(config.model_dump(mode="json")), str(result_file)]
    with (run_dir / LOG_FILE).open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            proc.wait()
        finally:  # interrupted (Ctrl-C, an error here): leave no orphan training behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if result_file.is_file():
        return json.loads(result_file.read_text())
    why = "was killed (out of memory?)" if proc.returncode in (-9, 137) else f"exited with code {proc.returncode}"
    return {"error": f"the run's process {why}: {_log_tail(run_dir / LOG_FILE)}"}


def _run_here(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    with (run_dir / LOG_FILE).open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return _train(config)


def _row(planned: Planned, outcome: dict[str, Any], wall: float, run_dir: Path | None,
         columns: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    m = outcome.get("metrics") or {}
    trainable, total = m.get("trainable_parameters"), m.get("total_parameters")
    return {
        "method": planned.method,
        "option": planned.option or planned.method,
        "family": family_of(planned.method),
        "status": "ok" if m else "error",
        "error": outcome.get("error"),
        "lr": planned.config.lr if planned.config else None,
        "accuracy": m.get("test_accuracy"),
        "macro_f1": m.get("test_macro_f1"),
        "scores": {key: m.get(f"test_{key}") for key, _ in columns} if columns else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / total if trainable is not None and total else None,
        "adapter_bytes": m.get("adapter_bytes"),
        "train_seconds": m.get("train_seconds"),
        "peak_memory_mb": m.get("peak_memory_mb"),
        "wall_seconds": round(wall, 2),
        "run_dir": str(run_dir) if run_dir else None,
        "config": planned.config.model_dump(mode="json") if planned.config else None,
        "metrics": m or None,
    }


def run_comparison(methods: str | Sequence[str], output: str | Path, overrides: Sequence[str] = (),
                   method_overrides: Sequence[str] = (), isolate: bool = True,
                   keep_checkpoints: bool = False, grid: bool = False) -> dict[str, Any]:
    """Plan, train each method in turn, and write ``compare.json``/``.md``/``.png`` to ``output``.

    ``isolate=False`` trains in this process (faster to start; peak memory then is not per method).
    Returns what ``compare.json`` holds.
    """
    from deltatune.train.tasks import get_task

    output = Path(output)
    from deltatune.train.output import check_output_for

    check_output_for(output, "compare", ("compare.json", "compare.md", "compare.png"), runs_inside=True)
    planned = plan_comparison(methods, output, overrides, method_overrides, grid)
    first = next(p.config for p in planned if p.config is not None)
    task = get_task(first.task)
    columns = [list(c) for c in getattr(task, "compare_columns", ())]  # a task's own quality columns, if any
    splits = task.load_splits(first)  # read once here, so bad data fails before training
    output.mkdir(parents=True, exist_ok=True)
    started, rows = time.time(), []
    for i, plan in enumerate(planned, 1):
        head = f"[{i}/{len(planned)}] {plan.option or plan.method}"
        if plan.config is None:
            print(f"{head}: {plan.error}")
            rows.append(_row(plan, {"error": plan.error}, 0.0, None, columns))
            continue
        run_dir = Path(plan.config.output or output / plan.method)  # output/<method>, or output/<option> with grid
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"{head}: training in {'a fresh process' if isolate else 'this process'} (log: {run_dir / LOG_FILE})",
              flush=True)
        t0 = time.perf_counter()
        outcome = _run_isolated(plan.config, run_dir) if isolate else _run_here(plan.config, run_dir)
        row = _row(plan, outcome, time.perf_counter() - t0, run_dir, columns)
        if row["status"] == "ok" and not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # only for --resume, which compare lacks
        print(f"{head}: {one_line(row)}", flush=True)
        rows.append(row)
    rows.sort(key=lambda r: FAMILY_ORDER.index(r["family"]))  # stable: given order within a family
    ok = [r["metrics"] for r in rows if r["status"] == "ok"]
    shared = first.model_dump(mode="json")
    result = {
        "task": first.task,
        "model": first.model,
        "methods": [p.method for p in planned],
        "overrides": list(overrides),
        "method_overrides": list(method_overrides),
        "shared": {k: shared.get(k) for k in SHARED_KEYS},
        "splits": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test),
                   "labels": splits.labels if not columns else None},
        "columns": columns or None,
        "baseline_note": task.compare_note(ok[0]) if ok and hasattr(task, "compare_note") else None,
        "majority_baseline": {"accuracy": ok[0].get("majority_baseline_accuracy"),
                              "macro_f1": ok[0].get("majority_baseline_macro_f1")} if ok else None,
        "isolated": isolate,
        "peak_memory_measure": ok[0].get("peak_memory_measure") if ok else None,
        "device": ok[0].get("device") if ok else None,  # as resolved by the run ("auto" -> "cpu")
        "precision": ok[0].get("precision") if ok else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    write_reports(result, output)
    return result
