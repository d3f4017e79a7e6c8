"""The method registry: method name -> config class. An explicit dict, no import-time magic.

Adding a method: write ``methods/<name>.py`` (docstring with the reference and equation, a frozen
config dataclass whose ``build`` returns the adapter module for one layer, and the module), add
one line here, and add ``tests/methods/test_<name>.py``. The conformance suite picks it up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deltatune.config import AdapterConfig, HybridConfig, check_keys
from deltatune.methods.dora import DoraConfig
from deltatune.methods.loha import LohaConfig
from deltatune.methods.lokr import LokrConfig
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.lora import LoraConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.ln import LNTuningConfig
from deltatune.methods.partial import PartialConfig
from deltatune.methods.tokens import TokensConfig
from deltatune.methods.oft import OftConfig
from deltatune.methods.vera import VeraConfig
from deltatune.methods.prefix import PrefixConfig
from deltatune.methods.prompt import PromptConfig
from deltatune.methods.ptuning import PtuningConfig
from deltatune.methods.visual_prompt import VisualPromptConfig

METHODS: dict[str, type[AdapterConfig]] = {
    "lora": LoraConfig,
    "bitfit": BitFitConfig,
    "bottleneck": BottleneckConfig,
    "ia3": IA3Config,
    "ln": LNTuningConfig,
    "partial": PartialConfig,
    "tokens": TokensConfig,
    "dora": DoraConfig,
    "loha": LohaConfig,
    "lokr": LokrConfig,
    "vera": VeraConfig,
    "oft": OftConfig,
    "adalora": AdaLoraConfig,
    "prompt": PromptConfig,
    "prefix": PrefixConfig,
    "ptuning": PtuningConfig,
    "visual_prompt": VisualPromptConfig,
}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Build the config for ``data["method"]``, rejecting unknown methods and keys."""
    method = data.get("method")
    if method == HybridConfig.method:
        return _hybrid_from_dict(data)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))} (or hybrid)")
    return METHODS[method].from_dict(data)


def _hybrid_from_dict(data: dict[str, Any]) -> HybridConfig:
    """A hybrid from ``{"method": "hybrid", "parts": [<method config>, ...], "modules_to_save": [...]}``."""
    data = dict(data)
    data.pop("method", None)
    check_keys(data, ["parts", "modules_to_save"], what="a hybrid config")
    parts = data.get("parts")
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, Mapping) for p in parts):
        raise ValueError("a hybrid config needs 'parts': a list of method configs, each with a 'method' key")
    return HybridConfig(parts=tuple(config_from_dict(dict(p)) for p in parts),
                        modules_to_save=tuple(data.get("modules_to_save", ())))
