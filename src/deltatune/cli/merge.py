"""``deltatune merge ADAPTER_DIR --output DIR``: fold the adapter into a plain transformers model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from deltatune.cli.common import check_apart, fail_cleanly, parse_sets

if TYPE_CHECKING:
    import torch

_PROBE = ["deltatune merges the adapter into the base weights.", "What a lovely day!"]


def merge(
    adapter_dir: Annotated[Path, typer.Argument(help="A run directory or its adapter/ folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the merged model.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Change the recorded config, e.g. --set model=/path/to/base.")] = None,
    quantize: Annotated[str, typer.Option(
        "--quantize", help="none: a full-precision merged model; nf4 | int8: re-quantized after merging "
                           "(bitsandbytes), with the rounding error against the full-precision merge.")] = "none",
) -> None:
    """Merge the adapter into its base model and save a full model that plain transformers loads.

    An adapter trained on a quantized base (``quantize: nf4``) merges into the dequantized base weights
    in full precision: adding a small update to 4-bit weights would round most of it away."""
    with fail_cleanly():
        import torch

        import deltatune as dt
        from deltatune.core.files import atomic_directory, check_replaceable
        from deltatune.train import load_trained
        from deltatune.train.models import TRAINING_FILE, find_trained, training_meta
        from deltatune.train.memory import quantize_kwargs

        from deltatune.integrations.quantize import QUANT_FORMATS, mark_for_transformers, requantize

        if quantize not in QUANT_FORMATS:
            raise ValueError(f"--quantize must be one of {', '.join(QUANT_FORMATS)}, got {quantize!r}")
        check_apart(output, [find_trained(adapter_dir)[1]])  # the adapter itself; beside it in the run is fine
        check_replaceable(output)  # before the work: it would replace only a model deltatune wrote
        trained = load_trained(adapter_dir, parse_sets(set_))
        if trained.adapter is None:
            raise ValueError(f"{adapter_dir} already holds a full model; there is nothing to merge")
        model, tokenizer = trained.model, trained.tokenizer
        probe = trained.task.probe_batch(tokenizer) or tokenizer(_PROBE, padding=True, return_tensors="pt")
        with torch.no_grad():
            before = model(**probe).logits
            dt.merge_and_unload(dt.dequantize(model))  # dequantize: a no-op for a full-precision base
            after = model(**probe).logits
            rounding = None
            if quantize != "none":
                kw = quantize_kwargs(trained.config)  # its block size and full-precision layers too
                rounding = requantize(model, quantize, **kw)
                mark_for_transformers(model, quantize, **{k: v for k, v in kw.items() if k != "blocksize"})
                requantized = model(**probe).logits
                rounding["probe_output_gap"] = _gap(requantized, after)
        gap = _gap(before, after)
        meta = training_meta(trained.config, trained.labels) | {"merged_from": str(trained.source)}
        meta["config"]["quantize"] = quantize  # what the saved weights are; config.json says it to transformers
        if rounding is not None:
            meta["requantization_error"] = rounding
        with atomic_directory(output) as tmp:  # all or nothing; never over files deltatune did not write
            model.save_pretrained(tmp)
            if tokenizer is not None:  # a task with its own models may have none (a recommender)
                tokenizer.save_pretrained(tmp)
            (tmp / TRAINING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        typer.echo(f"merged {trained.source} into {output} (largest output change on a probe: {gap:.2e})")
        if rounding is not None:
            typer.echo(f"re-quantized to {quantize}: weight rounding error against the full-precision merge "
                       f"max {rounding['max_abs_error']:.3e}, mean {rounding['mean_abs_error']:.3e} over "
                       f"{rounding['layers']} layers; largest probe output change {rounding['probe_output_gap']:.2e}")


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference between two outputs of the probe, over their finite entries (a recommender
    scores its padding row -inf); entries finite in one and not in the other count as infinite."""
    import torch

    finite = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)) or not torch.equal(a[~finite], b[~finite]):
        return float("inf")
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
