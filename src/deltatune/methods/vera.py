"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024, arXiv:2310.11454).

    h = W x + Λ_b B Λ_d A x,    Λ_b = diag(b) ∈ R^{d_out×d_out},  Λ_d = diag(d) ∈ R^{r×r}

A ∈ R^{r×d_in} and B ∈ R^{d_out×r} are random, frozen and *shared by every adapted layer*; only the
vectors d ∈ R^r and b ∈ R^{d_out} train, so a layer costs r + d_out parameters whatever r is.
b starts at zero (training starts from the base model) and d at ``d_initial``.

Shared matrices. As in Hugging Face PEFT, one pair (A, B) is drawn for the largest input and output
sizes among the adapted layers, and each layer uses the top-left slice ``A[:, :d_in]``,
``B[:d_out, :]``. The pair is drawn from ``projection_seed`` with a CPU ``torch.Generator``
(Kaiming-uniform, A first, then B; bit-identical to PEFT's draw for the same key), so it is never
saved: ``load_adapter`` draws it again when it re-attaches the adapter, and the adapter file holds
only the d and b vectors. The pair lives in one :class:`VeraProjection` module that every layer of
the adapter holds as a submodule (one tensor pair per adapter, moved once by ``model.to``); its
buffers are non-persistent, so neither ``state_dict`` nor the adapter file contains them.
(PEFT's ``save_projection=True`` stores the pair in the file instead; with ``False`` it behaves
like this.)

Supported layers: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored transposed).
Mergeable: ``W += Λ_b B Λ_d A``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.layer import Adapter
from deltatune.core.layers import describe


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(d_in, d_out, transposed)`` for ``nn.Linear`` and GPT-2's ``Conv1D``; None otherwise."""
    spec = describe(module)
    return (spec.d_in, spec.d_out, spec.transposed) if spec is not None and spec.kind == "linear" else None


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform (gain √2, fan-in = ``shape[1]``) drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The frozen random pair (A, B) shared by all layers of one VeRA adapter."""

    def __init__(self, rank: int, max_in: int, max_out: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("A", kaiming_uniform((rank, max_in), g), persistent=False)   # (r, max d_in)
        self.register_buffer("B", kaiming_uniform((max_out, rank), g), persistent=False)  # (max d_out, r)

    def extra_repr(self) -> str:
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)} (frozen, shared, regenerated from the seed)"


class VeraLinear(Adapter):
    """VeRA on a linear layer: ``base(x) + b ⊙ B_s (d ⊙ A_s drop(x))``. ``transposed`` for GPT-2 ``Conv1D``.

    The shared projection is set by :meth:`share` (the config's ``on_attach`` hook) once every layer
    of the adapter is known, since its size depends on the largest of them.
    """

    def __init__(self, d_in: int, d_out: int, rank: int = 256, d_initial: float = 0.1,
                 dropout: float = 0.0, transposed: bool = False) -> None:
        super().__init__()
        self.d_in, self.d_out, self.rank, self.transposed = d_in, d_out, rank, transposed
        self.d = nn.Parameter(torch.full((rank,), float(d_initial)))  # (r,)
        self.b = nn.Parameter(torch.zeros(d_out))                     # (d_out,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection: VeraProjection | None = None

    def share(self, projection: VeraProjection) -> None:
        if projection.A.shape[0] != self.rank or projection.A.shape[1] < self.d_in or projection.B.shape[0] < self.d_out:
            raise ValueError(f"VeRA projection {projection.extra_repr()} is too small for a "
                             f"({self.d_out}, {self.d_in}) layer of rank {self.rank}")
        self.projection = projection

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}"

    def _slices(self, like: Tensor) -> tuple[Tensor, Tensor]:
        if self.projection is None:
            raise RuntimeError("this VeRA layer has no shared projection; attach it with deltatune.attach")
        A = self.projection.A[:, : self.d_in].to(like.dtype)   # (r, d_in)
        B = self.projection.B[: self.d_out, :].to(like.dtype)  # (d_out, r)
        return A, B

    def forward(self, x: Tensor, base: Any) -> Tensor:
        h = base(x)                                    # (..., d_out)
        A, B = self._slices(x)
        z = F.linear(self.dropout(x), A) * self.d.to(x.dtype)  # (..., r)
        return h + F.linear(z, B) * self.b.to(x.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        A, B = self._slices(self.d)
        delta = (self.b[:, None] * B) @ (self.d[:, None] * A)  # (d_out, d_in)
        return delta.t() if self.transposed else delta


@dataclasses.dataclass(frozen=True)
class VeraConfig(AdapterConfig):
    """VeRA hyperparameters.

    Attributes:
        rank: r, the inner size of the shared random projection (VeRA uses large r: the cost per
            layer is r + d_out trainable numbers).
        projection_seed: seed of the shared random A and B (PEFT's ``projection_prng_key``); it is
            saved in the config and the pair is drawn again on load.
        d_initial: initial value of every entry of d.
        dropout: dropout on the adapter's input.
    """

    method: ClassVar[str] = "vera"
    family: ClassVar[str] = "reparameterization"
    suggested_lr: ClassVar[float | None] = 5e-3  # only scaling vectors train; the VeRA paper uses ~1e-2 on GLUE
    search_space: ClassVar[dict[str, Any]] = {"rank": (256, 64)}  # plan / tune / compare --grid

    rank: int = 256
    projection_seed: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"VeRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VeRA dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.projection_seed < 2**63:
            raise ValueError(f"VeRA projection_seed must be a non-negative 64-bit integer, got {self.projection_seed}")

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        dims = linear_dims(base)
        if dims is None:
            return None
        d_in, d_out, transposed = dims
        adapter = VeraLinear(d_in, d_out, rank=self.rank, d_initial=self.d_initial,
                             dropout=self.dropout, transposed=transposed)
        return adapter.to(device=base.weight.device)

    def on_attach(self, model: nn.Module, name: str) -> list[Any]:
        """Draw the shared pair, sized to the largest adapted layer, and hand it to every layer."""
        from deltatune.core.parts import adapters_of

        # This config's layers (even inside a hybrid), found from the model's structure.
        adapters = [a for _, a in adapters_of(model, name, self) if isinstance(a, VeraLinear) and a.projection is None]
        if not adapters:  # an equal config earlier in the same hybrid already served these layers
            return []
        max_in = max(a.d_in for a in adapters)
        max_out = max(a.d_out for a in adapters)
        projection = VeraProjection(self.rank, max_in, max_out, self.projection_seed)
        projection.to(device=adapters[0].b.device, dtype=adapters[0].b.dtype)
        for adapter in adapters:
            adapter.share(projection)
        return []
