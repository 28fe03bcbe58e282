"""The sweep's console: what reaches a person's terminal, what only the log file keeps.

A child process takes over its stdout/stderr with ``pipeline.sweep.console.Console`` and prints what a sweep
prints (its own lines, Ray-forwarded worker lines, a warning, a progress bar, Tune's table twice, an
error from a worker); the terminal side is a pipe or a real pseudo-terminal."""
import os
import pty
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys, time, warnings
    from pathlib import Path
    from pipeline.sweep.console import Console

    table = ("Trial status: 2 RUNNING\\nCurrent time: now\\nLogical resource usage: 2/2 CPUs\\n"
             "╭──────╮\\n│ _trial_a RUNNING │\\n╰──────╯\\n\\n")
    with Console(verbose=sys.argv[2] == "1") as c:
        print("before the log file is known", flush=True)
        time.sleep(0.3)  # read by the console before the log file exists
        c.log_to(Path(sys.argv[1]))
        print("sweep demo: starting", flush=True)
        print("\\x1b[36m(RayTrainWorker pid=123)\\x1b[0m Setting up process group for: env://", flush=True)
        print("(TrainController pid=9) [2026-11-30 01:39:09,700 E 9 9] core_worker.cc:2465: Actor PreemptionWatcher",
              flush=True)
        print("(TrainController pid=9) ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
              flush=True)
        print("(raylet) WARNING: 8 PYTHON worker processes have been started", flush=True)
        print("2026-11-30 01:37:58,924\\tINFO worker.py:2029 -- Started a local Ray instance.", file=sys.stderr,
              flush=True)
        warnings.warn_explicit("old api", FutureWarning, "lib.py", 3)
        sys.stdout.write(table); sys.stdout.flush()
        time.sleep(0.3)
        sys.stdout.write(table); sys.stdout.flush()
        time.sleep(0.3)
        for i in range(3):
            sys.stderr.write(f"\\reval (2 workers): {i}/2"); sys.stderr.flush(); time.sleep(0.1)
            if i == 1:  # Ray forwards a worker's line (its own bar) into the middle of ours, in two pieces
                sys.stderr.write("\\reval (2 workers): 1/2\\x1b[36m(Evalu"); sys.stderr.flush(); time.sleep(0.2)
                sys.stderr.write("ator pid=8)\\x1b[0m \\rRunning generate_until requests: 0%\\n")
        sys.stderr.write("\\n"); sys.stderr.flush()
        sys.stdout.write("(Evaluator pid=7) \\rRunning loglikelihood requests: 0%"); sys.stdout.flush()
        time.sleep(0.2)
        sys.stdout.write("\\rRunning loglikelihood requests: 100%\\n"); sys.stdout.flush()
        print("(RayTrainWorker pid=123) ValueError: loss is nan at step 3", flush=True)
        print("sweep demo finished: best eval/mean_acc = 0.61 ± 0.02", flush=True)
""")


def run_child(tmp_path, verbose: bool, tty: bool = False) -> tuple[str, str]:
    log = tmp_path / "out" / "sweep.log"
    cmd = [sys.executable, "-c", CHILD, str(log), "1" if verbose else "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not tty:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr, log.read_text()
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0
    os.close(master)
    return out.decode(), log.read_text()


def test_terminal_shows_own_lines_tables_bars_and_errors_and_the_log_keeps_everything(tmp_path):
    term, log = run_child(tmp_path, verbose=False)
    for kept in ("sweep demo: starting", "Trial status: 2 RUNNING", "eval (2 workers): 2/2",
                 "ValueError: loss is nan at step 3", "best eval/mean_acc = 0.61 ± 0.02"):
        assert kept in term
    assert "\x1b[36m" not in term  # a worker line's colour code is not left behind on its own
    for hidden in ("Setting up process group", "PreemptionWatcher", "PYTHON worker processes",
                   "Started a local Ray instance", "FutureWarning", "Running loglikelihood", "generate_until",
                   "(Evaluator pid=", "GetTimeoutError"):
        assert hidden not in term
    # the log file has it all, in order, starting with what was printed before it was opened
    order = ["before the log file is known", "sweep demo: starting", "Setting up process group", "PreemptionWatcher",
             "PYTHON worker processes", "ValueError: loss is nan", "best eval/mean_acc"]
    pos = [log.index(s) for s in order]
    assert pos == sorted(pos)
    assert "FutureWarning: old api" in log and "Started a local Ray instance" in log
    assert "(Evaluator pid=7) Running loglikelihood requests: 100%" in log
    assert "(Evaluator pid=8) Running generate_until requests: 0%" in log
    assert "eval (2 workers): 2/2" in log and "\r" not in log  # a bar's final state, not its redraws


def test_verbose_shows_everything_live(tmp_path):
    term, _ = run_child(tmp_path, verbose=True)
    for line in ("Setting up process group", "PreemptionWatcher", "FutureWarning: old api",
                 "Started a local Ray instance"):
        assert line in term


def test_on_a_terminal_the_trials_table_is_redrawn_in_place(tmp_path):
    term, log = run_child(tmp_path, verbose=False, tty=True)
    first = term.index("Trial status: 2 RUNNING")
    second = term.index("Trial status: 2 RUNNING", first + 1)
    between = term[first:second]
    # the first table's 7 rows are erased (cursor 7 lines up, clear to the end) before the second
    assert between.rstrip("\r\n").endswith("\x1b[7F\x1b[J") or "\x1b[7F\x1b[J" in between[-20:]
    assert log.count("Trial status: 2 RUNNING") == 2  # the log keeps both


def test_a_failing_child_still_leaves_its_log(tmp_path):
    log = tmp_path / "sweep.log"
    code = ("import sys; from pathlib import Path; from pipeline.sweep.console import Console\n"
            "with Console() as c:\n    c.log_to(Path(sys.argv[1]))\n    print('about to fail', flush=True)\n"
            "    raise SystemExit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 3 and "about to fail" in proc.stdout
    assert "about to fail" in log.read_text()
