"""The recommend task on tiny synthetic interactions (the MovieLens run is in the README/bench):
reading and checking the file, the time split and leave-last-out, the metrics' formulas, new
items' rows, and a trained run that reloads to the same scores."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.train.config import validate_config
from deltatune.train.interactions import lookup, read_interactions, read_items, read_users
from deltatune.train.recommend import held_out, periods, ranks, scores

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def tiny_data(path: Path, users: int = 24, seed: int = 0) -> Path:
    """Users walk through items in a cycle (item k is followed by k+1) for five steps, then three more:
    new items i30..i33 for even users, their own first items again for odd ones. With cutoff 0.625
    the first five steps are the past. Rows are written shuffled: the reader sorts histories by time."""
    rng = random.Random(seed)
    rows = []
    for u in range(users):
        start, t = u % 30, 1000 + u
        for step in range(8):
            late = step >= 5
            item = (start + step) % 30 if not late else 30 + (u + step) % 4 if u % 2 == 0 else (start + step - 5) % 30
            rows.append(f"user{u}\ti{item:02d}\t{rng.randint(1, 5)}\t{t + 100 * step}\n")
    rng.shuffle(rows)
    path.write_text(HEADER + "".join(rows))
    return path


def _config(tmp_path: Path, **over):
    data = {"task": "recommend", "method": "tokens", "data": {"path": str(tiny_data(tmp_path / "tiny.inter")),
                                                             "cutoff": 0.625},
            "epochs": 2, "batch_size": 8, "max_length": 8, "threads": 1, "output": str(tmp_path / "run")}
    for k, v in over.items():
        data[k] = v
    return validate_config(data)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))


def test_reader_checks_the_file_and_names_the_line(tmp_path):
    bad = tmp_path / "bad.inter"
    cases = [
        ("user_id:token\titem_id:token\tprice:float\ttimestamp:float\n", "line 1: unknown column 'price:float'"),
        ("user_id:float\titem_id:token\ttimestamp:float\n", "line 1: column 'user_id' has type 'float'"),
        ("user_id:token\ttimestamp:float\n", "no item_id:token column"),
        (HEADER + "u1\ti1\t3\t100\nu1\ti2\t3\n", "line 3: 3 fields, the header has 4"),
        (HEADER + "u1\ti1\t3\tyesterday\n", "line 2: timestamp 'yesterday' is not a finite number"),
        (HEADER + "u1\ti1\tgood\t100\n", "line 2: rating 'good' is not a number"),
        (HEADER + "u1\t\t3\t100\n", "line 2: empty item_id"),
        (HEADER + "u1\ti1\t3\t100\nu1\ti1\t4\t100\n", "line 3: the same interaction as line 2"),
    ]
    for text, message in cases:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            read_interactions(bad)


def test_side_files_read_one_column_by_name_and_name_the_bad_line(tmp_path):
    items = tmp_path / "a.item"
    items.write_text("item_id:token\tmovie_title:token_seq\tclass:token_seq\n0042\tHeat\tAction Crime\n7\tUp\tAnimation\n")
    assert read_items(items, "class") == {"0042": "Action Crime", "7": "Animation"}  # ids stay names
    with pytest.raises(ValueError, match="line 1: needs item_id and 'genre' columns; it has item_id, movie_title, class"):
        read_items(items, "genre")
    with pytest.raises(ValueError, match="line 1: needs user_id and 'class' columns"):
        read_users(items, "class")  # an item file is not a user file
    items.write_text("item_id:token\tclass:token_seq\n1\tDrama\n2\n")
    with pytest.raises(ValueError, match="line 3: 1 fields, the header has 2"):
        read_items(items, "class")


def test_histories_are_sorted_by_time_and_ids_stay_names(tmp_path):
    path = tmp_path / "a.inter"
    path.write_text(HEADER + "007\t0042\t1\t300\n007\t42\t1\t100\n007\tx\t1\t200\n")
    data = read_interactions(path)
    assert [r.item for r in data.histories["007"]] == ["42", "x", "0042"]  # "0042" and "42" are two items
    with pytest.raises(ValueError, match="item '9' is not in the model's item table"):
        lookup({"42": 1}, "9", "predict")


def test_time_split_and_leave_last_out(tmp_path):
    config = _config(tmp_path)
    p = periods(config)
    assert p.new == ["i30", "i31", "i32", "i33"] and "i30" not in p.old
    assert list(p.names) == p.old + p.new and repr(p.names) == "<32 item names>"
    ex = held_out(p, config.max_length)
    index = {n: i + 1 for i, n in enumerate(p.names)}
    assert len(ex["test"]) == 24  # every user is active after the cutoff
    for user, history, target in ex["test"]:
        h = p.data.histories[user]
        assert target == index[h[-1].item] and history == [index[r.item] for r in h[:-1]]
    seqs = {tuple(h) for _, h, _ in ex["test"]}
    for inputs, labels in ex["train"]:  # targets are after the cutoff and never a held-out item
        assert any(t != -100 for t in labels)
        assert any(tuple(inputs) == s[:len(inputs)] for s in seqs)
    n_targets = sum(t != -100 for _, y in ex["train"] for t in y)
    after = sum(r.time >= p.cutoff for r in p.data.rows)
    assert n_targets == after - len(ex["test"]) - len(ex["validation"])  # every later interaction, once


def test_several_validation_positions_are_held_out_without_leakage(tmp_path):
    """``data.validation_positions``: the last k interactions before the test one (after the cutoff) are
    validation, each from the history before it; training never sees them; the split is deterministic
    (another row order in the file gives the same split) and keeps users' names."""
    config = _config(tmp_path, data={"path": str(tiny_data(tmp_path / "tiny.inter")), "cutoff": 0.625,
                                     "validation_positions": 3})
    p = periods(config)
    one, ex = held_out(p, config.max_length), held_out(p, config.max_length, 3)
    index = {n: i + 1 for i, n in enumerate(p.names)}
    assert ex["test"] == one["test"]  # test is untouched
    assert len(one["validation"]) == 24 and len(ex["validation"]) == 48  # 3 asked, 2 after the cutoff
    by_user: dict[str, list] = {}
    for user, history, target in ex["validation"]:
        by_user.setdefault(user, []).append((history, target))
    for user, held in by_user.items():
        h = p.data.histories[user]
        rows = [index[r.item] for r in h]
        assert [t for _, t in held] == rows[-3:-1] and all(r.time >= p.cutoff for r in h[-3:-1])
        assert [hist for hist, _ in held] == [rows[:-3], rows[:-2]]
    for (inputs, labels), user in zip(ex["train"], ex["train_users"]):
        rows = [index[r.item] for r in p.data.histories[user]]
        assert list(inputs) + [labels[-1]] == rows[:len(inputs) + 1] and len(inputs) + 1 <= len(rows) - 3
    n_targets = sum(t != -100 for _, y in ex["train"] for t in y)
    assert n_targets == sum(r.time >= p.cutoff for r in p.data.rows) - 24 - 48
    assert {u for u, _, _ in ex["validation"]} <= set(p.data.histories)  # users by name, "user7", not a number
    other = validate_config({"task": "recommend", "max_length": 8, "data": {
        "path": str(tiny_data(tmp_path / "b.inter", seed=5)), "cutoff": 0.625, "validation_positions": 3}})
    def by_name(split):  # users come in file order; each user's examples must be the same
        return {k: sorted(map(repr, zip(v, split["train_users"]) if k == "train" else v)) for k, v in split.items()}

    assert held_out(p, config.max_length, 3) == ex  # deterministic
    assert by_name(held_out(periods(other), config.max_length, 3)) == by_name(ex)  # row order does not matter
    from deltatune.train.recommend import RecommendTask
    splits = RecommendTask().load_splits(config)
    assert splits.validation == ex["validation"] and splits.test == ex["test"]
    with pytest.raises(Exception, match="validation_positions"):
        _config(tmp_path, data={"validation_positions": 0})


