"""Where the suite's time goes, on every run: each test's wall time (set-up, call and tear-down
together, so a module fixture's cost lands on the test that first used it) is written to
``$RLORA_TEST_TIMES`` (default ``outputs/tests/durations.json``), and the end of the run prints the
time per test file and the ten slowest tests. Works under pytest-xdist too: the controller receives
every worker's reports."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

_times: dict[str, float] = defaultdict(float)
_outcomes: dict[str, str] = {}
_started = time.time()


def default_path(root: Path) -> Path:
    return Path(os.environ.get("RLORA_TEST_TIMES") or root / "outputs" / "tests" / "durations.json")


def pytest_sessionstart(session):
    global _started
    _started = time.time()
    _times.clear()
    _outcomes.clear()


def pytest_runtest_logreport(report):
    _times[report.nodeid] += report.duration
    if report.when == "call" or report.outcome != "passed":
        _outcomes[report.nodeid] = report.outcome if report.when == "call" else f"{report.outcome} ({report.when})"


def per_file(times: dict[str, float]) -> list[tuple[str, int, float]]:
    """(file, tests, seconds), slowest file first."""
    files: dict[str, list[float]] = defaultdict(list)
    for nodeid, s in times.items():
        files[nodeid.split("::", 1)[0]].append(s)
    return sorted(((f, len(v), sum(v)) for f, v in files.items()), key=lambda r: -r[2])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _times or config.getoption("collectonly", False):
        return
    wall = time.time() - _started
    tr = terminalreporter
    tr.section("time per test file")
    for f, n, s in per_file(_times):
        tr.write_line(f"{s / 60:6.1f} min  {n:4d} tests  {f}")
    tr.write_line(f"{sum(_times.values()) / 60:6.1f} min  {len(_times):4d} tests  (sum; wall {wall / 60:.1f} min)")
    tr.section("ten slowest tests")
    for nodeid, s in sorted(_times.items(), key=lambda kv: -kv[1])[:10]:
        tr.write_line(f"{s:7.1f} s  {nodeid}")
    path = default_path(Path(config.rootpath))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "wall_s": round(wall, 1), "exit_status": int(exitstatus),
        "markers": config.getoption("markexpr", "") or "",
        "workers": getattr(config.option, "numprocesses", None) or 0,
        "files": [{"file": f, "tests": n, "seconds": round(s, 2)} for f, n, s in per_file(_times)],
        "tests": [{"test": k, "seconds": round(v, 2), "outcome": _outcomes.get(k, "passed")}
                  for k, v in sorted(_times.items(), key=lambda kv: -kv[1])],
    }, indent=1) + "\n")
    tr.write_line(f"per-test durations: {path}")
