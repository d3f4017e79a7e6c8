"""``deltatune tune``: search methods x their settings under a budget, with early stopping, in a study
that lives in a database.

The search space is the one ``plan`` and ``compare --grid`` use (``space.py``: what each method
declares beside its config), plus a learning-rate scale (log-uniform in [1/4, 4] around the
method's starting rate) and, if asked, the number of epochs. Optuna's TPE sampler picks the next
trial (multivariate, by conditional group, after a third of the trials: ``make_sampler``); an ASHA
(or Hyperband) pruner stops weak trials at the rungs of a ladder (multi-fidelity: the resource is the
share of the run trained; ``rungs`` rungs at ..., 1/9, 1/3 and all of it: :func:`rung_steps`).
A new study starts with what ``deltatune train`` runs (the config's method at its defaults), then
surveys other methods, each once, at their suggested learning rates (``enqueue_survey``), before the
sampler models the results.

Budgets are respected before any training. ``tune`` first runs (or reuses) ``plan`` on the same
settings: methods and choices whose predicted cost is over the budget never enter the space, and a
sampled combination is predicted from the plan's rows (the method's defaults plus the change each
chosen setting made on its own; time scaled by epochs). One predicted over budget is not started:
it is recorded as pruned with the reason.

The study is an Optuna RDB storage (``tune_study.py``: SQLite by default, or any Optuna storage URL),
so several processes or machines can work on one study; a trial whose settings another process
already finished reuses that result rather than training again, and one whose settings another
process is training now is skipped. Finished trials stay in the database, so ``--trials N`` run again
continues until N trials have finished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deltatune.core.targeting import NoMatchError
from deltatune.train.budget import Budget, parse_budget
from deltatune.train.callbacks import Callback, Checkpoint, State
from deltatune.train.checkpoint import latest_checkpoint
from deltatune.train.config import validate_config
from deltatune.train.space import candidate, method_space, parse_methods
from deltatune.train.tasks import get_task
from deltatune.train.tune_cost import feasible_space, predict
from deltatune.train.tune_report import FORWARD_SHARE  # noqa: F401  (re-exported: the compute tune reports)
from deltatune.train.tune_study import (  # noqa: F401  (re-exported: tune's public names)
    CONTINUES,
    DEFAULT_PRUNER,
    SURVEY,
    REDUCTION_FACTOR,
    _creating,
    _optuna,
    _check_settings,
    _settings_key,
    drop_survey_checkpoints,
    enqueue_continuations,
    enqueue_default,
    enqueue_survey,
    make_sampler,
    open_study,
    sample,
    startup_trials,
    survey_size,
    trial_config,
)

STUDY_DB = "study.db"
LOWER_IS_BETTER = ("loss", "perplexity")
#: Rungs per trial: validations at 1/REDUCTION_FACTOR**k of the run (k = rungs-1, ..., 1, 0), reported
#: to the pruner at step REDUCTION_FACTOR**(rungs-1-k) (the training done, in first rungs), where ASHA
#: decides. With 3: 1/9 of the run (where the survey measures every method), a third, then the end.
#: With 2 the survey's rung was at a third of the run: surveying 16 methods there cost 29 % of the compare
#: grid's compute before any method ran to its end (bench.tune_vs_grid).
DEFAULT_RUNGS = 3
#: Validation items an early rung measures on (spread over the split; the last rung uses all of them).
#: An early rung only needs to tell clear losers from the rest: 256 items give a standard error of about
#: 3 points on an accuracy near 60 %, and cost a quarter of a 1,024-item validation.
EARLY_VALIDATION = 256
#: Validation items the survey's first rung measures on: every applicable method is surveyed there, so
#: its cost is paid once per method. 128 items (standard error ~4.4 points near 50 %, the same items for
#: every method) are enough to keep the best third; they cost a third of a 1/9 rung's training.
SURVEY_VALIDATION = 128



class Pruned(Exception):
    """Raised inside the training loop when the pruner stops a trial."""


def rung_steps(total: int, rungs: int) -> dict[int, int]:
    """``{step: resource}``: the steps at 1/9, 1/3, 1 ... of a ``total``-step run (``rungs`` of them, the
    last at ``total``), each with the training done in first rungs (1, 3, 9, ...), which is the step it
    is reported at: ASHA and Hyperband (min_resource 1) decide exactly there. Early rungs that fall on
    the same step or on the end of a short run merge into the later one."""
    out: dict[int, int] = {}
    for k in range(rungs):
        resource = REDUCTION_FACTOR ** k
        step = total if k == rungs - 1 else max(1, math.ceil(total * resource / REDUCTION_FACTOR ** (rungs - 1)))
        if step < total or k == rungs - 1:
            out = {st: r for st, r in out.items() if st != step} | {step: resource}
    return out


class Surveyed(Exception):
    """Raised inside the training loop when a survey trial has reached the first rung (its checkpoint kept)."""


class Report(Callback):
    """At each early rung (:func:`rung_steps`), validate on ``sample`` items spread over the validation
    split, report the headline metric to the trial and stop the run if the pruner says so; at the end,
    report the loop's own validation on the whole split (the trial's value). Counts what the trial itself
    spends (``examples``, ``validation_examples``, ``train_seconds_spent``): a resumed run's history
    starts with what the run before it spent, which that trial counted.

    ``survey``: stop at the first rung (validated on ``survey_sample`` items), after writing a checkpoint
    there for a continuation to resume from. ``known``: ``(resource, value)`` at the first rung, measured by the survey
    trial of the same settings; reported, not measured again."""

    def __init__(self, trial: Any, metric: str, rungs: int = DEFAULT_RUNGS, sample: int = EARLY_VALIDATION,
                 validation_items: int = 0, survey: bool = False, known: tuple[int, float] | None = None,
                 survey_sample: int = SURVEY_VALIDATION) -> None:
        self.trial, self.metric, self.rungs, self.sample = trial, metric, rungs, sample
        self.size, self.early, self.steps = validation_items, 0, {}
        self.survey, self.known, self.survey_sample = survey, known, survey_sample
        self.start = (0, 0.0, 0)  # examples, seconds, validations the history held at the start (a resume)
        self.examples = 0  # training examples this trial has trained (exact; metrics.json's rate x seconds is rounded)

    def on_start(self, s: State) -> None:
        self.steps = rung_steps(s.total, self.rungs)
        self.start = (s.history.examples, s.history.seconds, len(s.history.validation))
        if self.known is not None:
            self.trial.report(self.known[1], self.known[0])

    def spent(self, s: State) -> tuple[int, float, int]:
        examples, seconds, validations = self.start
        return (s.history.examples - examples, round(s.history.seconds - seconds, 3),
                self.early + (len(s.history.validation) - validations) * self.size)

    def _record(self, s: State) -> None:
        examples, seconds, validation = self.spent(s)
        self.examples = examples
        self.trial.set_user_attr("train_seconds", round(s.history.seconds, 3))
        self.trial.set_user_attr("train_seconds_spent", seconds)
        self.trial.set_user_attr("examples", examples)
        self.trial.set_user_attr("validation_examples", validation)

    def on_step(self, s: State) -> None:
        resource = self.steps.get(s.step)
        if resource is None or s.step >= s.total or s.validate_sample is None:
            return
        if self.known is not None and resource == self.known[0]:
            return  # measured in the survey
        sample = self.survey_sample if self.survey else self.sample
        value = s.validate_sample(sample)[self.metric]
        self.early += min(sample, self.size) if self.size else sample
        self.trial.report(value, resource)
        self._record(s)
        if self.survey:
            Checkpoint().save(s)  # where a continuation resumes
            raise Surveyed(f"surveyed: {self.metric} {value:.4f} on {sample} validation items at "
                           f"{resource}/{max(self.steps.values())} of the run")
        if self.trial.should_prune():
            raise Pruned(f"pruned at {resource}/{max(self.steps.values())} of the run ({self.metric} {value:.4f} "
                         f"on {sample} validation items)")

    def on_epoch_end(self, s: State) -> None:
        self._record(s)
        if s.step >= s.total and s.history.validation:  # the end: reported, never pruned (nothing left to save)
            self.trial.report(s.history.validation[-1][self.metric], max(self.steps.values()))


# --- the space ----------------------------------------------------------------------------------


def applicable(base: dict[str, Any], names: Sequence[str], splits: Any, task: Any) -> tuple[list[str], dict[str, str]]:
    """The methods of ``names`` that can train on this model and task, and why each other cannot, decided
    before any trial by what a run does first: its config is validated (a method the task refuses), then
    its adapter is attached to the model and detached again (a *dry attach*: the model is loaded once,
    nothing trains; a method with nothing to attach to, such as a visual prompt on a text model, raises
    there). The core's ``detach`` restores the module tree, so one loaded model serves every method."""
    import deltatune as dt
    from deltatune.train.models import load_model, prepare

    fine, why = [], {}
    configs = {}
    for method in names:
        try:
            configs[method] = trial_config(base, method, {}, 1.0, 1)
        except ValueError as err:
            why[method] = str(err)
    if not configs:
        return fine, why
    first = next(iter(configs.values()))
    loaded = load_model(first.model, task, splits.labels, first)
    for method, config in configs.items():
        try:
            prepare(loaded, config, "dry_attach")
        except ValueError as err:  # NoMatchError and the other refusals at attach time
            why[method] = f"{type(err).__name__}: {err}"
        else:
            fine.append(method)
        finally:
            if dt.configs(loaded.model):
                dt.detach(loaded.model)
    del loaded
    return fine, why


