"""A readable module tree of an adapted model: type, parameter count, and what each adapter does there.

Repeated blocks (``encoder.layer.1`` ... ``encoder.layer.5`` shaped and adapted like
``encoder.layer.0``) are shown once and summarised, so a 30-layer model still fits on a screen.
"""

from __future__ import annotations

from torch import nn

import deltatune as dt
from deltatune.core.layer import FullCopy


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _mark(layer: dt.AdaptedLayer) -> str:
    parts = [f"{name}: trained in full" if isinstance(adapter, FullCopy)
             else f"{name}: {type(adapter).__name__} +{_params(adapter):,}"
             for name, adapter in layer.adapters.items()]
    return "  <- " + "; ".join(parts)


def _signature(module: nn.Module) -> tuple:
    """Structure of a subtree: names, types, and which modules are adapted (and how)."""
    return tuple((n, type(m).__name__, tuple(m.adapters) if isinstance(m, dt.AdaptedLayer) else ())
                 for n, m in module.named_modules())


def render_tree(model: nn.Module, depth: int = 8) -> str:
    """One line per module down to ``depth``; deeper subtrees say how many adapted layers they hold."""
    lines = [f"{type(model).__name__} ({_params(model):,} parameters)"]

    def adapted_inside(module: nn.Module) -> int:
        return sum(isinstance(m, dt.AdaptedLayer) for m in module.modules())

    def walk(module: nn.Module, prefix: str, level: int) -> None:
        children = list(module.named_children())
        first_sig = _signature(children[0][1]) if isinstance(module, nn.ModuleList) and children else None
        repeats = [n for n, c in children[1:] if first_sig is not None and _signature(c) == first_sig]
        for i, (child_name, child) in enumerate(children):
            name, indent = f"{prefix}{child_name}", "  " * level
            if child_name in repeats:
                if child_name == repeats[0]:
                    count = adapted_inside(child)
                    span = repeats[0] if len(repeats) == 1 else f"{repeats[0]}..{repeats[-1]}"
                    lines.append(f"{indent}{prefix}{span}: {len(repeats)} more {type(child).__name__} "
                                 f"like {prefix}{children[0][0]}" + (f" ({count} adapted in each)" if count else ""))
                continue
            if isinstance(child, dt.AdaptedLayer):
                base = child.base
                lines.append(f"{indent}{name}: {type(base).__name__} ({_params(base):,}){_mark(child)}")
                continue
            count = adapted_inside(child)
            deeper = level + 1 >= depth and any(child.children())
            lines.append(f"{indent}{name}: {type(child).__name__} ({_params(child):,})"
                         + (f", {count} adapted inside" if count and deeper else ""))
            if not deeper:
                walk(child, name + ".", level + 1)

    walk(model, "", 1)
    return "\n".join(lines)
