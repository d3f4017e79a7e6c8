"""Training, evaluation and the built-in tasks behind the ``deltatune`` command line.

Needs the ``cli`` extra (transformers, pydantic, pyyaml, tqdm, matplotlib). The pieces:

- ``config``: :class:`TrainConfig`, read from YAML plus ``--set`` overrides, validated up front;
- ``tasks`` / ``task`` / ``classify``: what a task is, and the built-in ones;
- ``models``: load a base model for a task, or a trained run back (the one loading path);
- ``loop`` / ``checkpoint``: the training loop and its exact-resume checkpoints;
- ``run``: one run from config to output directory; ``report``: metrics file and plot.
"""

from deltatune.train.config import TrainConfig, load_config, validate_config
from deltatune.train.models import Loaded, Trained, load_model, load_trained, prepare, resolve_model
from deltatune.train.run import run_training
from deltatune.train.tasks import TASKS, get_task

__all__ = [
    "TASKS",
    "Loaded",
    "TrainConfig",
    "Trained",
    "get_task",
    "load_config",
    "load_model",
    "load_trained",
    "prepare",
    "resolve_model",
    "run_training",
    "validate_config",
]