def _same(a: Any, b: Any) -> bool:
    pa = {k: v for k, v in a.params.items() if k != "lr_scale"}
    pb = {k: v for k, v in b.params.items() if k != "lr_scale"}
    return pa == pb and math.isclose(a.params.get("lr_scale", 0), b.params.get("lr_scale", 0), rel_tol=1e-9)


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
    from deltatune.train.output import check_output_for

    check_output_for(out, "tune", (STUDY_DB, f"{STUDY_DB}.lock", f"{STUDY_DB}-journal", f"{STUDY_DB}-wal",
                                   f"{STUDY_DB}-shm", PLAN_FILE, "trials", "tune.json", "tune.md", "best.yaml",
                                   "pareto.png"))
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / STUDY_DB).resolve()}"
    key = _settings_key(base, names, budget, epochs)
    study = open_study(storage, study_name or f"tune-{key}", direction, pruner, rungs, seed, heartbeat, trials)
    _check_settings(study, key, {"overrides": list(overrides), "methods": names, "budget": budget.text,
                                 "epochs": epochs})

    splits = task.load_splits(first)  # before any model loads: bad data fails first
    left_out: dict[str, str] = {}  # method -> why it cannot apply here
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
    else:  # no plan: a dry attach decides what applies (with a budget, plan's rows say "not applicable")
        rows = {}
        fine, left_out = applicable(base, names, splits, task)
        for method, reason in left_out.items():
            say(f"tune: {method} does not apply here, left out of the search: {reason}")
        if not fine:
            raise ValueError(f"no method of {', '.join(names)} applies to {first.model} on task {first.task}: "
                             f"{next(iter(left_out.values()))}")
        space = {m: {k: list(v) for k, v in method_space(m).items()} for m in fine}
    if not space:
        from deltatune.train.plan import no_fit_message

        raise ValueError(no_fit_message(plan) or f"no method fits the budget {budget.text}")
    fresh = not study.get_trials(deepcopy=False)
    # The survey: with ASHA, every method (as many as `trials` allows) at its usual settings stops at the
    # first rung, then the best third go on (enqueue_continuations). Other pruners: a shorter survey of
    # whole trials, as the sampler's random phase.
    stopping = pruner == "asha" and rungs > 1
    count = survey_size(trials, len(space)) if stopping else startup_trials(trials)
    if count and enqueue_default(study, space, first.method, epochs, first.epochs, survey=stopping):
        say(f"tune: trial 0 is what `deltatune train` runs here ({first.method} at this task's defaults, lr {first.lr:g})")
    if fresh and count and (survey := enqueue_survey(study, space, first.method, count - 1, seed, epochs,
                                                     first.epochs, survey=stopping)):
        say(f"tune: then a survey at the methods' usual settings and suggested learning rates"
            f"{' to the first rung' if stopping else ''}: {', '.join(survey)}")
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
                trial.set_user_attr("validation_examples", 0)
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
        surveying = bool(trial.user_attrs.get(SURVEY)) and stopping
        known = (trial.user_attrs["surveyed_step"], trial.user_attrs["surveyed"]) if CONTINUES in trial.user_attrs else None
        run_dir = out / "trials" / f"{trial.number:04d}-{candidate(method, choices).slug}"
        resume = False
        if known is not None and trial.user_attrs.get("survey_run_dir"):  # resume where the survey trial stopped
            resume = latest_checkpoint(Path(trial.user_attrs["survey_run_dir"]) / "checkpoint") is not None
            run_dir = Path(trial.user_attrs["survey_run_dir"]) if resume else run_dir  # else (another machine's): anew
        trial.set_user_attr("run_dir", str(run_dir))
        config = trial_config(base, method, choices, scale, n_epochs, str(run_dir))
        report = Report(trial, metric, rungs, EARLY_VALIDATION, len(splits.validation), survey=surveying, known=known)
        say(f"trial {trial.number}: {label}, lr {config.lr:g}, {n_epochs} epoch(s) (process {os.getpid()})"
            + (" to the first rung (survey)" if surveying else "")
            + (f", continuing trial {trial.user_attrs[CONTINUES]}" if known is not None else "")
            + (" from its checkpoint" if resume else ""))
        keep = False
        try:
            metrics = run_training(config, resume=resume, overwrite=not resume, progress=False, callbacks=[report])
        except Surveyed as why:
            say(f"trial {trial.number}: {why}")
            keep = True  # the checkpoint a continuation resumes from (removed when the survey is decided)
            raise optuna.TrialPruned(str(why)) from None
        except Pruned as why:
            say(f"trial {trial.number}: {why}")
            raise optuna.TrialPruned(str(why)) from None
        except NoMatchError as err:  # the method has nothing to attach to in this model (no plan ran to say so)
            trial.set_user_attr("skipped", f"does not apply: {err}")
            say(f"trial {trial.number}: {label} does not apply to this model: {err}")
            raise optuna.TrialPruned(f"does not apply: {err}") from None
        finally:
            if not keep_runs and not keep:
                shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        value = metrics["validation"][-1][metric]
        _, s_seconds, _ = report.start
        for k, v in (("train_seconds", metrics["train_seconds"]),
                     ("train_seconds_spent", round(metrics["train_seconds"] - s_seconds, 3)),
                     ("examples", report.examples),
                     ("trainable_parameters", metrics["trainable_parameters"]),
                     ("trainable_share", metrics["trainable_parameters"] / metrics["total_parameters"]),
                     ("adapter_bytes", metrics["adapter_bytes"]), ("peak_memory_mb", metrics["peak_memory_mb"]),
                     ("test_metric", metrics.get(f"test_{metric}")), ("lr", config.lr), ("run_dir", str(run_dir))):
            trial.set_user_attr(k, v)
        say(f"trial {trial.number}: validation {metric} {value:.4f}")
        return value

    def decide_survey(study: Any, _trial: Any) -> None:  # after each trial: once the survey is complete
        chosen = enqueue_continuations(study, storage)
        if chosen:
            say(f"tune: the survey is complete; trials {', '.join(map(str, chosen))} go on")
            drop_survey_checkpoints(study, chosen)

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if stopping:
        decide_survey(study, None)  # a resumed study whose survey finished before the continuations were chosen
    if done < trials:
        study.optimize(objective, n_trials=trials - done, catch=(),
                       callbacks=[decide_survey, optuna.study.MaxTrialsCallback(trials, states=finished)])
    result = summarise(study, base, metric, direction, budget, storage, plan)  # tune_report
    result["not_applicable"] = left_out or {r["method"]: r["error"] for r in plan["rows"]
                                            if r.get("status") == "not applicable" and not r.get("choices")}
    write_reports(result, out)
    return result

