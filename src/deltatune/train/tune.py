"""``deltatune tune``: search methods x their settings under a budget, with early stopping, in a study
that lives in a database.

The search space is the one ``plan`` and ``compare --grid`` use (``space.py``: what each method
declares beside its config), plus a learning-rate scale (log-uniform in [1/4, 4] around the
method's starting rate) and, if asked, the number of epochs. Optuna's TPE sampler picks the next
trial (multivariate, by conditional group, after a third of the trials at random: ``make_sampler``); an ASHA (or Hyperband) pruner stops weak trials at intermediate validations
(multi-fidelity: the resource is the number of validations, ``rungs`` per run).

Budgets are respected before any training. ``tune`` first runs (or reuses) ``plan`` on the same
settings: methods and choices whose predicted cost is over the budget never enter the space, and a
sampled combination is predicted from the plan's rows (the method's defaults plus the change each
chosen setting made on its own; time scaled by epochs). One predicted over budget is not started:
it is recorded as pruned with the reason.

The study is an Optuna RDB storage: ``sqlite:///OUTPUT/study.db`` by default, or any Optuna storage
URL. Optuna hands each trial number to exactly one process (``ask`` is a database insert), so
several processes or machines can work on one study; a trial whose settings another process
already finished reuses that result rather than training again, and one whose settings another
process is training now is skipped. A killed process leaves its trial ``RUNNING``; after the
heartbeat's grace period the next process marks it failed and retries its settings once
(``RetryHeartbeatStaleTrialCallback``). Finished trials stay in the database, so ``--trials N`` run again
continues until N trials have finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deltatune.core.targeting import NoMatchError
from deltatune.train.budget import Budget, parse_budget
from deltatune.train.callbacks import Callback, State
from deltatune.train.config import TrainConfig, validate_config
from deltatune.train.space import FULL, candidate, method_space, parse_methods
from deltatune.train.tasks import get_task

STUDY_DB = "study.db"
LOWER_IS_BETTER = ("loss", "perplexity")
COST_KEYS = ("peak_memory_mb", "step_seconds", "trainable_parameters", "adapter_bytes")
#: ASHA (one successive-halving ladder) rather than Hyperband by default: Hyperband splits a study into
#: brackets, each with its own ladder whose first trials always run to the end, and Optuna's sampler then
#: learns from one bracket's trials only. At the tens of trials a CPU search affords that is most of the
#: study: on sentiment (bench.tune_vs_grid, 10 trials) Hyperband ran 7 of 10 trials to the end (52 % of
#: the compare grid's training examples), ASHA 4 of 10 (42 %) with the same sampled settings.
DEFAULT_PRUNER = "asha"
#: ASHA's and Hyperband's reduction factor: a third of the trials at a rung go on to the next.
REDUCTION_FACTOR = 3
#: Validations per trial. The pruners decide at 1, 3, 9, ... validations (powers of the reduction factor):
#: with 3, one cut at a third of the run and the survivors run to the end. With 4 (the previous default),
#: the second validation decided nothing and the cut at the third came after three quarters of the run
#: was spent. (bench.tune_vs_grid did not record where each pruned trial stopped; that most of them
#: stopped at the third validation is inferred from its 42 % compute share, not counted.)
DEFAULT_RUNGS = 3


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ValueError("deltatune tune needs Optuna: pip install 'deltatune[tune]' (or pip install optuna)") from None
    return optuna


class Pruned(Exception):
    """Raised inside the training loop when the pruner stops a trial."""


class Report(Callback):
    """After each validation: report the headline metric to the trial (step = validation number),
    and stop the run if the pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric, self.seen = trial, metric, 0

    def _check(self, s: State) -> None:
        while self.seen < len(s.history.validation):
            value = s.history.validation[self.seen][self.metric]
            self.seen += 1
            self.trial.report(value, self.seen)
            self.trial.set_user_attr("train_seconds", round(s.history.seconds, 3))
            self.trial.set_user_attr("examples", s.history.examples)
            # After the last step there is nothing left to save: the run completes, its value counts.
            if s.step < s.total and self.trial.should_prune():
                raise Pruned(f"pruned after validation {self.seen} ({self.metric} {value:.4f})")

    def on_step(self, s: State) -> None:
        self._check(s)

    def on_epoch_end(self, s: State) -> None:
        self._check(s)


