"""P-tuning: GPT Understands, Too (Liu et al., 2021, arXiv:2103.10385).

    h = f([P ; E(x)]),    P = g(Z),    Z ∈ R^{N×d} trainable

Prompt tuning whose N virtual tokens are produced by a trainable prompt encoder g, which couples
the tokens and eases optimisation:

- ``mlp``:  g(Z) = W₃ relu(W₂ relu(W₁ Z))                   (d → m → m → d)
- ``lstm``: g(Z) = W₅ relu(W₄ BiLSTM(Z))                    (d → 2m per position, → 2m → d)

with m = ``encoder_hidden_size`` (default d). This is the definition Hugging Face PEFT implements
(``PromptEncoder``); the virtual tokens are prepended to the input exactly as in prompt tuning
(``methods/prompt.py``). The encoder only serves training: :func:`deltatune.drop_reparameterization`
replaces it by the N tokens it outputs, leaving a plain prompt tuning adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.contract import VirtualTokens
from deltatune.core.layers import describe
from deltatune.core.layer import Adapter
from deltatune.core.plumbing import provider
from deltatune.methods.prompt import INPUT_EMBEDDINGS, PromptConfig, PromptEmbedding, check_virtual_tokens
from deltatune.methods.prompt import input_embedding_names

Encoder = Literal["mlp", "lstm"]


class PromptEncoder(Adapter):
    """Virtual tokens ``g(Z)``: a trainable ``embedding`` Z (N, d) through an MLP or BiLSTM + MLP."""

    def __init__(self, num_virtual_tokens: int, dim: int, hidden: int, encoder: Encoder = "mlp",
                 num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, dim))  # Z: (N, d)
        self.lstm: nn.LSTM | None = None
        if encoder == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                                bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim))

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def virtual_tokens(self) -> Tensor:
        z = self.embedding                                  # (N, d)
        if self.lstm is not None:
            z = self.lstm(z.unsqueeze(0))[0].squeeze(0)     # (1, N, d) -> (N, 2m)
        return self.mlp(z)                                  # (N, d)

    def forward(self, x: Tensor, base: Any) -> Tensor:
        return base(x)  # the tokens enter through the model-level hook

    @torch.no_grad()
    def materialized(self) -> PromptEmbedding:
        """The plain prompt this encoder currently produces."""
        tokens = self.virtual_tokens()
        prompt = PromptEmbedding(tokens.shape[0], tokens.shape[1]).to(device=tokens.device, dtype=tokens.dtype)
        prompt.prompt.copy_(tokens)
        return prompt


@dataclasses.dataclass(frozen=True)
class PtuningConfig(AdapterConfig):
    """P-tuning hyperparameters.

    Attributes:
        num_virtual_tokens: N, the number of virtual tokens.
        encoder: the prompt encoder, ``mlp`` or ``lstm``.
        encoder_hidden_size: m, its hidden width (default: the model's embedding width d).
        encoder_num_layers: LSTM layers (``lstm`` only).
        encoder_dropout: dropout between LSTM layers (``lstm`` only).
    """

    method: ClassVar[str] = "ptuning"
    family: ClassVar[str] = "addition"
    suggested_lr: ClassVar[float | None] = 1e-2  # like prompt tuning, learned prompt encoders need large steps
    search_space: ClassVar[dict[str, Any]] = {"num_virtual_tokens": (20, 10, 40)}  # plan / tune / compare --grid
    default_target: ClassVar[Any] = INPUT_EMBEDDINGS
    identity_at_init: ClassVar[bool] = False
    reparameterized: ClassVar[bool] = True
    plumbing: ClassVar[Any] = VirtualTokens  # served by integrations/ (core/plumbing.py)

    num_virtual_tokens: int = 20
    encoder: Encoder = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        check_virtual_tokens(self, "P-tuning")
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"P-tuning encoder must be 'mlp' or 'lstm', got {self.encoder!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError("encoder_hidden_size must be >= 1 (or unset for the model width), "
                             f"got {self.encoder_hidden_size}")
        if self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers must be >= 1, got {self.encoder_num_layers}")
        if self.encoder == "mlp" and self.encoder_num_layers != 2:
            raise ValueError("encoder_num_layers applies to encoder='lstm'; the MLP encoder has 3 fixed layers")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")

    def select_modules(self, model: nn.Module) -> list[str]:
        return input_embedding_names(self, model, "P-tuning")

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        if (spec := describe(base)) is None or spec.kind != "embedding":  # the input embedding table
            return None
        dim = base.embedding_dim
        return PromptEncoder(self.num_virtual_tokens, dim, self.encoder_hidden_size or dim, self.encoder,
                             self.encoder_num_layers, self.encoder_dropout).to(base.weight.device)

    def on_attach(self, model: nn.Module, name: str) -> list[Any]:
        plumbing = provider(self.plumbing)  # integrations/ serves the capability (core/plumbing.py)
        layer = plumbing.input_layer(model, name, self, "P-tuning")
        return plumbing.hooks(model, layer, name, "P-tuning")

    def materialized(self) -> PromptConfig:
        """The prompt tuning config of this adapter once its encoder is dropped."""
        return PromptConfig(target=self.target, exclude=self.exclude, modules_to_save=self.modules_to_save,
                            num_virtual_tokens=self.num_virtual_tokens)
