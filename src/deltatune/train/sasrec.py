"""SASRec: a causal transformer over each user's item history (Kang & McAuley, ICDM 2018, arXiv:1808.09781).

    h_t = Transformer(E[i_1] + P_1, ..., E[i_t] + P_t)_t          (causal self-attention, pre-norm)
    score(j | i_1..i_t) = h_t · E[j]                               (the item table scores every item)

trained with the full softmax over every item (cross-entropy at every position, as RecBole's SASRec
does), never with sampled negatives. Row 0 of the item table is padding. The candidate embeddings
are read through the item table module itself (``item_embeddings(all ids)``), so an adapter on the
table (LoRA, new-item rows) changes the inputs and the scores alike, merged or not.

The layers are plain ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``,
``fc2``), ``nn.LayerNorm`` and ``nn.Embedding``: every deltatune method applies.

:func:`pretrained_base` is the "pretrained" recommender: trained here on the interactions before a
time cutoff, once, and cached under ``$DELTATUNE_CACHE/sasrec-<hash>`` (the hash covers the data's
bytes, the cutoff, the architecture and the training settings), like the SmolLM2 conversion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.files import remove_leftovers, temp_dir
from deltatune.train.cache import cache_dir

SPEC_FILE = "sasrec.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class SasrecSpec:
    """The architecture. ``num_items`` counts the padding row 0."""

    num_items: int
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2


@dataclass
class RecOutput:
    loss: Tensor | None
    logits: Tensor  # (N, num_items): scores of every item where a target is (training) or at the last position


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a 2-layer feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, T, d = x.shape
        h = self.norm1(x)
        split = lambda t: t.view(B, T, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731 (B, H, T, d/H)
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out_proj(a.transpose(1, 2).reshape(B, T, d)))
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm2(x))))))


class SASRec(nn.Module):
    """``model(input_ids, labels)`` -> :class:`RecOutput`; ``input_ids`` (B, T) left-padded with 0,
    ``labels`` (B, T) the next item at each position (-100: none)."""

    def __init__(self, spec: SasrecSpec) -> None:
        super().__init__()
        self.spec = spec
        self.item_embeddings = nn.Embedding(spec.num_items, spec.dim, padding_idx=0)
        self.positions = nn.Embedding(spec.max_len, spec.dim)
        self.blocks = nn.ModuleList(Block(spec.dim, spec.heads, spec.dropout) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(spec.dim)
        self.drop = nn.Dropout(spec.dropout)
        nn.init.normal_(self.item_embeddings.weight, std=spec.dim ** -0.5)
        with torch.no_grad():
            self.item_embeddings.weight[0].zero_()

    def hidden(self, input_ids: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, d) states; position t sees items 1..t."""
        B, T = input_ids.shape
        if T > self.spec.max_len:
            input_ids, T = input_ids[:, -self.spec.max_len:], self.spec.max_len
        x = self.item_embeddings(input_ids) * math.sqrt(self.spec.dim)
        x = self.drop(x + self.positions(torch.arange(T, device=input_ids.device)))
        valid = input_ids != 0                                                    # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()       # (T, T)
        # Keys: earlier, real items; every position also sees itself (a padding row never sees nothing).
        mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)  # (B, T, T)
        mask = mask[:, None]                                                      # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def candidates(self) -> Tensor:
        """Every item's embedding, read through the item table (adapters included): (V, d)."""
        ids = torch.arange(self.spec.num_items, device=self.positions.weight.device)
        return self.item_embeddings(ids)

    def score(self, h: Tensor) -> Tensor:
        logits = h @ self.candidates().to(h.dtype).t()                            # (N, V)
        return logits.masked_fill(torch.arange(logits.shape[-1], device=h.device) == 0, float("-inf"))

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> RecOutput:
        h = self.hidden(input_ids)
        if labels is None:
            return RecOutput(None, self.score(h[:, -1]))
        labels = labels[:, -h.shape[1]:]
        at = labels != -100                                                        # (B, T)
        logits = self.score(h[at])                                                 # (N, V)
        return RecOutput(F.cross_entropy(logits.float(), labels[at]), logits)

    # A full fine-tune saves the whole model (FullStrategy calls this).
    def save_pretrained(self, directory: str | Path, items: list[str] | None = None) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_FILE))
        meta = {"sasrec": dataclasses.asdict(self.spec), **({"items": list(items)} if items is not None else {})}
        (directory / SPEC_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        (directory / "config.json").write_text(json.dumps({"model_type": "deltatune-sasrec"}) + "\n")


def load_sasrec(directory: str | Path) -> tuple[SASRec, dict[str, Any]]:
    """A model written by :meth:`SASRec.save_pretrained`, and its metadata."""
    from safetensors.torch import load_file

    from deltatune.core.files import read_json_file

    directory = Path(directory)
    meta = read_json_file(directory / SPEC_FILE)
    try:
        spec = SasrecSpec(**meta["sasrec"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{directory / SPEC_FILE} does not describe a SASRec model ({err}); retrain it") from None
    model = SASRec(spec)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval(), meta


def is_sasrec_dir(path: str | Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


@dataclass(frozen=True)
class Pretraining:
    """How the base is pretrained (part of the cache key)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


def spans(n: int, max_len: int) -> list[tuple[int, int]]:
    """``[start, end)`` slices of a length-``n`` sequence, ``max_len + 1`` long at most, from the end
    backwards, each starting where the next one's first target is (every item after the first is a
    target exactly once, so a long history loses no interaction)."""
    out, end = [], n
    while end > 1:
        start = max(0, end - max_len - 1)
        out.append((start, end))
        end = start + 1 if start > 0 else 0
    return out


def windows(seq: list[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """A sequence as (inputs, next items) windows of at most ``max_len`` (see :func:`spans`)."""
    return [(seq[s:e - 1], seq[s + 1:e]) for s, e in spans(len(seq), max_len)]


def collate(examples: list[tuple[list[int], list[int]]], max_len: int) -> dict[str, Tensor]:
    """Left-pad (inputs, labels) pairs to the longest: inputs with 0, labels with -100."""
    T = min(max_len, max(len(x) for x, _ in examples))
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        x, y = x[-T:], y[-T:]
        ids[row, T - len(x):] = torch.tensor(x, dtype=torch.long)
        labels[row, T - len(y):] = torch.tensor(y, dtype=torch.long)
    return {"input_ids": ids, "labels": labels}


def train_sasrec(model: SASRec, examples: list[tuple[list[int], list[int]]], how: Pretraining,
                 log: Any = print) -> None:
    """Plain AdamW over shuffled windows (used for the base; adaptation runs through the training loop)."""
    generator = torch.Generator().manual_seed(how.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=how.lr)
    model.train()
    for epoch in range(how.epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        total = 0.0
        for i in range(0, len(order), how.batch_size):
            batch = collate([examples[j] for j in order[i:i + how.batch_size]], model.spec.max_len)
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        if log and ((epoch + 1) % 5 == 0 or epoch == 0):
            log(f"  base epoch {epoch + 1}/{how.epochs}: loss {total / math.ceil(len(order) / how.batch_size):.3f}")
    model.eval()


def pretrained_base(digest: str, items: list[str], sequences: list[list[int]], spec: SasrecSpec,
                    how: Pretraining = Pretraining(), log: Any = print) -> SASRec:
    """The base SASRec trained on ``sequences`` (item rows, time order) over the table ``items``,
    from the cache if it was trained before (``digest``: the data's hash; part of the key)."""
    key = json.dumps({"data": digest, "items": items, "spec": dataclasses.asdict(spec),
                      "pretraining": dataclasses.asdict(how), "format": 1}, sort_keys=True)
    target = cache_dir() / f"sasrec-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if is_sasrec_dir(target):
        model, meta = load_sasrec(target)
        if meta.get("items") == items and model.spec == spec:
            return model
    log(f"training the base SASRec on {len(sequences):,} histories (once; cached under {target})")
    torch.manual_seed(how.seed)
    model = SASRec(spec)
    examples = [w for seq in sequences for w in windows(seq, spec.max_len)]
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        train_sasrec(model, examples, how, log)
    log(f"  trained in {time.perf_counter() - t0:.0f} s")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent)
    tmp = temp_dir(target)
    try:
        model.save_pretrained(tmp, items)
        if not is_sasrec_dir(target):  # another process may have finished first: keep its copy
            if target.exists():
                shutil.rmtree(target)  # an older format under the same key
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model