# --- the space and the predictions ---------------------------------------------------------------


def predict(rows: dict[str, dict[str, Any]], method: str, choices: dict[str, str], epochs: int,
            plan_epochs: int) -> dict[str, Any] | None:
    """Predicted costs of ``method`` with ``choices`` from the plan's rows, which hold the method at its
    defaults and with each setting changed on its own (exact for those). For several changes at once:
    memory and step time add each change's difference; parameters and bytes multiply each change's
    ratio (rank x targets compose as products). ``None`` if a row needed failed in the plan."""
    base = rows.get(method)
    if base is None or base["status"] != "ok":
        return None
    out = {k: base[k] for k in (*COST_KEYS, "total_parameters", "steps_per_epoch")}
    first = {k: next(iter(v)) for k, v in method_space(method).items()}
    for key, name in choices.items():
        if name == first.get(key):
            continue
        row = rows.get(candidate(method, {key: name}).label)
        if row is None or row["status"] != "ok":
            return None
        for k in ("peak_memory_mb", "step_seconds"):
            out[k] = max(out[k] + row[k] - base[k], min(out[k], row[k]))
        for k in ("trainable_parameters", "adapter_bytes"):
            out[k] = out[k] * row[k] / base[k] if base[k] else row[k]
    out["trainable_parameters"] = round(out["trainable_parameters"])
    out["trainable_share"] = out["trainable_parameters"] / out["total_parameters"]
    out["epoch_seconds"] = out["step_seconds"] * out["steps_per_epoch"]
    out["train_seconds"] = out["epoch_seconds"] * epochs + base.get("first_step_extra_seconds", 0.0)  # plan's one-off
    return out


def feasible_space(rows: dict[str, dict[str, Any]], methods: Sequence[str], budget: Budget, epochs: int,
                   plan_epochs: int) -> dict[str, dict[str, list[str]]]:
    """``{method: {field: [choice names]}}``: the choices the plan predicts fit (at ``epochs``) on their
    own; a method enters if its defaults or one of its single changes fit."""
    space = {}
    for method in methods:
        default_fits = predict_fits(rows, method, {}, budget, epochs, plan_epochs) is True
        dims, any_fits = {}, default_fits
        for key, choices in method_space(method).items():
            first, *rest = choices
            names = [first] if default_fits else []
            names += [n for n in rest if predict_fits(rows, method, {key: n}, budget, epochs, plan_epochs)]
            any_fits = any_fits or len(names) > (1 if default_fits else 0)
            dims[key] = names or [first]
        if any_fits:
            space[method] = dims
    return space


def predict_fits(rows: dict[str, dict[str, Any]], method: str, choices: dict[str, str], budget: Budget,
                 epochs: int, plan_epochs: int) -> bool | None:
    cost = predict(rows, method, choices, epochs, plan_epochs)
    return None if cost is None else not budget.over(cost)


# --- the study -------------------------------------------------------------------------------------


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
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=rungs,
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


def sample(trial: Any, space: dict[str, dict[str, list[str]]], epochs: Sequence[int]) -> tuple[str, dict[str, str], float, int]:
    method = trial.suggest_categorical("method", sorted(space))
    choices = {key: trial.suggest_categorical(f"{method}.{key}", names) for key, names in space[method].items()}
    scale = trial.suggest_float("lr_scale", 0.25, 4.0, log=True)
    n = trial.suggest_categorical("epochs", list(epochs)) if len(epochs) > 1 else epochs[0]
    return method, choices, scale, n


