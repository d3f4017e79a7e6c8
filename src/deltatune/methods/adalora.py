"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., ICLR 2023,
arXiv:2303.10512).

    h = W x + (α / r) · P Λ Q x,    P ∈ R^{d_out×r},  Λ = diag(λ),  Q ∈ R^{r×d_in},  r = init_rank

The update has the shape of an SVD. P and Q are pulled towards orthonormal columns and rows by a
regulariser the training loop adds to its loss (PEFT's form, a mean over all P and Q matrices)::

    loss = task_loss + orth_reg_weight · mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F, ...)

— ``deltatune.regularization_loss(model)`` returns it for every attached adapter that defines one,
so a training loop adds it without naming the method. The rank budget moves between layers during
training. The importance of triplet i (λ_i, column i of P, row i of Q) is

    S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki),    s(w) = Ī(w) · Ū(w),
    I(w) = |w · ∂L/∂w|,   Ī ← β₁ Ī + (1 − β₁) I,   Ū ← β₂ Ū + (1 − β₂) |I − Ī|,

and after optimizer step t only the b(t) most important triplets of the whole model keep their λ
(the others are set to 0 and may come back later, as in the paper). The budget falls from
b⁰ = Σ init_rank to b^T = target_rank · (number of layers) on a cubic schedule:

    b(t) = b⁰ for t ≤ t_init;   b^T + (b⁰ − b^T)(1 − (t − t_init)/(T − t_final − t_init))³ until
    T − t_final (reallocating every ΔT steps);   then the final allocation is frozen.

The schedule is global, so it runs in :meth:`AdaLoraConfig.on_step`, which training loops call
through ``deltatune.on_train_step(model, step, total_steps)`` after ``optimizer.step()`` and
**before** ``optimizer.zero_grad()``: the importance needs the gradients. ``step`` counts optimizer
steps from 1. The final allocation is written to a boolean ``mask`` buffer per layer, saved with the
adapter, and the forward uses ``λ ⊙ mask``: loading reproduces the final ranks and outputs exactly,
and merging folds in only the kept triplets. :func:`ranks` reports them.

Differences from Hugging Face PEFT 0.21.2 (parameters map as P = ``lora_B``, λ = ``lora_E``,
Q = ``lora_A``): PEFT scales by α/(r + 1e-5), here α/r; where scores tie, PEFT masks every triplet
at the threshold, here exactly ``b⁰ − b(t)`` triplets are masked (the lowest scores, lowest index
first); after the final allocation PEFT zeroes masked λ again after each step, here the mask does it.

