"""What an ONNX export needs to know about one kind of model: :class:`OnnxSpec`.

A spec is plain data plus one ``nn.Module``: the module to trace (a thin wrapper whose
``forward`` takes the ONNX inputs in order and returns the ONNX outputs in order), the names and
dynamic axes of those inputs and outputs, the inputs it is traced with, and other inputs (other
batch sizes, lengths, padding) on which ONNX Runtime is compared with PyTorch afterwards.
``export/tasks.py`` builds one per task kind; ``export/onnx.py`` knows no task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn


@dataclass
class OnnxSpec:
    """How to export and check one model.

    ``inputs`` / ``outputs``: ONNX names, in the order ``module.forward`` takes and returns them.
    ``dynamic``: input name -> {axis: axis name}; inputs sharing an axis name share its size.
    ``pack``: a feed (input name -> tensor) as the arguments of ``module.forward``; by default the
    inputs in order. ``dynamic_shapes``: the same structure with ``torch.export.Dim`` per axis
    (built by :func:`dims` from ``dynamic`` unless ``pack`` nests the inputs).
    ``sample``: the inputs the graph is traced with (every dynamic axis > 1, so none is fixed).
    ``checks``: further inputs; ONNX Runtime must give PyTorch's outputs on each.
    ``compare``: which part of each output to compare, ``(inputs, outputs) -> outputs`` (e.g. the
    logits of real tokens only: a padded query row attends to nothing and is arbitrary in both).
    ``write_beside``: writes what a runtime needs next to the model (tokenizer, preprocessing).
    ``meta``: facts recorded in ``export.json`` (task kind, label names, input layout...).
    """

    kind: str
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]
    sample: dict[str, Tensor]
    checks: list[dict[str, Tensor]] = field(default_factory=list)
    compare: Callable[[dict[str, Tensor], list[Tensor]], list[Tensor]] | None = None
    write_beside: Callable[[Path], None] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    pack: Callable[[dict[str, Tensor]], tuple] | None = None
    dynamic_shapes: Any = None
    #: Fills the inputs a task's batch lacks (a decoder's position ids and empty past), so the
    #: task's own ``evaluate`` can score the ONNX model through :class:`~deltatune.export.runtime.OrtModel`.
    complete: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    #: A further check run on the ONNX session (e.g. greedy generation equal to PyTorch's): -> facts.
    verify: Callable[[Any], dict[str, Any]] | None = None
    #: Examples of the run's training/validation splits -> feeds (one picture each) through the task's
    #: own preprocessing. When set, ``--quantize int8`` is ONNX Runtime's *static* quantization
    #: calibrated on them (convolutions); otherwise dynamic quantization (transformers).
    calibrate: Callable[[list[tuple]], list[dict[str, Tensor]]] | None = None

    def args(self, feed: dict[str, Tensor]) -> tuple:
        """``feed`` as the positional arguments of ``module.forward``."""
        missing = [name for name in self.inputs if name not in feed]
        if missing:
            raise ValueError(f"inputs lack {missing[0]!r}; the model takes {', '.join(self.inputs)}")
        return self.pack(feed) if self.pack else tuple(feed[name] for name in self.inputs)

    def shapes(self) -> Any:
        """``dynamic_shapes`` for ``torch.onnx.export``: given, or one ``Dim`` per named axis, in input order."""
        if self.dynamic_shapes is not None:
            return self.dynamic_shapes
        return tuple(dims(self.dynamic.get(name, {})) for name in self.inputs)


_DIMS: dict[str, Any] = {}


def dims(axes: dict[int, str]) -> dict[int, Any]:
    """{axis: name} -> {axis: torch.export.Dim(name)}; one Dim object per name, so equal names are one size."""
    import torch

    return {axis: _DIMS.setdefault(name, torch.export.Dim(name)) for axis, name in axes.items()}
