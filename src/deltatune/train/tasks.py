"""The task registry: task name -> task object. An explicit dict; one line per task."""

from __future__ import annotations

from deltatune.train.chat import ChatTask
from deltatune.train.classify import FileClassificationTask, SentimentTask
from deltatune.train.image_task import ImageTask
from deltatune.train.instruct import InstructTask
from deltatune.train.recommend import RecommendTask
from deltatune.train.task import Task
from deltatune.train.text import TextTask

TASKS: dict[str, Task] = {
    "sentiment": SentimentTask(),
    "classification": FileClassificationTask(),
    "chat": ChatTask(),
    "image": ImageTask(),
    "instruct": InstructTask(),
    "text": TextTask(),
    "recommend": RecommendTask(),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]
