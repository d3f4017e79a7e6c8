"""Sequential recommendation: adapt a pretrained recommender to a new period, with new items.

``deltatune train --set task=recommend`` (defaults: MovieLens-100K from the ``recbole`` package):

1. the interactions are split in time: the first ``data.cutoff`` share (default 0.7) is the past;
2. the base, a SASRec (``train/sasrec.py``) over the items of the past, is trained on the past
   once and cached (``$DELTATUNE_CACHE/sasrec-<hash>``): the "pretrained" recommender;
3. its item table is grown with one row per item first seen after the cutoff (``grow_table``;
   the old rows stay bit-identical), and the method trains a delta on the interactions after
   the cutoff;
4. evaluation is leave-last-out per user, as the field does it: each user active after the cutoff
   has their last interaction held out for test and the one before for validation (when it is
   after the cutoff too; ``data.validation_positions=k``: the k before, a less noisy signal for
   choosing settings); the model ranks **every** item (full ranking, no sampled negatives) from
   the history before it, and we report HR@10, NDCG@10 and MRR. Items already in the user's history
   are removed from the ranking (a MovieLens user rates a movie once), as RecBole does.

The training examples are the histories up to the held-out items, with a target at every position
whose interaction is after the cutoff (earlier positions are context only).

Methods: every method applies (the layers are plain Linear / LayerNorm / Embedding). The task's
defaults put LoRA on the attention projections and the item table, token rows (``tokens``) on the new
items' rows only (``adapter.original_vocab_size`` is filled in from the data), and a ``hybrid`` of both.

Item IDs are names (see ``train/interactions.py``): the table's rows are the past items sorted by
name, then the new items sorted by name; a trained model records that list (its ``labels``), and a
model evaluated on data that gives another list is refused rather than silently renumbered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from deltatune.train.data import Splits
from deltatune.train.interactions import Interactions, item_index, lookup, movielens_100k, read_interactions
from deltatune.train.sasrec import SASRec, SasrecSpec, collate, is_sasrec_dir, load_sasrec, pretrained_base, spans
from deltatune.train.task import Task

if TYPE_CHECKING:
    from deltatune.train.schema import TrainConfig

BASE_MODEL = "sasrec"
DEFAULT_CUTOFF = 0.7
ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
TABLE = "item_embeddings"
K = 10
#: The task's LoRA: rank 2 on the attention projections, rank 4 on the item table (4.8 % trainable).
LORA: dict[str, Any] = {"target": [*ATTENTION, TABLE], "rank": 2, "alpha": 8.0, "rank_pattern": {TABLE: 4}}


class ItemNames(list):
    """The item table's names in row order (row 0, padding, has none); short when printed."""

    def __repr__(self) -> str:
        return f"<{len(self):,} item names>"

    __str__ = __repr__


@dataclass
class Periods:
    """The data split in time, and the item table it implies."""

    data: Interactions
    cutoff: float        # a timestamp: interactions before it are the past
    old: list[str]       # items of the past (the base's table), sorted
    new: list[str]       # items first seen after the cutoff, sorted

    @property
    def names(self) -> ItemNames:
        return ItemNames(self.old + self.new)


_PERIODS: dict[tuple[str, float, float], Periods] = {}


def periods(config: TrainConfig) -> Periods:
    """Read the interactions and split them at the cutoff (memoised per file, its mtime and cutoff)."""
    path = Path(config.data.path) if config.data.path else movielens_100k()
    fraction = config.data.cutoff if config.data.cutoff is not None else DEFAULT_CUTOFF
    if not path.is_file():
        raise ValueError(f"interactions file {path} not found (data.path)")
    key = (str(path.resolve()), path.stat().st_mtime, fraction)
    if key not in _PERIODS:
        data = read_interactions(path)
        cutoff = data.cutoff_time(fraction)
        old, new = data.items_before(cutoff), data.items_from(cutoff)
        if not old:
            raise ValueError(f"{path}: no interaction lies before the cutoff (data.cutoff={fraction}); raise it")
        if not any(r.time >= cutoff for r in data.rows):
            raise ValueError(f"{path}: no interaction lies after the cutoff (data.cutoff={fraction}); lower it")
        _PERIODS[key] = Periods(data, cutoff, old, new)
    return _PERIODS[key]


def spec_for(config: TrainConfig, num_items: int) -> SasrecSpec:
    return SasrecSpec(num_items=num_items, max_len=config.max_length)


def base_model(config: TrainConfig, p: Periods) -> SASRec:
    """The pretrained base (cached), its table grown by one row per new item."""
    from deltatune.methods.tokens import grow_table

    index = item_index(p.old)
    past = [[index[r.item] for r in h if r.time < p.cutoff] for h in p.data.histories.values()]
    model = pretrained_base(p.data.digest, p.old, [s for s in past if len(s) > 1], spec_for(config, len(p.old) + 1))
    if p.new:
        grow_table(model, TABLE, len(p.new))
        model.spec = SasrecSpec(**{**model.spec.__dict__, "num_items": len(p.old) + 1 + len(p.new)})
    return model


