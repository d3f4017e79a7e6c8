"""OFT: Orthogonal Finetuning (Qiu et al., 2023, arXiv:2306.07280), in the input-rotating form that
Hugging Face PEFT implements since OFTv2 (Qiu et al., 2025, arXiv:2506.19847).

    h = W R x + b,    R = diag(R_1, …, R_n),    R_i = (I + Q_i)(I − Q_i)⁻¹,    Q_i = −Q_iᵀ ∈ R^{k×k}

The layer's input (d_in = n·k features) is split into n blocks of k; each block is rotated by the
Cayley transform of a skew-symmetric Q_i, whose strict upper triangle (k(k−1)/2 numbers, row-major,
as ``torch.triu_indices``) is the trainable vector q_i. q = 0 gives R = I, so training starts from
the base model. R is orthogonal, so the update keeps the angles between the neurons of W.

Options, all as in PEFT:

- ``block_share``: one q for all n blocks;
- ``coft`` (constrained OFT): each skew block is kept within a Frobenius ball of radius
  ε/√m (m = number of q vectors). The forward pass uses the projected q (straight-through) and
  ``on_step`` projects q in place after each optimizer step, which is what PEFT's in-forward
  projection amounts to;
- ``module_dropout``: in training, a random share of the blocks is replaced by the identity;
- ``neumann_terms`` = t > 0: (I − Q)⁻¹ ≈ Σ_{j<t} Qʲ (faster on accelerators, not exactly orthogonal).

Differences from PEFT 0.21.2, kept on purpose and covered by the tests:

- PEFT's two Cayley modes rotate in opposite directions for the same parameters: its exact mode
  (``use_cayley_neumann=False``) equals ours with q copied as is, its Neumann mode with
  ``num_cayley_neumann_terms=t+1`` (t ≥ 3) equals ours with ``neumann_terms=t`` and q negated.
  PEFT defaults to the Neumann mode; we default to the exact transform.
- On a convolution the rotation acts on the flattened filter (C_in·Πkernel features, the order of
  PEFT's merge). PEFT's unmerged conv forward rotates unfolded input patches and folds them back,
  which sums overlapping patches and equals its own merged weight only for 1×1 kernels; here the
  forward always equals the merged weight: ``base(x) + conv(x, W (R − I))``. PEFT does not adapt
  GPT-2's ``Conv1D``; here it is rotated like a Linear layer.

Block sizes: set ``block_size`` (k) or ``num_blocks`` (n), not both. A value that does not divide a
layer's input size is moved to the nearest divisor, the smaller one on a tie (PEFT's rule), with a
warning naming the layer.

Merging: ``W ← W R`` computed in float64; unmerging multiplies by R⁻¹ (``merge_atol`` covers the
float32 rounding of the merged weight).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.layer import Adapter
from deltatune.core.layers import describe


def nearest_divisor(n: int, want: int) -> int:
    """The divisor of ``n`` closest to ``want`` (ties to the smaller one); ``n`` if ``want >= n``."""
    if want >= n:
        return n
    higher = want
    while n % higher:
        higher += 1
    lower = want
    while n % lower:
        lower -= 1
    return lower if want - lower <= higher - want else higher


def cayley(Q: Tensor, neumann_terms: int = 0) -> Tensor:
    """``(I + Q)(I − Q)⁻¹`` for a batch of skew-symmetric ``Q`` (m, k, k); a truncated series if asked."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand_as(Q)
    if neumann_terms == 0:
        return torch.linalg.solve(eye - Q, eye + Q)  # (I − Q)⁻¹(I + Q), equal since they commute
    series, power = eye, eye
    for _ in range(neumann_terms - 1):
        power = power @ Q
        series = series + power
    return (eye + Q) @ series


