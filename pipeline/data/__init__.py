"""Real datasets from the data directory (``../shared/data`` by default; see SOURCES.md there)."""

from .core import DataError, Example, data_dir
from .loaders import load_sst2

__all__ = ["DataError", "Example", "data_dir", "load_sst2"]
