"""``deltatune tune`` on a tiny random BERT: a study in SQLite, budgets respected before training,
the Pareto front and a best.yaml that ``deltatune train`` runs; a SIGKILLed search resumes without
losing finished trials; two processes on one study never train the same trial."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

optuna = pytest.importorskip("optuna")

from deltatune.cli import app  # noqa: E402
from deltatune.train.budget import parse_budget  # noqa: E402
from deltatune.train.tune import _creating, enqueue_default, run_tune  # noqa: E402
from deltatune.train.tune_cost import feasible_space, predict  # noqa: E402
from deltatune.train.tune_report import pareto_front  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def shared(model: Path, data: Path) -> list[str]:
    return [f"model={model}", "task=classification", f"data.path={data}", "epochs=1", "batch_size=8",
            "precision=fp32"]


def cli_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for s in shared(model, data)[1:] for a in ("--set", s)]
    return ["tune", str(model), *sets, "--probe-steps", "1", "--rungs", "2", "-o", str(out), *extra]


def test_tune_search_reports_and_recipe(tiny_bert: Path, tiny_csv: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "tune"
    result = run_tune(shared(tiny_bert, tiny_csv), "lora,bitfit", "params=20%", trials=3, output=out, rungs=2,
                      probe_steps=1, say=lambda _: None)
    # lora at its defaults trains 28% of this tiny model: over the budget, never trained; bitfit (3.7%),
    # lora rank=4 (16.5%) and lora on the attention's query and value (10.8%) fit.
    plan = {r["label"]: r for r in json.loads((out / "plan.json").read_text())["rows"]}
    assert not plan["lora"]["fits"] and plan["bitfit"]["fits"] and plan["lora rank=4"]["fits"]
    trained = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    assert trained and all(t["trainable_share"] <= 0.2 for t in trained)
    for t in result["trials"]:
        if t["label"] and t["label"].startswith("lora"):
            assert "rank=8 target=all-linear" not in t["label"]
    assert (out / "study.db").is_file() and result["storage"].startswith("sqlite:///")
    # Each trained trial validated on a sample at a third of its run (step 1) and on the whole split at
    # its end (step 3); the compute counts those validation items, at a third of a training example each.
    for t in trained:
        assert sorted(optuna.load_study(study_name=result["study"], storage=result["storage"])
                      .trials[t["number"]].intermediate_values) == [1, 3]
    spent = result["compute"]
    assert spent["validation_examples"] == sum(t["validation_examples"] for t in result["trials"]
                                               if t["validation_examples"]) > 0
    assert spent["example_equivalents"] == round(spent["examples"] + spent["validation_examples"] / 3)
    saved = json.loads((out / "tune.json").read_text())
    assert len(saved["trials"]) >= 3 and saved["best"]["number"] == result["best"]["number"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Pareto front" in (out / "tune.md").read_text()
    # best.yaml is a recipe `deltatune train` runs as is.
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(app, ["train", str(out / "best.yaml"), "--output", str(tmp_path / "again"),
                                   "--no-progress"])
    assert run.exit_code == 0, run.output
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == result["best"]["trainable_parameters"]


def test_first_trial_is_what_train_runs(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    """Trial 0 of a new study is the config's method at its defaults and its starting lr: the reference
    every later trial meets at the pruner's rungs, so the pick is never worse than not tuning (on validation)."""
    from deltatune.train.config import load_config

    result = run_tune(shared(tiny_bert, tiny_csv), "lora,bitfit", None, trials=2, output=tmp_path / "t",
                      rungs=2, pruner="none", seed=3, say=lambda _: None)
    first = result["trials"][0]
    assert first["label"] == "lora" and first["params"]["lr_scale"] == 1.0  # the defaults: no setting changed
    assert first["lr"] == load_config(None, shared(tiny_bert, tiny_csv)).lr
    assert result["trials"][1]["params"] != first["params"]  # then the sampler's own choices