class OftRotation(Adapter):
    """Block-diagonal Cayley rotation of a layer's ``features`` input features.

    Subclasses say where the rotation goes (the input of a linear layer, the flattened filters of a
    convolution); this class owns q, the rotation blocks and merging.
    """

    merge_atol: ClassVar[float] = 1e-5

    def __init__(self, features: int, block_size: int, block_share: bool = False, coft: bool = False,
                 eps: float = 6e-5, module_dropout: float = 0.0, neumann_terms: int = 0) -> None:
        super().__init__()
        if features % block_size:
            raise ValueError(f"OFT block size {block_size} must divide the {features} input features")
        k, n = block_size, features // block_size
        self.features, self.block_size, self.num_blocks = features, k, n
        self.coft, self.eps, self.module_dropout, self.neumann_terms = coft, eps, module_dropout, neumann_terms
        self.q = nn.Parameter(torch.zeros(1 if block_share else n, k * (k - 1) // 2))  # (m, k(k−1)/2)
        rows, cols = torch.triu_indices(k, k, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def extra_repr(self) -> str:
        share = ", block_share" if self.q.shape[0] == 1 and self.num_blocks > 1 else ""
        return f"features={self.features}, blocks={self.num_blocks}×{self.block_size}{share}"

    def skew(self, q: Tensor) -> Tensor:
        """(m, k(k−1)/2) -> (m, k, k) skew-symmetric."""
        k = self.block_size
        upper = q.new_zeros(q.shape[0], k, k)
        upper[:, self.rows, self.cols] = q
        return upper - upper.transpose(-2, -1)

    def project(self, q: Tensor) -> Tensor:
        """COFT: scale each skew block into the Frobenius ball of radius ε/√m."""
        radius = self.eps / math.sqrt(q.shape[0])
        norm = math.sqrt(2.0) * q.norm(dim=-1, keepdim=True)  # ‖Q_i‖_F, each entry appears twice
        return torch.where(norm <= radius, q, q * (radius / norm.clamp_min(torch.finfo(q.dtype).tiny)))

    def blocks(self, dtype: torch.dtype | None = None) -> Tensor:
        """The rotation blocks R_i, (n, k, k); module dropout applies in training mode only."""
        q = self.q if dtype is None else self.q.to(dtype)
        if q.dtype in (torch.float16, torch.bfloat16):
            q = q.float()  # linalg.solve needs float32 or wider
        if self.coft:
            q = q + (self.project(q) - q).detach()  # straight-through: PEFT's projected q, its gradient
        R = cayley(self.skew(q), self.neumann_terms).expand(self.num_blocks, -1, -1)  # (n, k, k)
        if self.training and self.module_dropout > 0 and self.num_blocks > 1 and self.q.shape[0] > 1:
            n = self.num_blocks
            drop = torch.zeros(n, dtype=torch.bool, device=R.device)
            drop[torch.randperm(n, device=R.device)[: int(self.module_dropout * n)]] = True
            R = torch.where(drop[:, None, None], torch.eye(self.block_size, dtype=R.dtype, device=R.device), R)
        return R

    def rotate_input(self, x: Tensor, R: Tensor) -> Tensor:
        """x ↦ R x on the last dimension: (..., n·k) -> (..., n·k)."""
        xb = x.reshape(*x.shape[:-1], self.num_blocks, self.block_size)  # (..., n, k)
        return torch.einsum("...nk,nck->...nc", xb, R.to(x.dtype)).reshape(x.shape)

    def rotate_weight(self, weight: Tensor, R: Tensor) -> Tensor:
        """W ↦ W R for a weight whose flattened trailing dimensions are the rotated features."""
        w = weight.reshape(weight.shape[0], self.num_blocks, self.block_size)  # (d_out, n, k)
        return torch.einsum("onk,nkc->onc", w, R.to(weight.dtype)).reshape(weight.shape)

    @torch.no_grad()
    def project_in_place(self) -> None:
        if self.coft:
            self.q.copy_(self.project(self.q))

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        self._transform_base(base, self._eval_blocks())

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        self._transform_base(base, torch.linalg.inv(self._eval_blocks()))

    def _eval_blocks(self) -> Tensor:
        training = self.training
        self.train(False)
        try:
            return self.blocks(torch.float64)
        finally:
            self.train(training)

    def _transform_base(self, base: nn.Module, R: Tensor) -> None:
        weight = base.weight
        weight.copy_(self._rotated(weight.to(torch.float64), R).to(weight.dtype))

    def _rotated(self, weight: Tensor, R: Tensor) -> Tensor:
        return self.rotate_weight(weight, R)


class OftLinear(OftRotation):
    """OFT on a linear layer: ``base(R x)``. ``transposed`` for GPT-2's ``Conv1D`` (weight (d_in, d_out))."""

    def __init__(self, d_in: int, block_size: int, transposed: bool = False, **kw: Any) -> None:
        super().__init__(d_in, block_size, **kw)
        self.transposed = transposed

    def forward(self, x: Tensor, base: Any) -> Tensor:
        return base(self.rotate_input(x, self.blocks()))

    def _rotated(self, weight: Tensor, R: Tensor) -> Tensor:
        if self.transposed:  # Wᵀ ↦ Rᵀ Wᵀ = (W R)ᵀ
            return self.rotate_weight(weight.t(), R).t()
        return self.rotate_weight(weight, R)


class OftConv(OftRotation):
    """OFT on ``nn.Conv1d``/``nn.Conv2d``: the flattened filters rotate, ``W ↦ W R``."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, block_size: int, **kw: Any) -> None:
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("OFT supports convolutions with groups=1 and padding_mode='zeros'")
        super().__init__(conv.weight[0].numel(), block_size, **kw)
        self.conv = F.conv1d if len(conv.kernel_size) == 1 else F.conv2d
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: Tensor, base: Any) -> Tensor:
        # base(x) + conv(x, W R − W): the rotation as an additive update keeps inner adapters in ``base``.
        weight = base.weight.to(x.dtype)                                  # (C_out, C_in, *k)
        delta = self.rotate_weight(weight, self.blocks()) - weight
        return base(x) + self.conv(x, delta, None, self.stride, self.padding, self.dilation)


@dataclasses.dataclass(frozen=True)
class OftConfig(AdapterConfig):
    """OFT hyperparameters.

    Attributes:
        block_size: k, the size of each rotation block (0 to size by ``num_blocks``).
        num_blocks: n, the number of blocks per layer (PEFT's ``r``; 0 to size by ``block_size``).
        block_share: one rotation block shared by all blocks of a layer.
        coft: constrained OFT, with radius ``eps``.
        eps: the COFT radius (only with ``coft``).
        module_dropout: share of blocks replaced by the identity in training.
        neumann_terms: 0 for the exact Cayley transform, t > 0 for a t-term Neumann series.
    """

    method: ClassVar[str] = "oft"
    family: ClassVar[str] = "reparameterization"
    search_space: ClassVar[dict[str, Any]] = {"block_size": (32, 16, 64)}  # plan / tune / compare --grid

    block_size: int = 32
    num_blocks: int = 0
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5
    module_dropout: float = 0.0
    neumann_terms: int = 0

    def validate(self) -> None:
        if self.block_size < 0 or self.num_blocks < 0 or (self.block_size > 0) == (self.num_blocks > 0):
            raise ValueError(f"OFT needs exactly one of block_size and num_blocks set (> 0) and the other 0 "
                             f"(e.g. block_size=0 to size by num_blocks); got block_size={self.block_size}, "
                             f"num_blocks={self.num_blocks}")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"OFT module_dropout must be in [0, 1), got {self.module_dropout}")
        if self.eps <= 0:
            raise ValueError(f"OFT eps must be > 0, got {self.eps}")
        if self.neumann_terms < 0:
            raise ValueError(f"OFT neumann_terms must be 0 (exact Cayley) or a positive count, got {self.neumann_terms}")

    def _block_size(self, name: str, features: int) -> int:
        if self.num_blocks:
            n = nearest_divisor(features, self.num_blocks)
            size, wanted, what = features // n, self.num_blocks, "num_blocks"
            adjusted = n != self.num_blocks
        else:
            size = nearest_divisor(features, self.block_size)
            wanted, what, adjusted = self.block_size, "block_size", size != self.block_size
        if adjusted:
            warnings.warn(f"OFT {what}={wanted} does not fit the {features} input features of {name!r}; "
                          f"using {features // size} blocks of {size}", stacklevel=3)
        return size

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        kw = dict(block_share=self.block_share, coft=self.coft, eps=self.eps,
                  module_dropout=self.module_dropout, neumann_terms=self.neumann_terms)
        spec = describe(base)
        if spec is not None and spec.kind == "linear":
            adapter: Adapter = OftLinear(spec.d_in, self._block_size(name, spec.d_in), transposed=spec.transposed, **kw)
        elif spec is not None and spec.kind == "conv" and not spec.transposed and spec.spatial in (1, 2):
            adapter = OftConv(base, self._block_size(name, base.weight[0].numel()), **kw)
        else:
            return None
        return adapter.to(device=base.weight.device)

    def on_step(self, model: nn.Module, name: str, step: int, total_steps: int) -> None:
        """COFT: project every q of adapter ``name`` back into its ball after the optimizer step."""
        if not self.coft:
            return
        from deltatune.core.records import adapted_layers

        for _, layer in adapted_layers(model):
            for m in layer.adapters[name].modules() if name in layer.adapters else ():
                if isinstance(m, OftRotation):
                    m.project_in_place()
