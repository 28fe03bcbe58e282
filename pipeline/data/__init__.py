"""Real datasets from the data directory (``../shared/data`` by default; see SOURCES.md there)."""

from .core import DataError, Example, data_dir
from .loaders import load_sst2
from .tasks import HELD_OUT_PERCENT, MIXTURES, TASKS, content_key, resolve_tasks, task_splits

__all__ = [
    "DataError", "Example", "HELD_OUT_PERCENT", "MIXTURES", "TASKS",
    "content_key", "data_dir", "load_sst2", "resolve_tasks", "task_splits",
]