def test_a_method_that_cannot_apply_never_gets_a_trial(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    """Decided before any trial, by a dry attach (no plan runs without a budget): visual_prompt has nothing
    to attach to in a text model, so it is left out of the space with the reason and costs no trial slot;
    a search of it alone is refused in one line, before any training."""
    result = run_tune(shared(tiny_bert, tiny_csv), "bitfit,visual_prompt", None, trials=2, output=tmp_path / "t",
                      rungs=2, pruner="none", say=lambda _: None)
    assert [t["label"] for t in result["trials"]] == ["bitfit", "bitfit"]
    assert all(t["state"] == "COMPLETE" for t in result["trials"])
    assert result["not_applicable"]["visual_prompt"].startswith("NoMatchError: visual_prompt found no")
    with pytest.raises(ValueError, match="no method of visual_prompt applies to .* visual_prompt found no"):
        run_tune(shared(tiny_bert, tiny_csv), "visual_prompt", None, trials=1, output=tmp_path / "v",
                 say=lambda _: None)
    assert not (tmp_path / "v" / "trials").exists()


def test_default_trial_is_enqueued_once_and_only_within_the_space() -> None:
    study = optuna.create_study(direction="maximize")
    space = {"lora": {"rank": ["4"], "target": ["all-linear"]}, "bitfit": {}}  # lora's usual rank 8 is over budget
    assert not enqueue_default(study, space, "lora", [1], 1)
    assert not enqueue_default(study, {"bitfit": {}}, "lora", [1], 1)  # the method itself is out
    space["lora"]["rank"] = ["8", "4"]
    assert enqueue_default(study, space, "lora", [1, 2], 2)
    assert study.get_trials()[0].system_attrs["fixed_params"] == {"method": "lora", "lora.rank": "8", "lora.target": "all-linear",
                                            "lr_scale": 1.0, "epochs": 2}
    assert not enqueue_default(study, space, "lora", [1, 2], 2)  # a study with trials keeps them


def test_default_pruner_is_one_successive_halving_ladder(tmp_path: Path) -> None:
    """ASHA by default (the reason beside DEFAULT_PRUNER); the command line and the library agree."""
    import inspect

    from deltatune.cli.tune import tune
    from deltatune.train.tune import DEFAULT_PRUNER, open_study

    assert DEFAULT_PRUNER == "asha" == inspect.signature(tune).parameters["pruner"].default
    assert inspect.signature(run_tune).parameters["pruner"].default == DEFAULT_PRUNER
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", "maximize", DEFAULT_PRUNER, 4, 0, 60)
    assert type(study.pruner).__name__ == "Halving"  # ASHA that counts a continuation once (tested below)


def test_default_rungs_put_every_validation_where_the_pruner_decides() -> None:
    """A trial validates at 1/9, 1/3 and all of its run (as many rungs as asked), reported at step 1, 3, 9:
    the training done in first rungs, where ASHA and Hyperband (min_resource 1) decide; no validation
    the pruner does not use. The default, one cut at a third of the run, agrees on the command line."""
    import inspect

    from deltatune.cli.tune import tune
    from deltatune.train.tune import DEFAULT_RUNGS, rung_steps

    assert DEFAULT_RUNGS == 3 == inspect.signature(tune).parameters["rungs"].default
    assert inspect.signature(run_tune).parameters["rungs"].default == DEFAULT_RUNGS
    assert rung_steps(30, 2) == {10: 1, 30: 3}
    assert rung_steps(30, 3) == {4: 1, 10: 3, 30: 9}
    assert rung_steps(30, 1) == {30: 1}
    assert rung_steps(2, 3) == {1: 3, 2: 9}  # a short run: rungs on one step merge, the last is the end
    assert rung_steps(1, 2) == {1: 3}


class _Trial:
    """A trial whose pruner says ``prune``; records what was reported and set."""

    def __init__(self, prune: bool = True) -> None:
        self.prune, self.reported, self.attrs = prune, [], {}

    def report(self, value: float, step: int) -> None:
        self.reported.append((value, step))

    def set_user_attr(self, key: str, value: object) -> None:
        self.attrs[key] = value

    def should_prune(self) -> bool:
        return self.prune


def _state(step: int, total: int, validation: list, sampled: list) -> object:
    from types import SimpleNamespace

    from deltatune.train.callbacks import History

    def validate_sample(n: int) -> dict:
        sampled.append(n)
        return {"accuracy": 0.4}
    return SimpleNamespace(step=step, total=total, history=History(validation=validation, examples=8 * step),
                           validate_sample=validate_sample)


def test_early_rungs_validate_on_a_sample_and_the_last_is_never_pruned() -> None:
    """An early rung validates on EARLY_VALIDATION items and may stop the run; the end reports the
    loop's own validation on the whole split (stopping after the last step would save nothing and drop
    the result); the validation items spent are counted."""
    from deltatune.train.tune import Pruned, Report

    trial, sampled = _Trial(prune=False), []
    report = Report(trial, "accuracy", rungs=2, sample=256, validation_items=1000)
    report.on_start(_state(0, 30, [], sampled))
    for step in (1, 9, 10, 11):
        report.on_step(_state(step, 30, [], sampled))
    assert sampled == [256] and trial.reported == [(0.4, 1)]
    report.on_step(_state(30, 30, [], sampled))  # the last step: the loop validates at the epoch's end
    report.on_epoch_end(_state(30, 30, [{"accuracy": 0.5}], sampled))
    assert sampled == [256] and trial.reported == [(0.4, 1), (0.5, 3)]
    assert trial.attrs["validation_examples"] == 256 + 1000 and trial.attrs["examples"] == 240
    stopping = Report(_Trial(prune=True), "accuracy", rungs=2, sample=256, validation_items=100)
    stopping.on_start(_state(0, 30, [], sampled))
    with pytest.raises(Pruned):
        stopping.on_step(_state(10, 30, [], sampled))
    assert stopping.trial.attrs["validation_examples"] == 100  # a sample larger than the split is all of it


def test_a_sample_of_the_validation_split_is_spread_over_it() -> None:
    from deltatune.train.loop import spread

    assert spread(list(range(10)), 4) == [0, 2, 5, 7] and spread([1, 2], 5) == [1, 2]


def test_a_new_study_surveys_distinct_methods_at_their_suggested_rates() -> None:
    """After the default trial, the survey takes each method once (in an order the seed fixes), at its usual
    settings (the first choice each declares) and learning-rate scale 1."""
    from deltatune.train.tune import enqueue_survey

    space = {m: {} for m in ("lora", "bitfit", "ia3", "ln", "oft")}
    study = optuna.create_study(direction="maximize")
    picked = enqueue_survey(study, space, "lora", 3, seed=1)
    assert len(set(picked)) == 3 and "lora" not in picked
    usual = {"lora": {"lora.rank": "8", "lora.target": "all-linear"}, "oft": {"oft.block_size": "32"}}
    assert [t.system_attrs["fixed_params"] for t in study.get_trials()] == [
        {"method": m, **usual.get(m, {}), "lr_scale": 1.0} for m in picked]
    assert enqueue_survey(optuna.create_study(), space, "lora", 3, seed=1) == picked
    assert sorted(enqueue_survey(optuna.create_study(), space, "lora", 10, seed=2)) == ["bitfit", "ia3", "ln", "oft"]


def test_the_sampler_models_the_results_after_a_third_of_the_trials(tmp_path: Path) -> None:
    """Optuna's TPE default samples its first 10 trials at random: a 10-trial search was a random search."""
    from deltatune.train.tune import open_study, startup_trials

    assert [startup_trials(n) for n in (4, 10, 20, 30, 100)] == [3, 3, 6, 10, 10]
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", "maximize", "asha", 3, 0, 60, trials=12)
    sampler = study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == 4 and sampler._multivariate and sampler._group and sampler._constant_liar


@pytest.fixture()
def rows() -> dict:
    base = {"status": "ok", "peak_memory_mb": 500.0, "step_seconds": 0.1, "trainable_parameters": 1000,
            "adapter_bytes": 5000, "total_parameters": 100_000, "steps_per_epoch": 100}
    return {
        "lora": base,
        "lora rank=4": {**base, "trainable_parameters": 500, "adapter_bytes": 2500},
        "lora rank=16": {**base, "trainable_parameters": 2000, "adapter_bytes": 10_000, "step_seconds": 0.12},
        "lora target=attention-qv": {**base, "trainable_parameters": 300, "adapter_bytes": 1500, "step_seconds": 0.08},
        "bitfit": {**base, "trainable_parameters": 100, "adapter_bytes": 800, "step_seconds": 0.07},
        "full": {**base, "peak_memory_mb": 900.0, "trainable_parameters": 100_000, "step_seconds": 0.3},
    }


def test_a_combination_is_predicted_from_the_plan(rows: dict) -> None:
    cost = predict(rows, "lora", {"rank": "16", "target": "attention-qv"}, epochs=2, plan_epochs=1)
    assert cost["trainable_parameters"] == 1000 * 2 * 0.3
    assert cost["step_seconds"] == pytest.approx(0.1 + 0.02 - 0.02)
    assert predict(rows, "lora", {"rank": "16"}, 1, 1)["trainable_parameters"] == 2000  # one change: its row
    assert cost["train_seconds"] == pytest.approx(cost["step_seconds"] * 100 * 2)


def test_only_what_fits_enters_the_space(rows: dict) -> None:
    space = feasible_space(rows, ["full", "lora", "bitfit"], parse_budget("params=1500,memory=800MiB"), 1, 1)
    assert sorted(space) == ["bitfit", "lora"]  # full is over on memory and parameters
    assert space["lora"]["rank"] == ["8", "4"]  # rank 16 alone is over 1,500 parameters
    space = feasible_space(rows, ["lora"], parse_budget("params=600"), 1, 1)  # the defaults are over
    assert space == {"lora": {"rank": ["4"], "target": ["attention-qv"]}}
    space = feasible_space(rows, ["lora"], parse_budget("time=15s"), 2, 1)  # 2 epochs of 100 steps at 0.1 s: 20 s
    assert space == {}


def test_a_budget_nothing_fits_is_refused_before_training(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no option fits the budget params=10; the cheapest is bitfit"):
        run_tune(shared(tiny_bert, tiny_csv), "bitfit", "params=10", trials=2, output=tmp_path / "t",
                 probe_steps=1, say=lambda _: None)
    assert not (tmp_path / "t" / "trials").exists()


def test_pareto_front_is_the_non_dominated_set() -> None:
    rows = [{"number": 0, "value": 0.8, "trainable_parameters": 100, "train_seconds": 10},
            {"number": 1, "value": 0.7, "trainable_parameters": 200, "train_seconds": 20},   # dominated by 0
            {"number": 2, "value": 0.9, "trainable_parameters": 1000, "train_seconds": 5},
            {"number": 3, "value": 0.6, "trainable_parameters": 10, "train_seconds": 50},
            {"number": 4, "value": 0.9, "trainable_parameters": 1000, "train_seconds": 5, "duplicate_of": 2}]
    assert [r["number"] for r in pareto_front(rows, "maximize")] == [2, 0, 3]


def _study(out: Path) -> list:
    # Opening a storage is not read-only: even with skip_table_creation, optuna writes the schema's
    # version rows (version_info, alembic_version) when they are missing, which races the tune
    # process's own creation ("UNIQUE constraint failed: alembic_version"). So the reader takes the
    # lock tune holds while it creates the database.
    url = f"sqlite:///{(out / 'study.db').resolve()}"
    with _creating(url):
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    names = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False)


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "deltatune", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)


