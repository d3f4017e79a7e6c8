"""deltatune: parameter-efficient fine-tuning (delta tuning) for any PyTorch model.

    import deltatune as dt

    report = dt.attach(model, dt.LoraConfig(target=["query", "value"], rank=8), name="sentiment")
    ...train...
    dt.save_adapter(model, "out/sentiment", name="sentiment")
    dt.merge_and_unload(model)
"""

from deltatune.config import AdapterConfig, HybridConfig
from deltatune.core.active import (
    active_adapters, disabled, mark_trainable, on_train_step, regularization_loss, set_active, using)
from deltatune.core.inject import attach, detach
from deltatune.core.records import configs
from deltatune.core.report import AttachReport, parameter_report, ParamReport
from deltatune.core.layer import Adapter, AdaptedLayer
from deltatune.core.merge import merge, merge_and_unload, unmerge
from deltatune.core.products import cpu_engine, set_cpu_engine
from deltatune.core.combine import combine
from deltatune.core.composition import composed, set_composition
from deltatune.core.routing import Router, delete_adapter, routing, run_grouped
from deltatune.core.targeting import NoMatchError, select
from deltatune.methods import METHODS, config_from_dict
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
from deltatune.methods.tokens import TokensConfig, grow_table
from deltatune.methods.oft import OftConfig
from deltatune.methods.vera import VeraConfig
from deltatune.methods.prefix import PrefixConfig
from deltatune.methods.prompt import PromptConfig, drop_reparameterization
from deltatune.methods.ptuning import PtuningConfig

# Model-level plumbing (virtual tokens, key/value prefixes) is served by integrations/ through a
# table in core; this explicit line is the only place that wires them (see core/plumbing.py).
from deltatune.core.plumbing import PROVIDERS as _PLUMBING
from deltatune.integrations.transformers_plumbing import PROVIDERS as _TRANSFORMERS_PLUMBING

_PLUMBING.update(_TRANSFORMERS_PLUMBING)

# Quantized linear layers (bitsandbytes, torchao) are recognised by the core through this table
# (core/layers.py); integrations/quantize.py imports neither library until it is used.
from deltatune.core.layers import QUANTIZED_FORMATS as _QUANTIZED
from deltatune.integrations.quantize import FORMATS as _QUANTIZED_FORMATS, dequantize, quantize

_QUANTIZED.extend(_QUANTIZED_FORMATS)
from deltatune.integrations.loftq import LoftqReport, loftq

from deltatune.formats import convert, hotswap_adapter, load_adapter, load_adapters, read_adapter_config, save_adapter
from deltatune._version import __version__

__all__ = [
    "METHODS",
    "NoMatchError",
    "Adapter",
    "AdaptedLayer",
    "AdapterConfig",
    "HybridConfig",
    "AttachReport",
    "DoraConfig",
    "LohaConfig",
    "LokrConfig",
    "LoraConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "IA3Config",
    "LNTuningConfig",
    "PartialConfig",
    "TokensConfig",
    "AdaLoraConfig",
    "OftConfig",
    "VeraConfig",
    "PrefixConfig",
    "PromptConfig",
    "PtuningConfig",
    "drop_reparameterization",
    "grow_table",
    "ParamReport",
    "__version__",
    "active_adapters",
    "attach",
    "config_from_dict",
    "configs",
    "cpu_engine",
    "detach",
    "disabled",
    "load_adapter",
    "mark_trainable",
    "on_train_step",
    "regularization_loss",
    "merge",
    "merge_and_unload",
    "parameter_report",
    "read_adapter_config",
    "save_adapter",
    "select",
    "set_active",
    "set_cpu_engine",
    "unmerge",
    "using",
    "combine",
    "convert",
    "composed",
    "delete_adapter",
    "dequantize",
    "quantize",
    "loftq",
    "LoftqReport",
    "hotswap_adapter",
    "load_adapters",
    "routing",
    "Router",
    "run_grouped",
    "set_composition",
]