def held_out(p: Periods, max_len: int, positions: int = 1, test_positions: int = 1) -> dict[str, list[Any]]:
    """Leave-last-out examples: ``train`` (inputs, targets) windows (``train_users``: whose),
    ``validation``/``test`` (user, history rows, target row).

    Test is each user's last interaction. Validation is the ``positions`` interactions before it (1: the
    penultimate one, as SASRec and BERT4Rec do), each predicted from the history before it, as long as
    they lie after the cutoff and leave a history of at least one item. Training stops before the first
    held-out interaction: no validation or test item is a training input or target. With more positions
    the validation signal has less noise (MovieLens-100K, cutoff 0.7: 393 validation items at 1, 1,899
    at 5); a final fit of the chosen setting at ``positions=1`` trains on all but the last two again.

    ``test_positions=k`` (a rolling evaluation, for statistical power: one test item per user leaves a
    paired standard error as large as the effects one compares) makes test the user's last ``k``
    interactions, each predicted from its own prefix (the earlier held-out items are history inputs, never
    training inputs or targets), under the same rule: after the cutoff, with at least one item of history.
    The last of them is the leave-last-out item with its usual history; validation is the ``positions``
    before the first test item. The training windows equal those of ``positions + k - 1`` validation
    positions and one test position: the same interactions are held out, split differently.
    """
    index = item_index(p.names)
    out: dict[str, list[Any]] = {"train": [], "validation": [], "test": [], "train_users": []}
    for user, h in p.data.histories.items():
        rows = [index[r.item] for r in h]
        recent = [r.time >= p.cutoff for r in h]
        if len(rows) < 2 or not recent[-1]:
            continue  # nothing to evaluate: no history before the last item, or inactive after the cutoff
        first_test = len(rows) - 1
        while first_test - 1 >= 1 and recent[first_test - 1] and len(rows) - first_test < test_positions:
            first_test -= 1  # rows[first_test] is a test item too
        out["test"] += [(user, rows[:j], rows[j]) for j in range(first_test, len(rows))]  # oldest first
        end = first_test
        while end - 1 >= 1 and recent[end - 1] and first_test - end < positions:
            end -= 1  # hold out rows[end] for validation
        out["validation"] += [(user, rows[:j], rows[j]) for j in range(end, first_test)]  # oldest first
        seq = rows[:end]
        targets = [t if recent[i] else -100 for i, t in enumerate(seq)]  # only the new period is trained on
        for s, e in spans(len(seq), max_len):
            y = targets[s + 1:e]
            if any(t != -100 for t in y):
                out["train"].append((seq[s:e - 1], y))
                out["train_users"].append(user)  # whose window it is (per-segment training)
    return out


def ranks(logits: torch.Tensor, targets: torch.Tensor, seen: list[list[int]]) -> torch.Tensor:
    """0-based rank of each target among all items, history items removed: (B,)."""
    logits = logits.float().clone()
    for row, items in enumerate(seen):
        others = [i for i in items if i != int(targets[row])]
        if others:
            logits[row, others] = float("-inf")
    mine = logits.gather(1, targets[:, None])                                   # (B, 1)
    return (logits > mine).sum(1)


def scores(rank: torch.Tensor) -> dict[str, float]:
    """HR@10, NDCG@10 and MRR of 0-based ranks."""
    r = rank.double()
    hit = r < K
    return {"hr_10": hit.double().mean().item(),
            "ndcg_10": torch.where(hit, 1.0 / torch.log2(r + 2.0), 0.0).mean().item(),
            "mrr": (1.0 / (r + 1.0)).mean().item()}


