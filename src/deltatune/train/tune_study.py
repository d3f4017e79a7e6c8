"""The study ``deltatune tune`` searches in: an Optuna RDB storage (``sqlite:///OUTPUT/study.db`` by
default, or any Optuna storage URL), its sampler and pruner, the settings it is bound to, and the
trials a new study starts with.

Optuna hands each trial number to exactly one process (``ask`` is a database insert), so several
processes or machines can work on one study. A killed process leaves its trial ``RUNNING``; after
the heartbeat's grace period the next process marks it failed and retries its settings once
(``RetryHeartbeatStaleTrialCallback``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import random
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deltatune.train.budget import Budget
from deltatune.train.config import TrainConfig, validate_config
from deltatune.train.space import candidate, method_space

#: ASHA (one successive-halving ladder) rather than Hyperband by default: Hyperband splits a study into
#: brackets, each with its own ladder whose first trials always run to the end, and Optuna's sampler then
#: learns from one bracket's trials only. At the tens of trials a CPU search affords that is most of the
#: study: on sentiment (bench.tune_vs_grid, 10 trials) Hyperband ran 7 of 10 trials to the end (52 % of
#: the compare grid's training examples), ASHA 4 of 10 (42 %) with the same sampled settings.
DEFAULT_PRUNER = "asha"
#: ASHA's and Hyperband's reduction factor: a third of the trials at a rung go on to the next.
REDUCTION_FACTOR = 3


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ValueError("deltatune tune needs Optuna: pip install 'deltatune[tune]' (or pip install optuna)") from None
    return optuna


def startup_trials(trials: int) -> int:
    """How many trials TPE samples at random before it models the results: a third of the search,
    3 to 10. Optuna's default, 10 whatever the search's length, made a 10-trial search a random
    search (bench.tune_vs_grid: no trial after the first came near the best method's rate)."""
    return max(3, min(10, trials // 3))


def make_sampler(optuna: Any, seed: int, trials: int) -> Any:
    """TPE over the whole space at once (``multivariate``: method, its settings and the learning rate
    are modelled jointly, not each on its own) and per conditional group (``group``: each method's
    settings exist only when that method is drawn), after :func:`startup_trials` random ones.
    ``constant_liar``: a trial still running elsewhere counts as a poor result, so several workers on
    one study do not all sample next to the same best trial."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(trials), multivariate=True,
                                      group=True, constant_liar=True)


def open_study(storage: str, name: str, direction: str, pruner: str, rungs: int, seed: int,
               heartbeat: int, trials: int = 20) -> Any:
    optuna = _optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
    kwargs: dict[str, Any] = {"heartbeat_interval": heartbeat, "grace_period": 2 * heartbeat,
                              "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1)}
    if storage.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # several processes wait for the lock
    with _creating(storage):
        try:
            store = RDBStorage(storage, **kwargs)
        except Exception as err:  # a malformed URL, a missing driver, an unreachable server
            raise ValueError(f"--storage {storage!r}: {err}") from None
        return _create(optuna, store, name, direction, pruner, rungs, make_sampler(optuna, seed, trials))


@contextlib.contextmanager
def _creating(storage: str) -> Any:
    """Hold an exclusive lock beside a SQLite study while its tables and the study are created:
    two processes that open a new database at once otherwise both issue ``CREATE TABLE`` and the
    second fails ("table ... already exists"). Server databases serialise this themselves."""
    path = storage.removeprefix("sqlite:///") if storage.startswith("sqlite:///") else None
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}.lock", "a") as lock:  # appended to, never truncated: the lock file carries nothing
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def halving_pruner(optuna: Any) -> Any:
    """ASHA (asynchronous successive halving) that knows the survey: a trial goes on past a rung (resource
    1, 3, 9, ...) if its value there is among the best 1/REDUCTION_FACTOR of the values recorded at that
    rung (the best one while fewer than REDUCTION_FACTOR are), Optuna's ``SuccessiveHalvingPruner`` rule.
    The difference: a *continuation* (a surveyed setting picked to go on, :func:`enqueue_continuations`)
    carries its survey trial's value at the first rung; it passed that rung in the survey, and its copy
    of the value is not counted again (Optuna's pruner would count the same setting twice and stop it)."""

    class Halving(optuna.pruners.BasePruner):
        def prune(self, study: Any, trial: Any) -> bool:
            step = trial.last_step
            if step is None or step == _surveyed_step(trial):
                return False
            value = trial.intermediate_values[step]
            if math.isnan(value):
                return True
            done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
            field = [value] + [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=done)
                               if t.number != trial.number and step in t.intermediate_values
                               and step != _surveyed_step(t)]
            keep = max(1, len(field) // REDUCTION_FACTOR)
            ranked = sorted(field, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)
            bar = ranked[keep - 1]
            return value < bar if study.direction == optuna.study.StudyDirection.MAXIMIZE else value > bar

    return Halving()


def _surveyed_step(trial: Any) -> int | None:
    """The rung a continuation passed in the survey (its value there is the survey trial's)."""
    return trial.user_attrs.get("surveyed_step") if trial.user_attrs.get(CONTINUES) is not None else None


def _create(optuna: Any, store: Any, name: str, direction: str, pruner: str, rungs: int, sampler: Any) -> Any:
    pruners = {
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=REDUCTION_FACTOR ** (rungs - 1),
                                                            reduction_factor=REDUCTION_FACTOR),
        "asha": lambda: halving_pruner(optuna),
        "none": lambda: optuna.pruners.NopPruner(),
    }
    if pruner not in pruners:
        raise ValueError(f"--pruner {pruner!r}: choose hyperband, asha or none")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=store, study_name=name, direction=direction, load_if_exists=True,
                               sampler=sampler, pruner=pruners[pruner]())


def _settings_key(base: dict[str, Any], methods: Sequence[str], budget: Budget, epochs: Sequence[int]) -> str:
    text = json.dumps({"base": base, "methods": list(methods), "budget": budget.text, "epochs": list(epochs)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_settings(study: Any, key: str, shown: dict[str, Any]) -> None:
    """A study keeps the settings it was started with; another search under its name is refused."""
    recorded = study.user_attrs.get("settings_key")
    if recorded is None:
        study.set_user_attr("settings_key", key)
        study.set_user_attr("settings", shown)
    elif recorded != key:
        raise ValueError(f"study {study.study_name!r} was started with other settings "
                         f"({json.dumps(study.user_attrs.get('settings'))}); use the same settings to continue it, "
                         "or another --study-name")


#: User attributes that mark the survey: a trial that stops at the first rung, and a continuation of one.
SURVEY, CONTINUES = "survey", "continues"


def default_params(space: dict[str, dict[str, list[str]]], method: str, epochs: Sequence[int],
                   default_epochs: int) -> dict[str, Any]:
    """``method`` at its declared usual settings (the first choice of each, or the first the budget allows)
    and its suggested learning rate (scale 1): Optuna's params for an enqueued trial."""
    params: dict[str, Any] = {"method": method}
    for key, choices in method_space(method).items():
        allowed = space[method].get(key) or list(choices)
        usual = next(iter(choices))
        params[f"{method}.{key}"] = usual if usual in allowed else allowed[0]
    params["lr_scale"] = 1.0
    if len(epochs) > 1:
        params["epochs"] = default_epochs if default_epochs in epochs else epochs[0]
    return params


def enqueue_default(study: Any, space: dict[str, dict[str, list[str]]], method: str, epochs: Sequence[int],
                    default_epochs: int, survey: bool = False) -> bool:
    """Make a new study's first trial what ``deltatune train`` runs on these settings: the config's method
    at its declared defaults and its starting learning rate (scale 1). Skipped when the study has trials
    already or the defaults are not in the space (over the budget). With ``survey`` it is the survey's first
    trial (it stops at the first rung like the others). Returns whether it enqueued."""
    if study.get_trials(deepcopy=False) or method not in space:
        return False
    if any(next(iter(choices)) not in space[method].get(key, ()) for key, choices in method_space(method).items()):
        return False  # the usual settings are over the budget
    params = default_params(space, method, epochs, default_epochs)
    study.enqueue_trial(params, user_attrs={SURVEY: True} if survey else None, skip_if_exists=True)
    return True


def survey_size(trials: int, methods: int) -> int:
    """How many methods a search of ``trials`` trials surveys at the first rung: all of them if the survey
    and its continuations (a third of it, at least one) fit in ``trials``, else as many as do."""
    for n in range(min(methods, trials), 0, -1):
        if n + max(1, n // REDUCTION_FACTOR) <= trials:
            return n
    return 0


def enqueue_survey(study: Any, space: dict[str, dict[str, list[str]]], skip: str, count: int, seed: int,
                   epochs: Sequence[int] = (1,), default_epochs: int = 1, survey: bool = False) -> list[str]:
    """Enqueue ``count`` trials of distinct methods (not ``skip``, the default trial's), drawn in an order
    ``seed`` fixes, each at its declared usual settings and suggested learning rate (scale 1): the point
    each method declares as its best guess. With ``survey``, each trial stops at the first rung
    (:func:`enqueue_continuations` picks which go on). Returns the methods enqueued."""
    methods = sorted(m for m in space if m != skip)
    random.Random(seed).shuffle(methods)
    for method in methods[:count]:
        study.enqueue_trial(default_params(space, method, epochs, default_epochs),
                            user_attrs={SURVEY: True} if survey else None, skip_if_exists=True)
    return methods[:count]


def drop_survey_checkpoints(study: Any, chosen: Sequence[int]) -> None:
    """The checkpoints of survey trials that do not go on: nothing will resume from them."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(SURVEY) and t.number not in chosen and t.user_attrs.get("run_dir"):
            shutil.rmtree(Path(t.user_attrs["run_dir"]) / "checkpoint", ignore_errors=True)


def enqueue_continuations(study: Any, lock_storage: str = "") -> list[int]:
    """Once every survey trial has stopped at the first rung: the best third of them (at least one), best
    first, go on from where they stopped (successive halving, synchronous on this rung: every method is
    measured before any is chosen, so none is promoted for having run early). A continuation carries the
    survey trial's number, value and run directory. Done once per study (under the study's lock for
    SQLite); returns the survey trials that continue."""
    optuna = _optuna()
    with _creating(lock_storage):
        if study.user_attrs.get("continued") is not None:
            return []
        trials = study.get_trials(deepcopy=False)
        survey = [t for t in trials if t.user_attrs.get(SURVEY)]
        live = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
        if not survey or any(t.state in live for t in survey):
            return []
        # stopped at its first rung: one value (a run too short for an early rung ran to its end instead)
        measured = {t.number: (t, *next(iter(t.intermediate_values.items()))) for t in survey
                    if t.state == optuna.trial.TrialState.PRUNED and len(t.intermediate_values) == 1}
        measured = {n: tsv for n, tsv in measured.items() if not math.isnan(tsv[2])}
        sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
        ranked = sorted(measured, key=lambda n: (sign * measured[n][2], n))
        chosen = [measured[n][0] for n in ranked[:max(1, len(measured) // REDUCTION_FACTOR)]] if measured else []
        for t in chosen:
            _, step, value = measured[t.number]
            study.enqueue_trial(dict(t.params), user_attrs={CONTINUES: t.number, "surveyed": value, "surveyed_step": step,
                                                            "survey_run_dir": t.user_attrs.get("run_dir")})
        study.set_user_attr("continued", [t.number for t in chosen])
        return [t.number for t in chosen]


def sample(trial: Any, space: dict[str, dict[str, list[str]]], epochs: Sequence[int]) -> tuple[str, dict[str, str], float, int]:
    """The trial's method, the settings it changes, its learning-rate scale and epochs. A setting at the
    method's usual choice (the first of its space) is left out, so the task's own value stands, as in
    ``deltatune train`` and in plan's defaults row: on the recommend task "rank 8" would otherwise replace
    the task's measured LoRA (rank 2 on attention, 4 on the item table) with rank 8 on every linear layer."""
    method = trial.suggest_categorical("method", sorted(space))
    usual = {key: next(iter(choices)) for key, choices in method_space(method).items()}
    picked = {key: trial.suggest_categorical(f"{method}.{key}", names) for key, names in space[method].items()}
    choices = {key: name for key, name in picked.items() if name != usual.get(key)}
    scale = trial.suggest_float("lr_scale", 0.25, 4.0, log=True)
    n = trial.suggest_categorical("epochs", list(epochs)) if len(epochs) > 1 else epochs[0]
    return method, choices, scale, n


def trial_config(base: dict[str, Any], method: str, choices: dict[str, str], scale: float, epochs: int,
                 output: str | None = None, eval_every: int | None = None) -> TrainConfig:
    """The run a trial trains (or the best trial's recipe, without ``output``). A trial validates where
    tune's rungs are (:class:`Report`) and at its epochs' ends: the config's ``eval_every`` is dropped
    unless ``eval_every`` is given."""
    cand = candidate(method, choices)
    start = validate_config(cand.apply(base), source=cand.label)  # the method's starting lr, as `train` picks it
    data = {**cand.apply(base), "lr": float(f"{start.lr * scale:.3g}"), "epochs": epochs}
    if output is not None:
        data["output"] = output
        data["eval_every"] = eval_every
    return validate_config(data, source=f"trial {cand.label}")
