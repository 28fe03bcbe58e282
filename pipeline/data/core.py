from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "RLORA_DATA_DIR"
_DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class DataError(ValueError):
    """A data file that is missing or does not parse; the message names the path."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice example: the model scores each choice as a continuation of prompt."""

    task: str
    prompt: str
    choices: tuple[str, ...]
    gold: int  # index into choices

    @property
    def answer(self) -> str:
        return self.choices[self.gold]


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory: explicit override, else $RLORA_DATA_DIR, else ../shared/data next to the checkout."""
    path = Path(override or os.environ.get(ENV_VAR) or _DEFAULT).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory not found: {path} (set {ENV_VAR} or data_dir)")
    return path


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path