class RecommendTask(Task):
    name: ClassVar[str] = "recommend"
    kind: ClassVar[str] = "recommendation"
    inputs: ClassVar[str] = "item histories"
    description: ClassVar[str] = "next-item recommendation after a time cutoff (MovieLens-100K, SASRec base)"
    headline: ClassVar[str] = "ndcg_10"
    validation_metrics: ClassVar[tuple[str, ...]] = ("hr_10", "ndcg_10", "mrr")
    # Measured with ``python -m bench.recommend_sweep`` (3 seeds; README): 10 epochs for every method (full
    # fine-tuning's gain still grows after 5) with the loop's linear decay (LoRA's validation score is
    # higher with it than at a constant rate, and steadier), and LoRA with more rank on the item table
    # than on attention at lr 1e-2.
    defaults: ClassVar[dict[str, Any]] = {"model": BASE_MODEL, "epochs": 10, "batch_size": 64, "eval_batch_size": 256,
                                          "max_length": 50, "warmup_ratio": 0.0, "checkpoint_every": 1000,
                                          # a 180k-parameter model: float32 costs little, and scores repeat across CPUs
                                          "precision": "fp32"}
    #: Learning rates for this task, ahead of each method's generic suggestion (measured here, see README).
    method_lr: ClassVar[dict[str, float]] = {"full": 1e-3, "lora": 1e-2, "tokens": 1e-2, "hybrid": 1e-2,
                                             "bitfit": 1e-2}
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        # rank 2 on the attention projections, 4 on the item table: 4.8 % of the parameters train
        "lora": dict(LORA),
        "tokens": {"target": TABLE},
        "hybrid": {"parts": [{"method": "lora", **LORA}, {"method": "tokens", "target": TABLE}]},
    }
    compare_columns: ClassVar[tuple[tuple[str, str], ...]] = (("hr_10", "HR@10"), ("ndcg_10", "NDCG@10"),
                                                               ("mrr", "MRR"))

    def check_config(self, config: TrainConfig) -> None:
        if config.model != BASE_MODEL and not is_sasrec_dir(config.model):
            raise ValueError(f"task recommend trains its own base: model must be {BASE_MODEL!r} (or a SASRec "
                             f"saved by a full fine-tune), got {config.model!r}")
        if config.max_length > 200:
            raise ValueError("task recommend: max_length is the history length SASRec attends over; keep it <= 200")
        self._fill_new_rows(config)

    def _fill_new_rows(self, config: TrainConfig) -> None:
        """``tokens`` here means the new items' rows: fill ``original_vocab_size`` from the data."""
        adapter = config.adapter
        parts = adapter.get("parts") if config.method == "hybrid" else [adapter] if config.method == "tokens" else []
        todo = [i for i, part in enumerate(parts or []) if isinstance(part, dict) and
                (config.method == "tokens" or part.get("method") == "tokens") and
                part.get("token_ids") is None and part.get("original_vocab_size") is None]
        if not todo:
            return
        old = len(periods(config).old) + 1  # + the padding row
        if config.method == "tokens":
            config.adapter = {**adapter, "original_vocab_size": old}
        else:
            config.adapter = {**adapter, "parts": [{**p, "original_vocab_size": old} if i in todo else p
                                                   for i, p in enumerate(parts)]}

    def load_model(self, name: str, labels: list[str] | None, config: TrainConfig | None) -> tuple | None:
        if is_sasrec_dir(name):  # a full fine-tune
            model, meta = load_sasrec(name)
            return model, None, []
        if config is None:
            raise ValueError("task recommend builds its base from the data: pass the run's config")
        p = periods(config)
        if labels is not None and list(labels) != p.names:
            raise ValueError(f"the model's item table ({len(labels):,} items) differs from the one this data gives "
                             f"({len(p.names):,} items, cutoff {config.data.cutoff or DEFAULT_CUTOFF}); evaluate it on "
                             "the data and cutoff it was trained with")
        return base_model(config, p), None, []

    def load_splits(self, config: TrainConfig, labels: list[str] | None = None) -> Splits:
        p = periods(config)
        if labels is not None and list(labels) != p.names:
            raise ValueError(f"the model knows {len(labels):,} items but this data gives {len(p.names):,}; "
                             "evaluate it on the data and cutoff it was trained with")
        ex = held_out(p, config.max_length, config.data.validation_positions or 1)
        d = config.data
        if d.max_train_examples:
            ex["train"] = ex["train"][:d.max_train_examples]
        if d.max_eval_examples:
            ex["validation"], ex["test"] = ex["validation"][:d.max_eval_examples], ex["test"][:d.max_eval_examples]
        if not ex["test"]:
            raise ValueError(f"{p.data.source}: no user is active after the cutoff with a history before; "
                             "lower data.cutoff")
        return Splits(ex["train"], ex["validation"], ex["test"], labels=p.names)

    def encode(self, tokenizer: Any, examples: list[tuple], max_length: int) -> list[dict[str, Any]]:
        if examples and len(examples[0]) == 2:  # training windows
            return [{"input_ids": x[-max_length:], "labels": y[-max_length:]} for x, y in examples]
        return [{"input_ids": h[-max_length:], "seen": h, "target": t, "user": u} for u, h, t in examples]

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return collate([(it["input_ids"], it["labels"]) for it in items], max_len=10**9)

    @torch.no_grad()
    def ranks(self, model: nn.Module, items: list[dict[str, Any]], batch_size: int, run: Any) -> torch.Tensor:
        """The 0-based rank of each item's target, in order."""
        out = []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            batch = collate([(it["input_ids"], [-100] * len(it["input_ids"])) for it in chunk], max_len=10**9)
            logits = run(model, {"input_ids": batch["input_ids"]}).logits.float().cpu()
            targets = torch.tensor([it["target"] for it in chunk])
            out.append(ranks(logits, targets, [it["seen"] for it in chunk]))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def evaluate(self, model: nn.Module, items: list[dict[str, Any]], tokenizer: Any,
                 batch_size: int, run: Any) -> dict[str, float]:
        if not items:
            return {}
        if not isinstance(model, nn.Module):  # e.g. an exported ONNX model scored through ONNX Runtime
            return scores(self.ranks(model, items, batch_size, run))
        was = model.training
        model.eval()
        try:
            return scores(self.ranks(model, items, batch_size, run))
        finally:
            model.train(was)

    def final_metrics(self, model: nn.Module, splits: Splits, encoded: dict[str, list], tokenizer: Any,
                      config: TrainConfig, run: Any) -> dict[str, Any]:
        """Test metrics of the trained model and of the unadapted base (``test_base_*``), overall and
        on the test users whose held-out item is a new one (``test_new_*``)."""
        test = encoded["test"]
        old = len(periods(config).old) + 1
        new = [it for it in test if it["target"] >= old]
        metrics: dict[str, Any] = {}
        base = self.load_model(config.model if config.model == BASE_MODEL else BASE_MODEL, splits.labels, config)[0]
        device = next(model.parameters()).device
        for prefix, m in (("test_", model), ("test_base_", base.to(device))):
            metrics.update({f"{prefix}{k}": v for k, v in self.evaluate(m, test, None, config.eval_batch_size, run).items()})
            if new:
                metrics.update({f"{prefix}new_{k}": v for k, v in
                                self.evaluate(m, new, None, config.eval_batch_size, run).items()})
        metrics["test_users"], metrics["test_new_item_users"] = len(test), len(new)
        gain = metrics["test_ndcg_10"] - metrics["test_base_ndcg_10"]
        metrics["test_ndcg_10_gain"] = gain
        return metrics

    def input_field(self, records: list[dict[str, Any]], config: TrainConfig) -> str:
        return "history"

    def probe_batch(self, tokenizer: Any) -> dict[str, torch.Tensor]:
        """Two fixed histories of item rows, left-padded, for merge's before / after check (the scores
        cover every item, the rows grown for new items included)."""
        return {"input_ids": collate([(list(range(1, 9)), [-100] * 8), (list(range(9, 14)), [-100] * 5)],
                                     max_len=10**9)["input_ids"]}

    @torch.no_grad()
    def predict(self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]], config: TrainConfig,
                labels: list[str] | None, run: Any) -> list[dict[str, Any]]:
        """``{"history": "242 302 51"}`` (item IDs, oldest first, space-separated) -> the top 10 items not
        in the history, by name, with their scores. An item the model does not know is an error naming it;
        an empty history (a user never seen) has nothing to rank from and is refused."""
        names = list(labels or [])
        index = item_index(names)
        items = []
        for n, record in enumerate(records, 1):
            history = str(record["history"]).split()
            if not history:
                raise ValueError(f"record {n}: empty history; a user with no interactions has nothing to rank "
                                 "from (recommend popular items to new users instead)")
            rows = [lookup(index, item, f"record {n}") for item in history]
            items.append({"input_ids": rows[-config.max_length:], "seen": rows, "target": 0})
        model.eval()
        out = []
        for i in range(0, len(items), config.eval_batch_size):
            chunk = items[i:i + config.eval_batch_size]
            batch = collate([(it["input_ids"], [-100] * len(it["input_ids"])) for it in chunk], max_len=10**9)
            logits = run(model, {"input_ids": batch["input_ids"]}).logits.float().cpu()
            for row, it in enumerate(chunk):
                logits[row, it["seen"]] = float("-inf")
            top = logits.topk(K, dim=1)
            out += [{"items": [names[j - 1] for j in idx.tolist()], "scores": [round(v, 4) for v in val.tolist()]}
                    for val, idx in zip(top.values, top.indices)]
        return out

    def compare_note(self, metrics: dict[str, Any]) -> str:
        """The unadapted base's line above the ``deltatune compare`` table."""
        m = metrics
        return (f"Unadapted base (pretrained before the cutoff, table grown for the new items) on the test split: "
                f"HR@10 {m['test_base_hr_10']:.4f}, NDCG@10 {m['test_base_ndcg_10']:.4f}, MRR {m['test_base_mrr']:.4f} "
                f"({m['test_users']} users, {m['test_new_item_users']} of them holding out a new item). "
                "Full ranking over every item, leave-last-out.")

    def summary(self, metrics: dict[str, Any]) -> str:
        m = metrics
        return (f"test HR@10 {m['test_hr_10']:.4f}, NDCG@10 {m['test_ndcg_10']:.4f}, MRR {m['test_mrr']:.4f} "
                f"({m['test_users']} users; unadapted base: NDCG@10 {m['test_base_ndcg_10']:.4f})")
