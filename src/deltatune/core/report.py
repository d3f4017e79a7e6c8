"""What ``attach`` did and what a model trains: plain values, printed for people.

``AttachReport`` is ``attach``'s return value; ``parameter_report`` counts trainable and total
parameters of any model (shared tensors once), adapted or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class AttachReport:
    """What ``attach`` did: the adapted modules and the resulting parameter counts."""

    name: str
    method: str
    targets: list[str]
    modules_to_save: list[str]
    adapter_parameters: int
    trainable_parameters: int
    total_parameters: int
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        share = 100.0 * self.trainable_parameters / max(1, self.total_parameters)
        lines = [
            f"adapter {self.name!r} ({self.method}) on {len(self.targets)} modules",
            f"  trainable: {self.trainable_parameters:,} of {self.total_parameters:,} parameters ({share:.3f}%)",
        ]
        lines += [f"  + {t}" for t in self.targets[:8]]
        if len(self.targets) > 8:
            lines.append(f"  ... and {len(self.targets) - 8} more")
        lines += [f"  + {m} (trained in full)" for m in self.modules_to_save]
        return "\n".join(lines)


@dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int
    trainable_bytes: int

    @property
    def share(self) -> float:
        return self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return (f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.3f}%), "
                f"{self.trainable_bytes / 2**20:.2f} MiB")


def parameter_report(model: nn.Module) -> ParamReport:
    """Trainable and total parameter counts (shared tensors counted once) and trainable bytes."""
    seen: set[int] = set()
    trainable = total = nbytes = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            nbytes += p.numel() * p.element_size()
    return ParamReport(trainable=trainable, total=total, trainable_bytes=nbytes)
