"""Task registry: name -> task description. Adding a task is one file and one line here."""
from __future__ import annotations

from .base import Task
from .depth import Depth
from .normal import Normal
from .segmentation import IGNORE, Segmentation

TASKS: dict[str, Task] = {t.name: t for t in (Segmentation(), Depth(), Normal())}


def get_task(name: str) -> Task:
    """The task called ``name``; a clear error names the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


__all__ = ["Task", "TASKS", "get_task", "IGNORE"]
