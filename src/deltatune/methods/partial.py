"""Partial fine-tuning: train the last N transformer blocks (or named modules) and nothing else.

    θ'_m = trained copy of θ_m   for every parameter θ_m of the chosen modules m,
    f(x; θ) → f(x; θ' on the chosen modules, θ elsewhere)

The classic "freeze all but the top layers" baseline (Howard & Ruder, ULMFiT, 2018,
arXiv:1801.06146; Lee et al., 2019, "What Would Elsa Do? Freezing Layers During Transformer
Fine-Tuning", arXiv:1911.03090), the *specification* family of the Delta Tuning taxonomy.

The base stays bit-identical: every module that owns parameters inside the chosen blocks gets a
:class:`TunedCopy` adapter holding a trainable copy of those parameters, and its forward runs the
frozen module with the copies swapped in (``torch.func.functional_call``). Why a copy and not a
zero-initialised delta ``θ + Δ``: the copy costs the same memory (one tensor per trained weight)
but no extra ``θ + Δ`` tensor per forward, training is exactly full fine-tuning of those weights,
and merging is an exact swap both ways (``merge_atol = 0``). The saved file holds just those
weights (keys ``<module>.tuned.<param>``), the same bytes a checkpoint of those blocks would hold.

Hugging Face PEFT has no such method (its ``modules_to_save`` deep-copies whole modules, which is
what this does per parameter-owning layer); the tests check that training through the copies ends
exactly where training the unfrozen blocks ends.

Adapters stacked inside a :class:`TunedCopy` (e.g. LoRA on the same layer) see the trained copy
as their base weight, as if they were attached to a fine-tuned model.

Parameters shared with a module outside the selection (tied input/output embeddings) are
rejected: a copy would silently untie them. Use the ``tokens`` method for embedding rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from deltatune.config import AdapterConfig
from deltatune.core.layer import Adapter, logical_modules, swap_values
from deltatune.core.layers import quantized_format
from deltatune.core.targeting import NoMatchError, any_matches, block_index, select


class _Run(nn.Module):
    """Calls ``fn`` (the frozen module, or the adapters wrapped around it) with ``module`` registered
    as a child, so ``functional_call`` can swap ``module``'s parameters for the duration of the call."""

    def __init__(self, module: nn.Module, fn: Any) -> None:
        super().__init__()
        self.module = module
        self.__dict__["fn"] = fn  # not a submodule: it may be the module itself or a plain callable

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class TunedCopy(Adapter):
    """A trainable copy of a module's own parameters: ``forward(x, base) = base(x)`` computed with
    the copies in place of the frozen tensors. Merging swaps copy and base values (exact)."""

    merge_atol: ClassVar[float] = 0.0

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        # Same names as the module's own parameters (e.g. ``weight``, ``bias``), one level down so the
        # saved keys never collide with the base model's keys.
        self.tuned = nn.ParameterDict({
            n: nn.Parameter(p.detach().clone(), requires_grad=True)
            for n, p in module.named_parameters(recurse=False)
        })

    def forward(self, x: Tensor, base: Any) -> Tensor:
        module = base if isinstance(base, nn.Module) else base.module
        params = {f"module.{n}": p for n, p in self.tuned.items()}
        return functional_call(_Run(module, base), params, (x,))

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        self._swap(base)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        self._swap(base)

    def _swap(self, base: nn.Module) -> None:
        swap_values((p, self.tuned[n]) for n, p in base.named_parameters(recurse=False))


def owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def reject_shared(model: nn.Module, names: list[str]) -> None:
    """Raise if a parameter of a chosen module is also held by a module outside ``names``."""
    chosen = set(names)
    owner = {id(p): n for n, m in logical_modules(model) if n in chosen for p in m.parameters(recurse=False)}
    for n, m in logical_modules(model):
        if n in chosen:
            continue
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in owner:
                raise ValueError(
                    f"{owner[id(p)]!r} shares its parameter with {n}.{pname} (tied weights); a trained copy "
                    "would untie them. Leave it out (exclude=[...]) or use method 'tokens' for embedding rows"
                )