def trial_config(base: dict[str, Any], method: str, choices: dict[str, str], scale: float, epochs: int,
                 output: str | None = None, eval_every: int | None = None) -> TrainConfig:
    """The run a trial trains (or the best trial's recipe, without ``output``/``eval_every``)."""
    cand = candidate(method, choices)
    start = validate_config(cand.apply(base), source=cand.label)  # the method's starting lr, as `train` picks it
    data = {**cand.apply(base), "lr": float(f"{start.lr * scale:.3g}"), "epochs": epochs}
    if output is not None:
        data["output"] = output
    if eval_every is not None:
        data["eval_every"] = eval_every
    return validate_config(data, source=f"trial {cand.label}")


def _same(a: Any, b: Any) -> bool:
    pa = {k: v for k, v in a.params.items() if k != "lr_scale"}
    pb = {k: v for k, v in b.params.items() if k != "lr_scale"}
    return pa == pb and math.isclose(a.params.get("lr_scale", 0), b.params.get("lr_scale", 0), rel_tol=1e-9)


def _steps_per_epoch(config: TrainConfig, examples: int) -> int:
    return math.ceil(examples / (config.batch_size * config.gradient_accumulation))


def run_tune(overrides: Sequence[str] = (), methods: str | Sequence[str] = "all", budget: str | Budget | None = None,
             trials: int = 20, output: str | Path = "runs/tune", storage: str | None = None,
             study_name: str | None = None, pruner: str = DEFAULT_PRUNER, rungs: int = DEFAULT_RUNGS,
             epochs: Sequence[int] | None = None, seed: int = 0, probe_steps: int = 3, heartbeat: int = 30,
             keep_runs: bool = False, say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run trials until ``trials`` have finished in the study, then write the reports. Returns ``tune.json``'s dict."""
    from deltatune.train.plan import PLAN_FILE, base_data, run_plan
    from deltatune.train.run import run_training
    from deltatune.train.tune_report import summarise, write_reports

    optuna = _optuna()
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    names = parse_methods(methods)
    base = base_data(overrides)
    first = validate_config(dict(base), source="tune")
    epochs = list(epochs or [first.epochs])
    if any(e < 1 for e in epochs):
        raise ValueError(f"--epochs must be positive, got {epochs}")
    task = get_task(first.task)
    metric = task.headline
    direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / STUDY_DB).resolve()}"
    key = _settings_key(base, names, budget, epochs)
    study = open_study(storage, study_name or f"tune-{key}", direction, pruner, rungs, seed, heartbeat, trials)
    _check_settings(study, key, {"overrides": list(overrides), "methods": names, "budget": budget.text,
                                 "epochs": epochs})

    plan: dict[str, Any] = {"model": first.model, "task": first.task, "epochs": first.epochs, "rows": []}
    if budget:  # costs are predicted only to respect a budget: without one, no probe is spent
        plan_file = out / PLAN_FILE
        saved = json.loads(plan_file.read_text()) if plan_file.is_file() else None
        if saved is not None and saved.get("settings_key") == key:
            plan = saved
        else:
            say("tune: predicting every option's cost first (deltatune plan)")
            plan = run_plan(overrides, names, "all", budget, probe_steps, None, say=say) | {"settings_key": key}
            from deltatune.core.files import write_text_atomic

            write_text_atomic(plan_file, json.dumps(plan, indent=2) + "\n")
        rows = {r["label"]: r for r in plan["rows"]}
        space = feasible_space(rows, names, budget, min(epochs), plan["epochs"])
    else:
        rows = {}
        space = {m: {k: list(v) for k, v in method_space(m).items()} for m in names}
    if not space:
        from deltatune.train.plan import no_fit_message

        raise ValueError(no_fit_message(plan) or f"no method fits the budget {budget.text}")
    per_epoch = _steps_per_epoch(first, len(task.load_splits(first).train))  # for the validations' spacing
    if enqueue_default(study, space, first.method, epochs, first.epochs):
        say(f"tune: trial 0 is what `deltatune train` runs here ({first.method} at its defaults, lr {first.lr:g})")
    say(f"tune: study {study.study_name!r} in {storage}; methods that fit: {', '.join(sorted(space))}")

    def objective(trial: Any) -> float:
        method, choices, scale, n_epochs = sample(trial, space, epochs)
        label = candidate(method, choices).label
        trial.set_user_attr("label", label)
        trial.set_user_attr("pid", os.getpid())
        for other in study.get_trials(deepcopy=False):
            if other.number == trial.number or not _same(other, trial):
                continue
            if other.state == optuna.trial.TrialState.COMPLETE:  # finished elsewhere: reuse, do not retrain
                trial.set_user_attr("duplicate_of", other.number)
                for k in ("train_seconds", "examples", "trainable_parameters", "test_metric"):
                    if k in other.user_attrs:
                        trial.set_user_attr(k, other.user_attrs[k])
                trial.set_user_attr("train_seconds_spent", 0.0)
                say(f"trial {trial.number}: {label} lr x{scale:.3g} = trial {other.number}'s settings; reusing its result")
                return other.value
            if other.state == optuna.trial.TrialState.RUNNING:
                trial.set_user_attr("skipped", f"trial {other.number} is training these settings now")
                raise optuna.TrialPruned(f"trial {other.number} is training these settings")
        cost = predict(rows, method, choices, n_epochs, plan["epochs"]) if budget else None
        if budget and (cost is None or budget.over(cost)):
            why = "could not be predicted" if cost is None else f"predicted over budget on {', '.join(budget.over(cost))}"
            trial.set_user_attr("skipped", why)
            say(f"trial {trial.number}: {label}: not started, {why}")
            raise optuna.TrialPruned(why)
        if cost is not None:
            trial.set_user_attr("predicted", {k: cost[k] for k in ("peak_memory_mb", "train_seconds")})
        # What `deltatune train` runs for these settings: the best trial's becomes best.yaml.
        trial.set_user_attr("recipe", trial_config(base, method, choices, scale, n_epochs).model_dump(mode="json"))
        steps = per_epoch * n_epochs
        run_dir = out / "trials" / f"{trial.number:04d}-{candidate(method, choices).slug}"
        config = trial_config(base, method, choices, scale, n_epochs, str(run_dir), max(1, math.ceil(steps / rungs)))
        say(f"trial {trial.number}: {label}, lr {config.lr:g}, {n_epochs} epoch(s) (process {os.getpid()})")
        try:
            metrics = run_training(config, progress=False, overwrite=True, callbacks=[Report(trial, metric)])
        except Pruned as why:
            say(f"trial {trial.number}: {why}")
            trial.set_user_attr("train_seconds_spent", trial.user_attrs.get("train_seconds", 0.0))
            raise optuna.TrialPruned(str(why)) from None
        except NoMatchError as err:  # the method has nothing to attach to in this model (no plan ran to say so)
            trial.set_user_attr("skipped", f"does not apply: {err}")
            say(f"trial {trial.number}: {label} does not apply to this model: {err}")
            raise optuna.TrialPruned(f"does not apply: {err}") from None
        finally:
            if not keep_runs:
                shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        value = metrics["validation"][-1][metric]
        for k, v in (("train_seconds", metrics["train_seconds"]), ("train_seconds_spent", metrics["train_seconds"]),
                     ("examples", round(metrics["examples_per_second"] * metrics["train_seconds"])),
                     ("trainable_parameters", metrics["trainable_parameters"]),
                     ("trainable_share", metrics["trainable_parameters"] / metrics["total_parameters"]),
                     ("adapter_bytes", metrics["adapter_bytes"]), ("peak_memory_mb", metrics["peak_memory_mb"]),
                     ("test_metric", metrics.get(f"test_{metric}")), ("lr", config.lr), ("run_dir", str(run_dir))):
            trial.set_user_attr(k, v)
        say(f"trial {trial.number}: validation {metric} {value:.4f}")
        return value

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if done < trials:
        study.optimize(objective, n_trials=trials - done, catch=(),
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished)])
    result = summarise(study, base, metric, direction, budget, storage, plan)  # tune_report
    write_reports(result, out)
    return result