def test_killed_search_resumes_keeping_finished_trials(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    args = cli_args(tiny_bert, tiny_csv, out, "--methods", "bitfit,ln", "--heartbeat", "1", "--pruner", "none")
    proc = _spawn([*args, "--trials", "6"], tmp_path / "first.log")
    deadline = time.time() + 600
    while time.time() < deadline:  # wait for a finished trial and one under way, then kill -9
        if (out / "study.db").is_file():
            try:
                trials = _study(out)
            except Exception:  # noqa: BLE001 - the study is being created
                trials = []
            states = [t.state.name for t in trials]
            if "COMPLETE" in states and states[-1] == "RUNNING":
                break
        if proc.poll() is not None:
            pytest.fail(f"tune ended before it could be killed: {(tmp_path / 'first.log').read_text()[-2000:]}")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t.value for t in _study(out) if t.state.name == "COMPLETE"}
    assert before
    time.sleep(2.5)  # past the heartbeat's grace period: the killed trial counts as failed
    target = len(before) + 1
    resumed = _spawn([*args, "--trials", str(target)], tmp_path / "second.log")
    assert resumed.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    after = _study(out)
    kept = {t.number: t.value for t in after if t.number in before}
    assert kept == before  # finished trials survive the kill, unchanged
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in after) == target
    assert any(t.state.name == "FAIL" for t in after)  # the one killed mid-run


