"""A console a person can read, a log file that keeps everything.

``Console`` takes over the process's stdout and stderr at the file-descriptor level (so Ray's C++
log lines, warnings and tqdm bars printed by any thread are caught too), writes every line to a log
file and shows on the terminal only what a person needs: the project's own output, Tune's trials
table (redrawn in place on a terminal, one table instead of one every 30 s), the project's progress
bars and errors. Worker lines forwarded by Ray, third-party warnings and Ray/MLflow/Optuna INFO
lines go to the log file only. ``verbose=True`` shows everything live.
"""
from __future__ import annotations

import math
import os
import re
import sys
import threading
from pathlib import Path
from typing import Optional

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
WORKER = re.compile(r"^\((?:[\w.]+ pid=\d+|pid=\d+|[\w.]+)(?:, ip=[\d.]+)?\) ?")  # a line Ray forwards from a worker
ERROR = re.compile(r"Traceback \(most recent call last\)|^\s*[\w.]*(?:Error|Exception|Interrupt)\b:?|\bERROR\b")
NOISE = [re.compile(p) for p in (
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:INFO|WARNING|DEBUG) ",  # Ray's Python loggers
    r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:INFO|WARNING|DEBUG) ",  # MLflow's
    r"^\[[IWD] \d{4}-\d\d-\d\d ",  # Optuna's and Ray's C++ (I/W/D levels)
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWD] ",
    r"\w+Warning: ", r"^\s+warnings\.warn\(",  # third-party warnings (the file:line line and its source)
    r"^View detailed results here:", r"^To visualize your results with TensorBoard",
    r"^(?:Loading weights|Downloading artifacts|Uploading artifacts)\b",
)]
RAY_INTERNAL = re.compile(r"TrainController|raylet|gcs_server|autoscaler|dashboard|monitor|PreemptionWatcher")
# where a line ends: a newline, or a worker line Ray starts in the middle of a progress bar's redraw
SPLIT = re.compile(rb"(?<=\n)|(?<=[^\n])(?<!\x1b\[\d\dm)(?=(?:\x1b\[\d\dm)?\((?:[\w.]+ )?pid=\d+(?:, ip=[\d.]+)?\))")
TABLE_START = re.compile(r"^Trial status:")
TRIAL_BOX = re.compile(r"^Trial \S+ (?:started with configuration:|completed after|finished iteration|errored after)")
BOX = re.compile(r"^(?:[╭│├╰]|\s*$)")
TABLE_BODY = re.compile(r"^(?:Current time:|Logical resource usage:|Current best trial:|[╭│├╰]|\s*$)")


def visible(text: str) -> str:
    """What a line shows once drawn: no colours, a progress bar's last redraw (after Ray's worker prefix)."""
    plain = ANSI.sub("", text).rstrip("\n")
    prefix = WORKER.match(plain)
    head, body = (plain[:prefix.end()], plain[prefix.end():]) if prefix else ("", plain)
    return head + body.rsplit("\r", 1)[-1]


def shown(line: str) -> bool:
    """Whether a (complete, ANSI-stripped) output line belongs on a person's terminal. A worker's line
    only when it carries an exception, and not from Ray's own processes (the Train controller logs
    timeouts it retries as tracebacks; a real failure reaches the driver as the trial's error)."""
    prefix = WORKER.match(line)
    if prefix:
        return not RAY_INTERNAL.search(prefix.group()) and bool(ERROR.search(line[prefix.end():]))
    if ERROR.search(line):
        return True
    return not any(p.search(line) for p in NOISE)


