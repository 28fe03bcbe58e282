"""What the command-line entry points share: the parser skeleton and one-line user errors."""

from __future__ import annotations

import argparse
import sys

from pipeline.config.loading import ConfigError
from pipeline.data import DataError
from pipeline.model.base import ModelSpecError
from pipeline.tracking import TrackingError


def base_parser(prog: str, doc: str, config_help: str, set_example: str,
                config_default: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config_default:
        ap.add_argument("config", nargs="?", default=config_default, help=f"{config_help} (default {config_default})")
    else:
        ap.add_argument("config", help=config_help)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override any field, e.g. --set {set_example} (repeatable)")
    return ap


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: reported in one line with exit code 2, no traceback."""
    return (ConfigError, DataError, ModelSpecError, TrackingError)


def fail(e: BaseException) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2
