"""``deltatune combine A B ... --how ties --weights 0.5,0.5 --output DIR``: one adapter from several."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import check_apart, fail_cleanly, parse_sets

HOWS = "cat, svd, linear, ties, dare_linear, dare_ties, magnitude_prune (or <rule>_svd)"


def _weights(values: list[str] | None, count: int) -> list[float]:
    """``--weights 0.7,0.3`` or ``--weights 0.7 --weights 0.3``; default: 1 for every adapter."""
    if not values:
        return [1.0] * count
    try:
        weights = [float(v) for value in values for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--weights takes numbers such as 0.7,0.3; got {','.join(values)!r}") from None
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} adapters; give one weight per adapter")
    return weights


def combine(
    adapters: Annotated[list[Path], typer.Argument(help="Two or more run directories or adapter folders (same base).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the combined adapter.")],
    how: Annotated[str, typer.Option("--how", help=f"Combination: {HOWS}.")],
    weights: Annotated[list[str] | None, typer.Option(
        "--weights", "-w", help="One weight per adapter, e.g. 0.7,0.3 (default: 1 each).")] = None,
    density: Annotated[float, typer.Option(help="Fraction of entries kept (ties, dare_*, magnitude_prune).")] = 1.0,
    majority_sign: Annotated[str, typer.Option(help="Sign election for ties rules: total or frequency.")] = "total",
    rank: Annotated[int | None, typer.Option(help="Rank of the result (svd rules; default: the largest).")] = None,
    svd_clamp: Annotated[float | None, typer.Option(help="Clamp SVD factors to this quantile (svd rules).")] = None,
    heads_from: Annotated[int | None, typer.Option(
        help="Keep the trained-in-full modules (e.g. the classifier head) of adapter N (1 = the first).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Change the first adapter's recorded config, e.g. --set model=/path/to/base.")] = None,
) -> None:
    """Combine several adapters of one base model into a new adapter (PEFT's add_weighted_adapter rules)."""
    # The library's argument names and adapter names, as this command's flags and paths.
    words = {"heads_from=<one of them>": "--heads-from N (1 = the first adapter)", "heads_from": "--heads-from",
             "how must": "--how must", "majority_sign": "--majority-sign", "svd_clamp": "--svd-clamp",
             "rank and": "--rank and", "rank must": "--rank must", "a density": "a --density",
             "unmerge(model)": "unmerge it"}
    with fail_cleanly(words):
        import deltatune as dt
        from deltatune.core.combine import combine as combine_adapters
        from deltatune.core.files import check_replaceable
        from deltatune.train import load_trained
        from deltatune.train.models import find_trained, read_trained, training_meta

        if len(adapters) < 2:
            raise ValueError("combine needs two or more adapters, e.g. deltatune combine runs/a runs/b --how cat ...")
        ws = _weights(weights, len(adapters))
        if heads_from is not None and not 1 <= heads_from <= len(adapters):
            raise ValueError(f"--heads-from is an adapter number from 1 to {len(adapters)}, got {heads_from}")
        sources = [find_trained(a) for a in adapters]
        check_apart(output, [*adapters, *(where for _, where in sources)])
        check_replaceable(output)  # before the work: it would replace only an adapter deltatune wrote
        for path, (kind, _) in zip(adapters, sources):
            if kind != "adapter":
                raise ValueError(f"{path} holds a full model, not an adapter; combine adapters only")
        recorded = [read_trained(a, parse_sets(set_) if i == 0 else None) for i, a in enumerate(adapters)]
        bases = {str(a): r.config.model for a, r in zip(adapters, recorded)}
        if len(set(bases.values())) > 1:
            raise ValueError("the adapters were trained on different base models (" + ", ".join(
                f"{a}: {m}" for a, m in bases.items()) + "); combine adapters of one base")
        storage = {str(a): r.config.quantize for a, r in zip(adapters, recorded)}
        if len(set(storage.values())) > 1:
            typer.echo("warning: the adapters were trained on differently stored bases (" + ", ".join(
                f"{a}: {q}" for a, q in storage.items()) + f"); the combination is built and saved for "
                f"{adapters[0]}'s ({storage[str(adapters[0])]})", err=True)
        trained = load_trained(adapters[0], parse_sets(set_))
        model = trained.model
        names = [trained.adapter] + [dt.load_adapter(model, where, f"source{i}", activate=False)
                                     for i, (_, where) in enumerate(sources[1:], start=2)]
        words.update({repr(n): repr(str(a)) for n, a in zip(names, adapters)})
        words[repr(names)] = ", ".join(str(a) for a in adapters)
        combine_adapters(model, names, ws, "combined", how=how, density=density, majority_sign=majority_sign,
                         rank=rank, svd_clamp=svd_clamp,
                         heads_from=None if heads_from is None else names[heads_from - 1])
        meta = training_meta(trained.config, trained.labels) | {
            "combined_from": [str(where) for _, where in sources], "how": how, "weights": ws}
        dt.save_adapter(model, output, "combined", extra={"training": meta})
        typer.echo(f"combined {len(adapters)} adapters ({how}, weights {ws}) into {output}")
