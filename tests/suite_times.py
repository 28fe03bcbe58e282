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


def per_file(times: dict[str, float]) -> list[tuple[str, int, float]]:
    """(file, tests, seconds), slowest file first."""
    files: dict[str, list[float]] = defaultdict(list)
    for nodeid, s in times.items():
        files[nodeid.split("::", 1)[0]].append(s)
    return sorted(((f, len(v), sum(v)) for f, v in files.items()), key=lambda r: -r[2])


class SuiteTimes:
    """One per pytest session (a pytest run inside a test has its own)."""

    def __init__(self, config):
        self.config = config
        self.times: dict[str, float] = defaultdict(float)
        self.outcomes: dict[str, str] = {}
        self.started = time.time()

    def pytest_runtest_logreport(self, report):
        self.times[report.nodeid] += report.duration
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid] = report.outcome if report.when == "call" else f"{report.outcome} ({report.when})"

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.times or config.getoption("collectonly", False):
            return
        wall = time.time() - self.started
        tr = terminalreporter
        tr.section("time per test file")
        for f, n, s in per_file(self.times):
            tr.write_line(f"{s / 60:6.1f} min  {n:4d} tests  {f}")
        tr.write_line(f"{sum(self.times.values()) / 60:6.1f} min  {len(self.times):4d} tests  "
                      f"(sum; wall {wall / 60:.1f} min)")
        tr.section("ten slowest tests")
        for nodeid, s in sorted(self.times.items(), key=lambda kv: -kv[1])[:10]:
            tr.write_line(f"{s:7.1f} s  {nodeid}")
        path = Path(os.environ.get("RLORA_TEST_TIMES") or Path(config.rootpath) / "outputs" / "tests" / "durations.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "wall_s": round(wall, 1), "exit_status": int(exitstatus),
            "markers": config.getoption("markexpr", "") or "",
            "files": [{"file": f, "tests": n, "seconds": round(s, 2)} for f, n, s in per_file(self.times)],
            "tests": [{"test": k, "seconds": round(v, 2), "outcome": self.outcomes.get(k, "passed")}
                      for k, v in sorted(self.times.items(), key=lambda kv: -kv[1])],
        }, indent=1) + "\n")
        tr.write_line(f"per-test durations: {path}")


def pytest_configure(config):
    config.pluginmanager.register(SuiteTimes(config), "suite_times_recorder")
