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
import random
import warnings
from collections.abc import Sequence
from typing import Any

from deltatune.train.budget import Budget
from deltatune.train.space import method_space

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


def _create(optuna: Any, store: Any, name: str, direction: str, pruner: str, rungs: int, sampler: Any) -> Any:
    pruners = {
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=REDUCTION_FACTOR ** (rungs - 1),
                                                            reduction_factor=REDUCTION_FACTOR),
        "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=REDUCTION_FACTOR),
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


def enqueue_default(study: Any, space: dict[str, dict[str, list[str]]], method: str, epochs: Sequence[int],
                    default_epochs: int) -> bool:
    """Make a new study's first trial what ``deltatune train`` runs on these settings: the config's method
    at its declared defaults and its starting learning rate (scale 1). Every later trial is then measured
    against a sound reference (the pruner's first rung value), and the pick is never worse on validation
    than not tuning. Skipped when the study has trials already or the defaults are not in the space
    (over the budget). Returns whether it enqueued."""
    if study.get_trials(deepcopy=False) or method not in space:
        return False
    params: dict[str, Any] = {"method": method}
    for key, choices in method_space(method).items():
        usual = next(iter(choices))
        if usual not in space[method].get(key, ()):
            return False
        params[f"{method}.{key}"] = usual
    params["lr_scale"] = 1.0
    if len(epochs) > 1:
        params["epochs"] = default_epochs if default_epochs in epochs else epochs[0]
    study.enqueue_trial(params, skip_if_exists=True)
    return True


def enqueue_survey(study: Any, space: dict[str, dict[str, list[str]]], skip: str, count: int, seed: int) -> list[str]:
    """Enqueue ``count`` trials of distinct methods (not ``skip``, the default trial's), drawn in an order
    ``seed`` fixes, each at its suggested learning rate (scale 1), its settings left to the sampler.
    At random, a short search draws some methods twice and others never, at rates up to 4x off the one
    each method declares: a survey spends the random phase on the question it can answer, which methods
    suit this task. Returns the methods enqueued."""
    methods = sorted(m for m in space if m != skip)
    random.Random(seed).shuffle(methods)
    for method in methods[:count]:
        study.enqueue_trial({"method": method, "lr_scale": 1.0}, skip_if_exists=True)
    return methods[:count]