def test_metrics_follow_their_definitions():
    logits = torch.tensor([[-math.inf, 5.0, 4.0, 3.0, 2.0], [-math.inf, 1.0, 2.0, 3.0, 4.0]])
    r = ranks(logits, torch.tensor([3, 1]), [[1], [2]])  # row 0: item 1 is history, removed; row 1: item 2
    assert r.tolist() == [1, 2]
    got = scores(torch.tensor([1, 2, 12]))
    assert got["hr_10"] == pytest.approx(2 / 3)
    assert got["ndcg_10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 13) / 3)


def test_tokens_train_only_the_new_items_and_the_run_reloads(tmp_path):
    from deltatune.train.models import load_trained
    from deltatune.train.run import run_training

    config = _config(tmp_path)
    assert config.adapter["original_vocab_size"] == 29  # 28 past items + padding: the new rows are 29..32
    metrics = run_training(config, progress=False)
    assert metrics["trainable_parameters"] == 4 * 64
    for key in ("test_hr_10", "test_ndcg_10", "test_mrr", "test_base_ndcg_10", "test_new_ndcg_10"):
        assert 0.0 <= metrics[key] <= 1.0
    trained = load_trained(tmp_path / "run")
    table = trained.model.item_embeddings
    assert torch.equal(table.base.weight[:29], _base_table(config)[:29])  # the old rows are bit-identical
    task = trained.task
    items = {n: task.encode(None, getattr(task.load_splits(trained.config, trained.labels), n), 8)
             for n in ("test",)}
    from deltatune.train.loop import make_runner

    again = task.evaluate(trained.model, items["test"], None, 64, make_runner(torch.device("cpu"), "fp32"))
    assert again["ndcg_10"] == pytest.approx(metrics["test_ndcg_10"], abs=1e-6)
    dt.merge(trained.model)
    merged = task.evaluate(trained.model, items["test"], None, 64, make_runner(torch.device("cpu"), "fp32"))
    assert merged["ndcg_10"] == pytest.approx(metrics["test_ndcg_10"], abs=1e-4)


def _base_table(config):
    from deltatune.train.recommend import RecommendTask

    model = RecommendTask().load_model("sasrec", None, config)[0]
    return model.item_embeddings.weight.detach()


def test_the_base_is_cached_and_another_item_table_is_refused(tmp_path):
    from deltatune.train.recommend import RecommendTask

    config = _config(tmp_path)
    task = RecommendTask()
    first = task.load_model("sasrec", None, config)[0]
    cached = list((tmp_path / "cache").glob("sasrec-*"))
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    second = task.load_model("sasrec", None, config)[0]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    with pytest.raises(ValueError, match="differs from the one this data gives"):
        task.load_model("sasrec", ["i00", "i01"], config)
    with pytest.raises(ValueError, match="model must be 'sasrec'"):
        _config(tmp_path, model="all-minilm-l6-v2")


def test_cli_trains_lora_and_the_hybrid_on_the_task(tmp_path):
    data = tiny_data(tmp_path / "tiny.inter")
    env = {"DELTATUNE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd() / "src")}
    common = ["--set", "task=recommend", "--set", f"data.path={data}", "--set", "data.cutoff=0.625", "--set", "epochs=1",
              "--set", "max_length=8", "--set", "threads=1"]
    out = subprocess.run([sys.executable, "-m", "deltatune", "train", *common, "--set", "method=hybrid",
                          "--output", str(tmp_path / "hybrid")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NDCG@10" in out.stdout
    metrics = json.loads((tmp_path / "hybrid" / "metrics.json").read_text())
    saved = json.loads((tmp_path / "hybrid" / "adapter" / "adapter_config.json").read_text())
    assert [p["method"] for p in saved["config"]["parts"]] == ["lora", "tokens"]
    assert metrics["trainable_parameters"] < metrics["total_parameters"] * 0.2


def test_compare_tables_show_the_task_columns_and_hybrid_is_a_method():
    from deltatune.train.compare import family_of, parse_methods
    from deltatune.train.compare_report import markdown_table, one_line

    assert parse_methods("full,lora,hybrid")[0] == ["full", "lora", "hybrid"] and family_of("hybrid") == "hybrid"
    assert "hybrid" not in parse_methods("all")[0]
    row = {"method": "lora", "family": "reparameterization", "status": "ok", "error": None, "lr": 0.005,
           "accuracy": None, "macro_f1": None, "scores": {"hr_10": 0.25, "ndcg_10": 0.125, "mrr": 0.0625},
           "trainable_parameters": 10, "total_parameters": 1000, "trainable_share": 0.01, "adapter_bytes": 2048,
           "train_seconds": 3.0, "peak_memory_mb": 100.0}
    table = markdown_table({"rows": [row], "columns": [["hr_10", "HR@10"], ["ndcg_10", "NDCG@10"], ["mrr", "MRR"]]})
    assert "| HR@10 | NDCG@10 | MRR |" in table and "| 0.2500 | 0.1250 | 0.0625 |" in table
    assert one_line(row).startswith("hr_10 0.2500, ndcg_10 0.1250, mrr 0.0625")


def test_predict_ranks_by_name_and_names_unknown_items(tmp_path):
    from deltatune.train.recommend import RecommendTask
    from deltatune.train.loop import make_runner

    config = _config(tmp_path)
    task = RecommendTask()
    names = periods(config).names
    model = task.load_model("sasrec", names, config)[0]
    run = make_runner(torch.device("cpu"), "fp32")
    out = task.predict(model, None, [{"history": "i01 i02"}, {"history": "i05"}], config, names, run)
    assert len(out) == 2 and len(out[0]["items"]) == 10 and not {"i01", "i02"} & set(out[0]["items"])
    assert out[0]["scores"] == sorted(out[0]["scores"], reverse=True)
    with pytest.raises(ValueError, match="record 2: item 'nope' is not in the model's item table"):
        task.predict(model, None, [{"history": "i01"}, {"history": "i01 nope"}], config, names, run)
    with pytest.raises(ValueError, match="empty history"):
        task.predict(model, None, [{"history": " "}], config, names, run)


def test_defaults_are_the_measured_recipe_and_lora_trains_at_most_5_percent(tmp_path):
    """The task's defaults (bench/recommend_sweep.py, README): 10 epochs with the linear decay, LoRA rank 2 on
    attention and 4 on the item table at lr 1e-2; on MovieLens-100K's SASRec that is <= 5 % trainable."""
    from deltatune.train.recommend import ATTENTION, TABLE
    from deltatune.train.sasrec import SASRec, SasrecSpec

    data = {"path": str(tiny_data(tmp_path / "tiny.inter")), "cutoff": 0.625}
    config = validate_config({"task": "recommend", "method": "lora", "data": data})
    assert (config.epochs, config.lr_schedule, config.lr, config.warmup_ratio) == (10, "linear", 1e-2, 0.0)
    assert config.adapter == {"target": [*ATTENTION, TABLE], "rank": 2, "alpha": 8.0, "rank_pattern": {TABLE: 4}}
    hybrid = validate_config({"task": "recommend", "method": "hybrid", "data": data})
    assert hybrid.adapter["parts"][0] == {"method": "lora", **config.adapter} and hybrid.lr == 1e-2
    full = validate_config({"task": "recommend", "method": "full", "data": data})
    assert (full.lr, full.epochs, full.lr_schedule) == (1e-3, 10, "linear")  # the same budget for every method
    model = SASRec(SasrecSpec(num_items=1 + 1682))  # MovieLens-100K's table (padding row + 1,682 movies)
    dt.attach(model, dt.LoraConfig(**config.adapter))
    report = dt.parameter_report(model)
    assert report.trainable == 8 * 2 * (64 + 64) + 4 * (1683 + 64)
    assert report.trainable / report.total <= 0.05


def test_rolling_test_positions_hold_out_the_last_k_each_from_its_prefix(tmp_path):
    """``held_out(..., test_positions=k)``: test is each user's last k interactions after the cutoff, each
    ranked from the history before it; the last is the leave-last-out item; validation is the positions
    before the first test item; training holds out the same interactions as k - 1 more validation ones."""
    config = _config(tmp_path)
    p = periods(config)
    index = {n: i + 1 for i, n in enumerate(p.names)}
    one, ex = held_out(p, config.max_length), held_out(p, config.max_length, 1, 2)
    assert held_out(p, config.max_length, 1, 1) == one  # k = 1 is leave-last-out, unchanged
    assert len(ex["test"]) == 48 and len(ex["validation"]) == 24  # 3 interactions after the cutoff per user
    by_user: dict[str, list] = {}
    for user, history, target in ex["test"]:
        by_user.setdefault(user, []).append((history, target))
    last = {u: held[-1] for u, held in by_user.items()}
    assert [(u, *last[u]) for u, _, _ in one["test"]] == one["test"]  # the last test item is leave-last-out's
    for user, held in by_user.items():
        rows = [index[r.item] for r in p.data.histories[user]]
        assert held == [(rows[:-2], rows[-2]), (rows[:-1], rows[-1])]
    for user, history, target in ex["validation"]:
        rows = [index[r.item] for r in p.data.histories[user]]
        assert (history, target) == (rows[:-3], rows[-3])
    assert ex["train"] == held_out(p, config.max_length, 2)["train"]  # the same interactions held out
    for (inputs, labels), user in zip(ex["train"], ex["train_users"]):
        assert len(inputs) + 1 <= len(p.data.histories[user]) - 3  # no test or validation item is trained on
    # more positions than there are after the cutoff: held out only while after it, validation then empty
    many = held_out(p, config.max_length, 1, 5)
    assert len(many["test"]) == 72 and many["validation"] == [] and many["train"] == []


def test_merge_writes_a_sasrec_that_scores_as_the_run(tmp_path):
    """``deltatune merge`` of a recommender run (LoRA + rows for the new items): a SASRec folder with
    no tokenizer, a finite probe difference (the padding row scores -inf in both), and the same test
    scores from ``deltatune eval`` as the adapter run."""
    from typer.testing import CliRunner

    from deltatune.cli import app
    from deltatune.cli.merge import _gap
    from deltatune.train.run import run_training

    metrics = run_training(_config(tmp_path, method="hybrid"), progress=False)
    merged = tmp_path / "merged"
    out = CliRunner().invoke(app, ["merge", str(tmp_path / "run"), "--output", str(merged)])
    assert out.exit_code == 0, out.output
    gap = float("".join(out.output.split()).split("probe:")[1].split(")")[0])  # the line may wrap
    assert 0 <= gap < 1e-4
    assert (merged / "sasrec.json").is_file() and not (merged / "tokenizer.json").exists()
    out = CliRunner().invoke(app, ["eval", str(merged), "--set", "threads=1"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output[out.output.index("{"):])["ndcg_10"] == pytest.approx(metrics["test_ndcg_10"], abs=1e-4)
    inf = float("-inf")
    assert _gap(torch.tensor([inf, 1.0]), torch.tensor([inf, 1.5])) == 0.5
    assert _gap(torch.tensor([inf, 1.0]), torch.tensor([0.0, 1.0])) == float("inf")


def test_serve_refuses_a_recommender_run_and_names_predict(tmp_path):
    """``deltatune serve`` answers text; a recommend run (item histories) is refused before any model
    loads, with the command that scores it, instead of failing inside the loader."""
    pytest.importorskip("fastapi")
    from deltatune.serve import load_served
    from deltatune.train.run import run_training

    run_training(_config(tmp_path, method="lora", epochs=1), progress=False)
    with pytest.raises(ValueError, match=r"task recommend, which reads item histories: score them with deltatune "
                                         r"predict .*run --input FILE"):
        load_served(str(tmp_path / "run"), {}, torch.device("cpu"), torch.float32)


def test_export_onnx_scores_every_item_as_the_run(tmp_path):
    """``deltatune export --format onnx`` of a recommender (the hybrid: LoRA + new items' rows, merged):
    ONNX Runtime's scores equal the trained model's for histories of several lengths, the run's own
    test metrics come back through the file, and export.json names the items."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import numpy as np
    import onnxruntime as ort
    from typer.testing import CliRunner

    from deltatune.cli import app
    from deltatune.train import load_trained
    from deltatune.train.run import run_training
    from deltatune.train.sasrec import collate

    metrics = run_training(_config(tmp_path, method="hybrid"), progress=False)
    out = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--format", "onnx", "--output", str(tmp_path / "onnx")])
    assert out.exit_code == 0, out.output
    facts = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert facts["kind"] == "recommendation" and facts["adapter"] == "merged into the weights"
    assert facts["test"]["onnx_fp32"]["ndcg_10"] == pytest.approx(metrics["test_ndcg_10"], abs=1e-6)
    trained = load_trained(tmp_path / "run")
    assert facts["labels"] == list(trained.labels) and len(facts["labels"]) == 32
    ids = collate([([1, 2, 3, 4, 30], [-100] * 5), ([31, 7], [-100] * 2)], max_len=50)["input_ids"]
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["scores"], {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        ref = trained.model(ids).logits.numpy()
    assert np.isneginf(got[:, 0]).all()
    np.testing.assert_allclose(got[:, 1:], ref[:, 1:], atol=1e-5)


def test_inspect_takes_a_run_and_shows_what_its_config_adapts(tmp_path):
    """``deltatune inspect RUN``: the run's recorded config on its base (a recommender's base is built
    from the run's data, so it needs that config); it used to say the run was not a model."""
    from typer.testing import CliRunner

    from deltatune.cli import app
    from deltatune.train.run import run_training

    run_training(_config(tmp_path, method="lora", epochs=1), progress=False)
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--depth", "1"])
    assert out.exit_code == 0, out.output
    assert "+ item_embeddings" in out.output and "blocks.0.q_proj" in out.output
