"""``python -m bench.domain --from-run RUN --all-held-out``: the figures of a finished ``task: text`` run,
and the adapter and its base rescored on every held-out block (a tiny random Llama, a folder of docs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def test_domain_bench_rescores_a_finished_text_run_on_every_held_out_block(tmp_path: Path) -> None:
    from bench import domain
    from deltatune.train import load_config, run_training
    from tests.train.test_text import _folder
    from tests.train.tiny import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny-llama")
    run = tmp_path / "run"
    config = load_config(None, ["task=text", f"model={model}", f"data.path={_folder(tmp_path / 'docs', 40)}",
                                "max_length=32", f"output={run}", "batch_size=8", "lr=1e-2", "threads=1",
                                "tensorboard=false", "data.max_train_examples=16"])
    metrics = run_training(config, progress=False)
    out = tmp_path / "domain-text.json"
    result = domain.main(["--which", "text", "--from-run", str(run), "--all-held-out", "--threads", "1",
                          "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["perplexity_reduction"] == metrics["perplexity_reduction"]
    assert result["settings"]["task"] == "text" and result["run"] == str(run)
    # With data.path the held-out blocks are not capped, so rescoring all of them repeats the run's figures.
    every = result["all_held_out"]
    assert every["tokens"] == metrics["test_tokens"]
    assert every["test_perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-6)
    assert every["base_test_perplexity"] == pytest.approx(metrics["base_test_perplexity"], rel=1e-6)
    assert len(every["modules"]) == len(set(every["modules"])) > 0