class Console:
    """Tee stdout/stderr into a log file; filter what reaches the terminal (see module doc)."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self._lock = threading.Lock()
        self._log = None
        self._buffer: list[str] = []  # what was printed before the log file was known
        self._table_rows = 0  # terminal rows of the last trials table, if it is the last thing shown
        self._in_table = False
        self._in_box = False  # inside the per-trial config/result box Tune prints after a trial event
        self._tty = False
        self._threads: list[threading.Thread] = []
        self._saved: list[tuple[int, int]] = []
        self.path: Optional[Path] = None
        self.attach_to: Optional[tuple[str, str]] = None  # (tracking URI, run id) the log belongs to

    # -- lifecycle
    def __enter__(self) -> "Console":
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            saved = os.dup(fd)
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            self._saved.append((fd, saved))
            t = threading.Thread(target=self._pump, args=(r, saved), daemon=True, name=f"console-{fd}")
            t.start()
            self._threads.append(t)
        self._tty = os.isatty(self._saved[0][1])
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._saved:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved:
            os.dup2(saved, fd)  # the pipe's last writer in this process is gone: the pump sees EOF
        for t in self._threads:
            t.join(timeout=5)  # a child process still holding the pipe must not hang the exit
        for _, saved in self._saved:
            os.close(saved)
        self._saved.clear()
        with self._lock:
            if self._log:
                self._log.close()
                self._log = None

    def log_to(self, path: Path) -> Path:
        """Start (or continue) the log file; what was printed before goes in first."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._log = open(path, "a", encoding="utf-8", errors="replace")
            self._log.write("".join(self._buffer))
            self._log.flush()
            self._buffer.clear()
            self.path = path
        return path

    # -- the pumps
    def _pump(self, r: int, out: int) -> None:
        pending, sent = b"", 0  # sent: bytes of the pending line already on the terminal
        with os.fdopen(r, "rb", buffering=0) as f:
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                pending += chunk
                *parts, pending = [p for p in SPLIT.split(pending) if p] or [b""]
                for part in parts:
                    if part.endswith(b"\n"):
                        self._line(part, out, sent)
                    else:  # a bar's redraw cut short by a worker line that Ray wrote into the same stream
                        self._partial(part, out, sent)
                    sent = 0
                if b"\r" in pending[sent:]:  # a progress bar redraws with \r and no newline: show it as it comes
                    sent = self._partial(pending, out, sent)
        if pending:
            self._line(pending, out, sent)

    def _write_log(self, text: str) -> None:
        clean = visible(text) + ("\n" if text.endswith("\n") else "")  # a progress bar's final state only
        if self._log:
            self._log.write(clean)
            self._log.flush()
        else:
            self._buffer.append(clean)

    def _partial(self, data: bytes, out: int, sent: int) -> int:
        cut = data.find(b"\x1b[", sent)  # hold back what may be the start of a worker line Ray is still writing
        data = data[:cut] if cut != -1 else data
        if len(data) <= sent:
            return sent
        with self._lock:
            if not (self.verbose or shown(visible(data.decode("utf-8", "replace")))):
                return sent
            self._table_rows, self._in_table = 0, False
            os.write(out, data[sent:])
        return len(data)

    def _line(self, data: bytes, out: int, sent: int) -> None:
        text = data.decode("utf-8", "replace")
        with self._lock:
            self._write_log(text)
            plain = visible(text)
            if not self.verbose and not self._show(plain):
                if sent:  # a bar shown while it ran ended on a line that is not: end the terminal line
                    os.write(out, b"\n")
                return
            if self._tty and not self.verbose:
                self._track_table(plain, out)
            os.write(out, data[sent:])

    def _show(self, plain: str) -> bool:
        """``shown``, and Tune's per-trial boxes off the terminal (the summary at the end has them all):
        a trial's start is in the live table, its end keeps its one-line headline."""
        if TRIAL_BOX.match(plain):
            self._in_box = True
            return "started with configuration" not in plain
        if self._in_box and BOX.match(plain):
            return False
        self._in_box = False
        return shown(plain)

    def _track_table(self, plain: str, out: int) -> None:
        """Tune prints its trials table every 30 s: on a terminal, draw each one over the last."""
        if TABLE_START.match(plain):
            if self._table_rows:
                os.write(out, f"\x1b[{self._table_rows}F\x1b[J".encode())
            self._table_rows, self._in_table = 0, True
        elif not (self._in_table and TABLE_BODY.match(plain)):
            self._table_rows, self._in_table = 0, False
        if self._in_table:
            try:
                cols = os.get_terminal_size(out).columns or 100  # the real terminal, not our pipe
            except OSError:
                cols = 100
            self._table_rows += max(1, math.ceil(len(plain) / cols))
