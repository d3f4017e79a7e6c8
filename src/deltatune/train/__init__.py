"""Training, evaluation and the built-in tasks behind the ``deltatune`` command line.

Needs the ``cli`` extra (transformers, pydantic, pyyaml, tqdm, matplotlib). The pieces:

- ``schema`` / ``config``: :class:`TrainConfig` (its shape), read from YAML plus ``--set`` overrides
  and validated up front, with the task's defaults and checks;
- ``tasks`` / ``task`` / ``classify`` / ``chat``: what a task is, and the built-in ones;
- ``models``: load a base model for a task, or a trained run back (the one loading path);
- ``strategy``: what trains, every weight or one adapter (``FullStrategy`` / ``AdapterStrategy``);
- ``loop`` / ``callbacks`` / ``checkpoint``: the step loop, what runs around each step (progress,
  validation, checkpoints, the NaN stop), and the exact-resume checkpoints;
- ``run``: one run from config to output directory; ``report``: metrics file and plot.
- ``space`` / ``budget`` / ``probe`` / ``plan``: the search space the methods declare, resource
  budgets, and ``deltatune plan``'s cost predictions from a short probe; ``tune`` / ``tune_report``:
  ``deltatune tune``'s search (Optuna, in a database) and its reports.
"""

from deltatune.train.config import TrainConfig, load_config, validate_config
from deltatune.train.models import Loaded, Trained, load_model, load_trained, prepare, resolve_model
from deltatune.train.run import run_training
from deltatune.train.strategy import AdapterStrategy, FullStrategy, Strategy
from deltatune.train.tasks import TASKS, get_task

__all__ = [
    "AdapterStrategy",
    "FullStrategy",
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
    "Strategy",
    "validate_config",
]