Supported layers: ``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Conv1d``/``nn.Conv2d`` (groups=1; Q acts
on the flattened filter, as in PEFT's ``SVDConv2d``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.layer import Adapter
from deltatune.core.layers import describe


class SvdAdapter(Adapter):
    """``base(x) + s · P diag(λ ⊙ mask) Q drop(x)`` on a linear layer (``transposed``: GPT-2 ``Conv1D``).

    The module also keeps the importance averages Ī, Ū of its parameters (plain tensors, not
    state: they live only while training).
    """

    def __init__(self, d_in: int, d_out: int, rank: int = 12, alpha: float = 8.0, dropout: float = 0.0,
                 transposed: bool = False) -> None:
        super().__init__()
        self.rank, self.scaling, self.transposed = rank, alpha / rank, transposed
        self.P = nn.Parameter(torch.randn(d_out, rank) * 0.02)  # (d_out, r) left singular vectors
        self.Lambda = nn.Parameter(torch.zeros(rank))           # (r,)  singular values, 0: identity at init
        self.Q = nn.Parameter(torch.randn(rank, d_in) * 0.02)   # (r, d_in) right singular vectors
        self.register_buffer("mask", torch.ones(rank, dtype=torch.bool))  # the final allocation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.importance: dict[str, tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return f"d_in={self.Q.shape[1]}, d_out={self.P.shape[0]}, rank={int(self.mask.sum())}/{self.rank}"

    def values(self) -> Tensor:
        return self.Lambda * self.mask  # (r,)

    def forward(self, x: Tensor, base: Any) -> Tensor:
        z = F.linear(self.dropout(x), self.Q.to(x.dtype)) * self.values().to(x.dtype)  # (..., r)
        return base(x) + F.linear(z, self.P.to(x.dtype)) * self.scaling

    def update(self) -> Tensor:
        return (self.P * self.values()) @ self.Q * self.scaling  # (d_out, d_in)

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = self.update()
        return delta.t() if self.transposed else delta

    # --- rank allocation ----------------------------------------------------------------------

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """One EMA step of sensitivity Ī and uncertainty Ū from the current ``.grad``s."""
        for key, p in (("P", self.P), ("Lambda", self.Lambda), ("Q", self.Q)):
            if p.grad is None:
                raise RuntimeError(
                    "AdaLoRA needs the gradients to rank its triplets: call deltatune.on_train_step(model, "
                    "step, total_steps) after optimizer.step() and before optimizer.zero_grad()"
                )
            ipt = (p * p.grad).abs()
            avg, unc = self.importance.get(key, (torch.zeros_like(p), torch.zeros_like(p)))
            avg = beta1 * avg + (1 - beta1) * ipt
            unc = beta2 * unc + (1 - beta2) * (ipt - avg).abs()
            self.importance[key] = (avg, unc)

    def training_state(self) -> dict[str, Tensor]:
        """Ī and Ū by parameter, for training checkpoints (``TrainingState``): a resumed run reallocates as
        an uninterrupted one."""
        return {f"{key}.{part}": t for key, pair in self.importance.items() for part, t in zip(("avg", "unc"), pair)}

    def load_training_state(self, state: dict[str, Tensor]) -> None:
        device = self.Lambda.device
        self.importance = {key: (state[f"{key}.avg"].to(device), state[f"{key}.unc"].to(device))
                           for key in dict.fromkeys(k.rsplit(".", 1)[0] for k in state)}

    def scores(self) -> Tensor:
        """Triplet importance S_i, (r,)."""
        s = {k: avg * unc for k, (avg, unc) in self.importance.items()}
        return s["Lambda"] + s["Q"].mean(dim=1) + s["P"].mean(dim=0)

    @torch.no_grad()
    def keep(self, kept: Tensor, final: bool) -> None:
        """Zero λ outside ``kept`` (r,); ``final`` also records it in ``mask``."""
        self.Lambda.masked_fill_(~kept, 0.0)
        if final:
            self.mask.copy_(self.mask & kept)
            self.importance.clear()


class SvdConv(SvdAdapter):
    """AdaLoRA on ``nn.Conv1d``/``nn.Conv2d``: the update is a kernel, ``conv(x, reshape(s · P Λ Q))``."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, rank: int = 12, alpha: float = 8.0, dropout: float = 0.0) -> None:
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("AdaLoRA supports convolutions with groups=1 and padding_mode='zeros'")
        super().__init__(conv.weight[0].numel(), conv.out_channels, rank, alpha, dropout)
        self.kernel_shape = tuple(conv.weight.shape)
        self.conv = F.conv1d if len(conv.kernel_size) == 1 else F.conv2d
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: Tensor, base: Any) -> Tensor:
        delta = self.delta_weight(base).to(x.dtype)  # (C_out, C_in, *k)
        return base(x) + self.conv(self.dropout(x), delta, None, self.stride, self.padding, self.dilation)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.update().view(self.kernel_shape)


def budget_schedule(step: int, total_steps: int, init_budget: int, target_budget: int,
                    tinit: int, tfinal: int, delta_t: int) -> tuple[int, bool]:
    """The budget b(step) and whether to reallocate at this step (PEFT's ``budget_schedule``)."""
    if step <= tinit:
        return init_budget, False
    if step > total_steps - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((init_budget - target_budget) * remaining**3 + target_budget), step % delta_t == 0


def allocate(adapters: list[SvdAdapter], budget: int, final: bool = False) -> None:
    """Keep the ``budget`` most important triplets across ``adapters``; zero the rest of λ."""
    scores = [a.scores() for a in adapters]
    flat = torch.cat([s.to(torch.float64).cpu() for s in scores])  # (Σ r,)
    drop = len(flat) - budget
    kept = torch.ones(len(flat), dtype=torch.bool)
    if drop > 0:
        kept[torch.argsort(flat, stable=True)[:drop]] = False
    for adapter, part in zip(adapters, kept.split([len(s) for s in scores])):
        adapter.keep(part.to(adapter.mask.device), final)


def adalora_layers(model: nn.Module, name: str = "default", config: Any = None) -> dict[str, SvdAdapter]:
    """Module name -> AdaLoRA adapter of adapter ``name`` (only those ``config`` built, if given)."""
    from deltatune.core.parts import adapters_of

    return {n: a for n, a in adapters_of(model, name, config) if isinstance(a, SvdAdapter)}


def ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Module name -> rank kept by the final allocation (``init_rank`` before it)."""
    return {n: int(a.mask.sum()) for n, a in adalora_layers(model, name).items()}


def orthogonal_regularization(model: nn.Module, name: str = "default", config: Any = None) -> Tensor:
    """Mean over P and Q of adapter ``name`` of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (unweighted)."""
    terms = []
    for a in adalora_layers(model, name, config).values():
        for gram in (a.Q @ a.Q.t(), a.P.t() @ a.P):  # (r, r)
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(a.rank, dtype=gram.dtype, device=gram.device)))
    return torch.stack(terms).mean()


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA hyperparameters.

    Attributes:
        init_rank: r, the rank every layer starts with.
        target_rank: the average rank left after the final allocation.
        alpha: the update is scaled by α / init_rank.
        dropout: dropout on the adapter's input.
        tinit: warm-up steps before the budget starts to fall.
        tfinal: steps at the end trained with the final allocation frozen.
        delta_t: reallocate every ΔT steps while the budget falls.
        beta1 / beta2: EMA factors of the sensitivity and of its uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser in ``regularization``.
    """

    method: ClassVar[str] = "adalora"
    family: ClassVar[str] = "reparameterization"
    suggested_lr: ClassVar[float | None] = 5e-3  # measured on the tweet-sentiment task (4,000 examples, one epoch): at 1e-3 it stayed near the majority class
    search_space: ClassVar[dict[str, Any]] = {"target_rank": (8, 4)}  # plan / tune / compare --grid

    init_rank: int = 12
    target_rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def validate(self) -> None:
        if not 1 <= self.target_rank <= self.init_rank:
            raise ValueError(f"AdaLoRA needs 1 <= target_rank <= init_rank, got {self.target_rank} and {self.init_rank}")
        if self.alpha == 0:
            raise ValueError("AdaLoRA alpha must not be 0: the update is scaled by alpha/rank and would always be zero")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoRA dropout must be in [0, 1), got {self.dropout}")
        if self.tinit < 0 or self.tfinal < 0 or self.delta_t < 1:
            raise ValueError(f"AdaLoRA needs tinit >= 0, tfinal >= 0 and delta_t >= 1; got "
                             f"{self.tinit}, {self.tfinal}, {self.delta_t}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"AdaLoRA beta1 and beta2 must lie in (0, 1), got {self.beta1} and {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRA orth_reg_weight must be >= 0, got {self.orth_reg_weight}")

    def update_rank(self, name: str) -> int | None:
        return self.init_rank

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        kw = dict(rank=self.init_rank, alpha=self.alpha, dropout=self.dropout)
        spec = describe(base)
        if spec is not None and spec.kind == "linear":
            adapter: Adapter = SvdAdapter(spec.d_in, spec.d_out, transposed=spec.transposed, **kw)
        elif spec is not None and spec.kind == "conv" and not spec.transposed and spec.spatial in (1, 2):
            adapter = SvdConv(base, **kw)
        else:
            return None
        return adapter.to(device=base.weight.device)

    def regularization(self, model: nn.Module, name: str) -> Tensor | None:
        """``orth_reg_weight`` × the orthogonality penalty, while the adapter trains."""
        layers = adalora_layers(model, name, self).values()
        if self.orth_reg_weight == 0 or not any(a.Q.requires_grad for a in layers):
            return None
        return self.orth_reg_weight * orthogonal_regularization(model, name, self)

    def on_step(self, model: nn.Module, name: str, step: int, total_steps: int) -> None:
        """Update the importance and reallocate the rank budget after optimizer step ``step``."""
        if total_steps - self.tfinal <= self.tinit:
            raise ValueError(f"AdaLoRA's schedule needs tinit + tfinal < total_steps to leave a budgeting phase; "
                             f"got tinit={self.tinit}, tfinal={self.tfinal}, total_steps={total_steps}")
        layers = list(adalora_layers(model, name, self).values())
        if not layers or not layers[0].Q.requires_grad:
            return  # not the adapter being trained
        init_budget = sum(a.rank for a in layers)
        target_budget = self.target_rank * len(layers)
        end = total_steps - self.tfinal
        if step < end:
            for a in layers:
                a.update_importance(self.beta1, self.beta2)
            budget, now = budget_schedule(step, total_steps, init_budget, target_budget,
                                          self.tinit, self.tfinal, self.delta_t)
            if now:
                allocate(layers, budget)
        elif sum(int(a.mask.sum()) for a in layers) > target_budget:
            if any(not a.importance for a in layers):
                raise RuntimeError("AdaLoRA has no importance scores for its final allocation: call "
                                   "deltatune.on_train_step after every optimizer step during training")
            allocate(layers, target_budget, final=True)
