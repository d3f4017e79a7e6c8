"""What a task is: its data, its model head, how it batches, and how it is scored.

The training loop only ever calls ``model(**batch).loss``; everything that depends on the kind of
task (sequence classification, causal-LM instruction tuning, ...) sits behind this small
interface, so adding a task is one new class plus one registry line in ``tasks.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from deltatune.train.schema import TrainConfig
    from deltatune.train.data import Splits


class Task:
    """Base class. ``defaults`` fill the top-level config keys a user did not set (``model``,
    ``epochs``, ``lr``...); ``method_defaults[method]`` fills that method's ``adapter:`` keys and
    ``method_lr[method]`` its learning rate (measured on this task; it wins over the method's
    generic ``suggested_lr``, and an explicit ``lr`` wins over both)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    method_lr: ClassVar[dict[str, float]] = {}
    #: The metric that picks nothing but is printed each epoch and plotted (e.g. ``accuracy``).
    headline: ClassVar[str] = "loss"
    #: The metrics ``evaluate`` reports, so a mistyped ``early_stopping_metric`` is refused before the
    #: run starts (empty: not declared, and it is checked at the first validation instead).
    validation_metrics: ClassVar[tuple[str, ...]] = ()
    #: What the model reads at prediction time, in words: ``deltatune serve`` answers text only.
    inputs: ClassVar[str] = "text"

    def check_config(self, config: TrainConfig) -> None:
        """Reject settings this task cannot use (raise ``ValueError`` naming the fix)."""

    def fixed_labels(self) -> list[str] | None:
        """Class names known without reading data (``None`` if the task has none or reads them)."""
        return None

    def load_splits(self, config: TrainConfig, labels: list[str] | None = None) -> Splits:
        """The examples; ``labels`` are a trained model's class names (in head order), if it has any."""
        raise NotImplementedError

    def data_labels(self, config: TrainConfig) -> list[str] | None:
        """Class names read from the configured data, for a model that records none."""
        return None

    def auto_model_class(self) -> Any:
        """The transformers ``AutoModelFor...`` class that puts this task's head on a base model."""
        raise NotImplementedError

    def model_kwargs(self, labels: list[str] | None) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments (e.g. ``num_labels``)."""
        return {}

    def encode(self, tokenizer: Any, examples: list[tuple], max_length: int) -> list[dict[str, Any]]:
        """Turn examples into token ids once, before training."""
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Pad encoded items into model inputs, including the targets the model's loss reads."""
        raise NotImplementedError

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets the model's mean loss on ``batch`` averages over (examples by default;
        a causal LM's reply or text tokens): gradient accumulation weights micro-batches by it."""
        return len(next(iter(batch.values())))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, items: list[dict[str, Any]], tokenizer: Any,
                 batch_size: int, run: Any) -> dict[str, float]:
        """Metrics on encoded items; ``run(batch)`` moves a batch to the device and runs the model."""
        raise NotImplementedError

    def final_metrics(self, model: nn.Module, splits: Splits, encoded: dict[str, list], tokenizer: Any,
                      config: TrainConfig, run: Any) -> dict[str, Any]:
        """Test-set metrics (plus baselines) reported at the end of a run, keys prefixed ``test_``."""
        metrics = self.evaluate(model, encoded["test"], tokenizer, config.eval_batch_size, run)
        return {f"test_{k}": v for k, v in metrics.items()}

    def summary(self, metrics: dict[str, Any]) -> str:
        """One or two lines for the terminal at the end of a run."""
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("test_"))

    def input_field(self, records: list[dict[str, Any]], config: TrainConfig) -> str:
        """The field of the input records that ``predict`` reads its text from."""
        return "text"

    # Hooks with a default that fits text tasks (the image task overrides them).
    def load_model(self, name: str, labels: list[str] | None, config: TrainConfig | None) -> tuple | None:
        """``(model, tokenizer, new module names)`` for a task that builds its own models; ``None``:
        load ``name`` with transformers (``auto_model_class``)."""
        return None

    def item_length(self, item: dict[str, Any]) -> int:
        """An encoded item's cost, for batching items of similar length together."""
        return len(item["input_ids"])

    def probe_batch(self, tokenizer: Any) -> dict[str, torch.Tensor] | None:
        """A fixed model input for ``merge`` to compare outputs before and after; ``None``: two texts."""
        return None

    def write_run_files(self, out: Path, artifact: Path, tokenizer: Any) -> None:
        """Extra files a finished run writes into its directory and its adapter/model (e.g. preprocessing)."""

    def read_inputs(self, path: Path) -> list[dict[str, Any]] | None:
        """Input records for ``predict`` from a path this task reads itself (e.g. pictures); ``None``:
        read ``path`` as a JSONL/CSV/TXT table."""
        return None

    def predict(self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]], config: TrainConfig,
                labels: list[str] | None, run: Any) -> list[dict[str, Any]]:
        """One output record per input record (``deltatune predict``)."""
        raise NotImplementedError