def test_two_processes_never_run_the_same_trial(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    args = cli_args(tiny_bert, tiny_csv, out, "--methods", "bitfit", "--trials", "4", "--pruner", "none")
    first = _spawn(args, tmp_path / "a.log")  # the first writes plan.json; give it a head start on the study
    while not (out / "study.db").is_file() and first.poll() is None:
        time.sleep(0.2)
    second = _spawn(args, tmp_path / "b.log")
    assert first.wait(timeout=900) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert second.wait(timeout=900) == 0, (tmp_path / "b.log").read_text()[-3000:]
    started = [set(map(int, re.findall(r"^trial (\d+): bitfit, lr", (tmp_path / f"{n}.log").read_text(), re.M)))
               for n in "ab"]
    assert not started[0] & started[1]  # no trial number trained by both
    trials = _study(out)
    trained = [t for t in trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert {t.number for t in trained} == started[0] | started[1]
    settings = [json.dumps(t.params, sort_keys=True) for t in trained]
    assert len(settings) == len(set(settings))  # and no settings trained twice
    assert len({t.user_attrs["pid"] for t in trials}) == 2 and len(trials) >= 4


_OPEN = """
import sys, time
from deltatune.train.tune import open_study
start = float(sys.argv[2])
while time.time() < start:  # both processes open the new database at the same moment
    time.sleep(0.001)
open_study(sys.argv[1], "s", "maximize", "none", 2, 0, 60)
"""


def test_two_processes_creating_one_new_study_both_succeed(tmp_path: Path) -> None:
    """Without the lock, the second process's CREATE TABLE fails with "table ... already exists"."""
    for attempt in range(2):
        url = f"sqlite:///{tmp_path / f'study{attempt}.db'}"
        start = str(time.time() + 3)  # after both interpreters have imported deltatune
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN, url, start], cwd=REPO, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
                 for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["s"]


def test_the_survey_measures_every_method_at_the_first_rung_then_the_best_third_go_on(
        tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    """With ASHA, a new study first trains every method (at its usual settings and suggested rate) to the
    first rung only, then the best third (here one of four) continue from their checkpoints: nothing is
    promoted for having run early, and the continuation ends exactly where the whole run would."""
    from deltatune.train.run import run_training
    from deltatune.train.tune import trial_config

    out = tmp_path / "t"
    result = run_tune(shared(tiny_bert, tiny_csv), "lora,bitfit,ln,ia3", None, trials=6, output=out, rungs=3,
                      seed=0, say=lambda _: None)
    trials = result["trials"]
    study = optuna.load_study(study_name=result["study"], storage=result["storage"]).get_trials()
    survey, cont = study[:4], study[4]
    assert sorted(t.params["method"] for t in survey) == ["bitfit", "ia3", "ln", "lora"]
    assert all(t.state.name == "PRUNED" and list(t.intermediate_values) == [1] and t.params["lr_scale"] == 1.0
               for t in survey)
    assert all(trials[t.number]["examples"] == 8 for t in survey)  # one step of 8 (a sixth of the run)
    best = max(survey, key=lambda t: (t.intermediate_values[1], -t.number))
    assert cont.user_attrs["continues"] == best.number and cont.params == best.params
    assert cont.intermediate_values[1] == best.intermediate_values[1]  # carried, not measured again
    assert trials[4]["examples"] == 48 - 8  # resumed from the survey's checkpoint: the rest of the run only
    # Only the continuation's checkpoint could be resumed; the others were removed once the survey was decided.
    assert not any((Path(t.user_attrs["run_dir"]) / "checkpoint").exists() for t in survey)
    if cont.state.name == "COMPLETE":  # a resumed run ends where the whole run ends
        config = trial_config(shared(tiny_bert, tiny_csv) and result["base"], best.params["method"], {
            k.split(".", 1)[1]: v for k, v in best.params.items() if "." in k}, 1.0, 1, str(tmp_path / "whole"))
        whole = run_training(config, progress=False)
        assert whole["validation"][-1]["accuracy"] == cont.value


def test_a_continuation_counts_once_at_the_rung_it_passed_in_the_survey() -> None:
    """Optuna's SuccessiveHalvingPruner would count a continuation's copy of its survey value as a second
    competitor and stop the next trial that would have gone on."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from deltatune.train.tune_study import halving_pruner

    study = optuna.create_study(direction="maximize")
    dist = {"x": FloatDistribution(0, 1)}
    for i, v in enumerate([0.5, 0.6, 0.4, 0.45, 0.55, 0.3]):
        study.add_trial(create_trial(state=TrialState.PRUNED, params={"x": i / 10}, distributions=dist,
                                     intermediate_values={1: v}, user_attrs={"survey": True}))
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.7, params={"x": 0.1}, distributions=dist,
                                 intermediate_values={1: 0.6, 3: 0.7},
                                 user_attrs={"continues": 1, "surveyed": 0.6, "surveyed_step": 1}))
    pruner = halving_pruner(optuna)

    def at_rung(value: float) -> object:
        return create_trial(state=TrialState.COMPLETE, value=value, params={"x": 0.9}, distributions=dist,
                            intermediate_values={1: value})
    assert not pruner.prune(study, at_rung(0.56))  # second of 7 distinct settings: in the best third
    assert pruner.prune(study, at_rung(0.52))
    assert not pruner.prune(study, study.get_trials()[-1])