@dataclasses.dataclass(frozen=True)
class PartialConfig(AdapterConfig):
    """Which blocks or modules train in full.

    Attributes:
        last_n: train the last N blocks of the model's block stack (its largest ``nn.ModuleList``).
            ``0`` trains no block: with a new head in ``modules_to_save``, a linear probe.
        layers: train these blocks instead (indices into the block stack); not with ``last_n``.
        target: also train these modules (names, suffixes or ``re:`` patterns), whole subtrees,
            e.g. ``["classifier"]`` or ``["bert.pooler"]``.
        exclude: leave these modules frozen (e.g. ``["LayerNorm"]``).

    With none of ``last_n``, ``layers`` and ``target`` given, the last block trains.
    """

    method: ClassVar[str] = "partial"
    family: ClassVar[str] = "specification"
    search_space: ClassVar[dict[str, Any]] = {"last_n": (1, 2)}  # plan / tune / compare --grid
    default_target: ClassVar[Any] = None

    last_n: int | None = None

    def validate(self) -> None:
        if self.last_n is not None and (not isinstance(self.last_n, int) or self.last_n < 0):
            raise ValueError(f"partial last_n must be a number of blocks (0 or more), got {self.last_n!r}")
        if self.last_n is not None and self.layers is not None:
            raise ValueError("give partial either last_n (the last N blocks) or layers (block indices), not both")

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        if (found := quantized_format(base)) is not None:
            raise ValueError(f"partial trains weights in full, and {name!r} is stored quantized ({found[1]}); "
                             "leave it out (exclude=[...]), keep it in full precision (quantize skip=[...]), "
                             "or adapt it with a delta method such as lora")
        return TunedCopy(base) if owns_parameters(base) else None

    def _blocks(self, model: nn.Module) -> tuple[set[int], dict[str, int]]:
        index = block_index(model)
        wanted_blocks = self.layers is not None or self.last_n is not None or self.target is None
        if not wanted_blocks:
            return set(), index
        if not index:
            raise NoMatchError(
                f"partial found no block stack (an nn.ModuleList of layers) in {type(model).__name__}; "
                "name the modules to train with target=[...]"
            )
        n_blocks = max(index.values()) + 1
        if self.layers is not None:
            bad = [i for i in self.layers if i >= n_blocks]
            if bad:
                raise ValueError(
                    f"partial layers {bad} do not exist: the model has {n_blocks} blocks (0..{n_blocks - 1})")
            return set(self.layers), index
        last_n = 1 if self.last_n is None else self.last_n
        if last_n > n_blocks:
            raise ValueError(f"partial last_n={last_n} but the model has only {n_blocks} blocks")
        return set(range(n_blocks - last_n, n_blocks)), index

    def select_modules(self, model: nn.Module) -> list[str]:
        """Every parameter-owning module inside the chosen blocks or the targeted subtrees."""
        blocks, index = self._blocks(model)
        roots = select(model, self.target).names if self.target is not None else []
        names = []
        for n, m in logical_modules(model):
            if not n or not owns_parameters(m) or any_matches(n, self.exclude):
                continue
            if index.get(n) in blocks or any(n == r or n.startswith(r + ".") for r in roots):
                names.append(n)
        if not names and self.last_n == 0 and self.target is None:
            if not self.modules_to_save:
                raise NoMatchError("partial last_n=0 trains no block; name the head to train with "
                                   "modules_to_save=[...] (a linear probe)")
            return []  # a linear probe: only the modules_to_save (a new head) train
        if not names:
            raise NoMatchError(f"partial selected no module with parameters in {type(model).__name__}")
        nested = [n for n in names if any(o.startswith(n + ".") for o in names)]
        if nested:
            raise ValueError(
                f"partial cannot train {nested[0]!r}: it holds parameters of its own and also has "
                "submodules with parameters; exclude it or target its submodules"
            )
        reject_shared(model, names)
        return names
