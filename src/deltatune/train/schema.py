"""The shape of a training run's config: :class:`TrainConfig` and :class:`DataConfig`.

Only what a config is, field by field; filling in a task's defaults and checking the config
against its task happen in ``config.py`` (:func:`~deltatune.train.config.validate_config`), which
sits above the task registry. Tasks use these classes as types, so this module imports no task.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageConfig(_Strict):
    """How ``task: image`` reads and transforms pictures (see ``train/image_task.py``).

    Every image becomes RGB (grey replicated, alpha laid over white, 16-bit scaled to 8-bit), its
    shorter side is resized to ``size`` and the centre ``size`` x ``size`` kept, then it is
    normalised with ``mean`` / ``std``. Training alone adds the light augmentation: a random
    horizontal ``flip`` and a random shift of up to ``shift`` pixels. ``batchnorm``: ``frozen``
    (running statistics and affine parameters stay as the base has them; the default), ``affine``
    (BatchNorm scale and shift train with the adapter, statistics frozen) or ``update``
    (statistics re-estimated on the training data and saved with the adapter, affine trained).
    """

    size: int = Field(64, ge=8, le=1024)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    flip: bool = True
    shift: int = Field(4, ge=0)
    path_column: str = "path"
    batchnorm: Literal["frozen", "affine", "update"] = "frozen"

    @field_validator("std")
    @classmethod
    def _std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError(f"std must be positive, got {value}")
        return value


class DataConfig(_Strict):
    """Where the examples come from (built-in tasks fill in their own files).

    For ``task: classification`` give either one ``path`` (split into train/validation/test with
    the seed) or explicit ``train`` / ``validation`` / ``test`` files; CSV or JSONL.
    """

    path: str | None = None
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    image: ImageConfig = Field(default_factory=ImageConfig)  # task: image only
    # task recommend: the share of interactions (in time order) before the cutoff (default 0.7)
    cutoff: float | None = Field(None, gt=0, lt=1)
    # task recommend: how many of each user's last interactions before the test one are held out for
    # validation (those after the cutoff; default 1, the field's leave-one-out). More positions give a
    # less noisy validation signal for choosing settings; none of them is trained on.
    validation_positions: int | None = Field(None, ge=1, le=50)

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must be below 1 to leave training data")
        return self


class TrainConfig(_Strict):
    """One training run. ``recipes/sentiment-lora.yaml`` explains every key in a comment.

    Defaults here are generic; a task fills the keys a user leaves out with its own tuned values
    (``Task.defaults``, e.g. one epoch for ``sentiment``), and ``adapter:`` with its
    ``method_defaults`` for the chosen method: ``deltatune.train.config.validate_config`` does
    that, and checks the task (this class knows no task).
    """

    model: str = "all-minilm-l6-v2"
    task: str = "sentiment"
    data: DataConfig = Field(default_factory=DataConfig)
    method: str = "lora"
    adapter: dict[str, Any] = Field(default_factory=dict)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    max_length: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    eval_every: int | None = Field(None, ge=1)
    # Training options (train/options.py): micro-batches per optimizer step, LR schedule, early stopping...
    gradient_accumulation: int = Field(1, ge=1)  # a step sees batch_size x this many examples
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"  # after the warm-up
    warmup_steps: int | None = Field(None, ge=0)  # overrides warmup_ratio when set
    early_stopping_patience: int | None = Field(None, ge=1)  # validations without improvement before stopping
    early_stopping_metric: str | None = None  # a validation metric (default: the task's headline)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # Quantized frozen base (QLoRA-style, integrations/quantize.py): the base's linear layers (not the head)
    # stored in 4 or 8 bits before the adapter attaches; the adapter trains in full precision.
    quantize: Literal["nf4", "int8", "none"] = "none"
    double_quant: bool = True  # nf4: quantize the per-block scales too (~0.4 bit/weight less)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # what quantized weights dequantize to
    quantize_backend: Literal["bitsandbytes", "torchao"] = "bitsandbytes"  # torchao: nf4 only
    # quantize: also store the unquantized frozen parameters (embeddings, norms, head) in this dtype, as
    # transformers' load_in_4bit with torch_dtype=bfloat16 does; None: leave them as loaded (float32).
    quantize_rest_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # nf4: values per absmax scale. 32: less rounding error (SmolLM2: 0.089 vs 0.095 relative) for ~0.13
    # bit/weight more (the scales of twice as many blocks); 64 as in QLoRA.
    quantize_blocksize: Literal[32, 64] = 64
    # quantize: linear layers left in full precision besides the head, by name or its last part(s), e.g.
    # [v_proj]: the few whose rounding costs most, at their full-precision size (README: Quantized base).
    quantize_skip: list[str] = Field(default_factory=list)
    # quantize + method lora: LoftQ initialisation (integrations/loftq.py), this many alternations; 0: off
    loftq_iterations: int = Field(0, ge=0)
    # Causal LMs: cross-entropy over this many target tokens at a time (the head recomputed in backward),
    # so full-vocabulary float32 logits for the whole batch never exist at once; None: the model's own loss.
    loss_chunk: int | None = Field(None, ge=1)
    # bf16 precision: bfloat16 uses the frozen base's linear weights in bf16, copied once instead of cast by
    # autocast every step (outputs unchanged; the float32 base is back in place outside each forward:
    # train/frozen.py). Off by default: it holds the copies beside the float32 base (+half the frozen linear
    # weights' memory) and measured no faster for LoRA (README "Fast bf16 training"). Not with
    # gradient_checkpointing or under torchrun.
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"
    # The model's own dropout in training on the CPU: fast draws each mask as 15-bit random integers (same keep
    # probability to 2**-16; 31-bit below p=1/32; exact 1/(1-p) scaling, one-byte mask for backward; also attention
    # dropout), a fraction of torch's cost; torch: torch's own dropout (the random stream of earlier runs). train/dropout.py
    dropout_kernel: Literal["fast", "torch"] = "fast"
    # Under torchrun: ddp replicates the model and averages gradients; fsdp (FSDP2) shards the frozen base
    # and the adapter across the ranks (adapters only; no mid-run checkpoints). One process: ignored.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    tensorboard: bool | None = None  # event logs in OUTPUT/tensorboard; None: when the package is installed
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    # CPU float32 products of LoRA/DoRA layers: auto (onednn on AMD, aten elsewhere: the faster one there),
    # onednn, thin (base output bit-identical), aten
    cpu_engine: Literal["auto", "onednn", "thin", "aten"] = "auto"
    output: str | None = None
    save_format: Literal["deltatune", "peft"] = "deltatune"  # adapter file format; peft: Hugging Face PEFT's
    # Why ``lr`` has its value when the user gave none (``train`` prints it); None: given explicitly.
    _lr_reason: str | None = PrivateAttr(default=None)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"device must be auto, cpu, cuda[:N] or mps, got {value!r}")
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = Path(value)
        try:
            path.resolve()
        except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError before Python 3.13)
            raise ValueError(f"output {value!r} cannot be used as a run directory: {err}") from None
        if path.exists() and not path.is_dir():
            raise ValueError(f"output {value!r} is a file, not a directory; choose another --output")
        return value

    @model_validator(mode="after")
    def _fsdp(self) -> TrainConfig:
        if self.strategy == "fsdp" and self.method == "full":
            raise ValueError("strategy fsdp shards a frozen base for an adapter; for method full use strategy ddp")
        return self

    @model_validator(mode="after")
    def _early_stopping(self) -> TrainConfig:
        if self.early_stopping_metric is not None and self.early_stopping_patience is None:
            raise ValueError("early_stopping_metric needs early_stopping_patience (validations without "
                             "improvement before stopping), e.g. early_stopping_patience: 3")
        return self

    @model_validator(mode="after")
    def _quantized_base(self) -> TrainConfig:
        if self.quantize != "none" and self.method == "full":
            raise ValueError(f"quantize: {self.quantize} freezes the base in {self.quantize}; full fine-tuning "
                             "trains every weight: use an adapter method (e.g. method: lora) or quantize: none")
        if self.quantize_backend == "torchao" and self.quantize == "int8":
            raise ValueError("quantize_backend: torchao quantizes to nf4 only; use quantize_backend: bitsandbytes for int8")
        if self.quantize_blocksize != 64 and self.quantize != "nf4":
            raise ValueError("quantize_blocksize sets NF4's block size: use it with quantize: nf4 (int8 scales each row)")
        if any(not name.strip() for name in self.quantize_skip):
            raise ValueError("quantize_skip lists module names (or their last parts, e.g. v_proj); an entry is empty")
        if self.loftq_iterations and (self.quantize == "none" or self.method != "lora"):
            raise ValueError("loftq_iterations initialises LoRA on a quantized base: set quantize: nf4 (or int8) "
                             "and method: lora, or loftq_iterations: 0")
        return self

    @model_validator(mode="after")
    def _method(self) -> TrainConfig:
        if self.method == "full":
            if self.adapter:
                raise ValueError("method 'full' trains every weight and takes no adapter settings; remove 'adapter'")
        else:
            self.adapter_config()  # raises ValueError with the method's own message
        return self

    @model_validator(mode="after")
    def _save_format(self) -> TrainConfig:
        # Checked here, not when the run saves at its end: a method or option PEFT's format cannot hold
        # would otherwise fail after all the training.
        if self.save_format == "peft":
            if self.method == "full":
                raise ValueError("save_format: peft writes an adapter in PEFT's format; method full saves the whole "
                                 "model (model/), which PEFT's format does not hold: remove save_format")
            from deltatune.formats.peft_translate import check_writable

            try:
                check_writable(self.adapter_config().to_dict())
            except ValueError as err:
                raise ValueError(f"save_format: peft: {err}") from None
        return self

    def adapter_config(self) -> Any:
        """The method's ``AdapterConfig`` (``None`` for full fine-tuning)."""
        from deltatune import METHODS, config_from_dict

        if self.method == "full":
            return None
        if self.method not in METHODS and self.method != "hybrid":
            raise ValueError(f"unknown method {self.method!r}; available: full, {', '.join(sorted(METHODS))}")
        from deltatune.config import ConfigTypeError

        try:
            return config_from_dict({"method": self.method, **self.adapter})
        except ConfigTypeError as err:  # name the key as the user writes it: adapter.rank, not rank
            raise ValueError(f"adapter.{str(err).split(': ', 1)[1]}") from None

    def resolved_output(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / f"{self.task}-{self.method}"
