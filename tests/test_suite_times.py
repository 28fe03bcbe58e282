"""The suite's own measurement (tests/suite_times.py): a small suite of known shape, run by a real
pytest with the plugin, writes every test's time, the time per file and the slowest tests."""

import json

pytest_plugins = ["pytester"]

FAST = """
def test_a():
    pass

def test_b():
    pass
"""
SLOW = """
import pytest, time

@pytest.fixture(scope="module")
def setup_cost():
    time.sleep(0.3)  # a module fixture: charged to the first test that uses it

def test_first(setup_cost):
    pass

def test_second(setup_cost):
    pass

def test_fails():
    assert False
"""


def test_durations_file_and_tables_from_a_known_suite(pytester, tmp_path, monkeypatch):
    out = tmp_path / "durations.json"
    monkeypatch.setenv("RLORA_TEST_TIMES", str(out))
    pytester.makepyfile(test_fast=FAST, test_slow=SLOW)
    result = pytester.runpytest("-p", "suite_times", "-q")
    result.assert_outcomes(passed=4, failed=1)
    data = json.loads(out.read_text())
    tests = {t["test"]: t for t in data["tests"]}
    assert set(tests) == {"test_fast.py::test_a", "test_fast.py::test_b", "test_slow.py::test_first",
                          "test_slow.py::test_second", "test_slow.py::test_fails"}
    assert tests["test_slow.py::test_fails"]["outcome"] == "failed" and data["exit_status"] == 1
    # the module fixture's set-up is in its first user's time, so the slow file comes first
    assert tests["test_slow.py::test_first"]["seconds"] >= 0.3
    assert [f["file"] for f in data["files"]] == ["test_slow.py", "test_fast.py"]
    files = {f["file"]: f for f in data["files"]}
    assert files["test_slow.py"]["tests"] == 3 and files["test_fast.py"]["tests"] == 2
    for name, f in files.items():  # a file's time is its tests' total
        total = sum(t["seconds"] for t in data["tests"] if t["test"].startswith(name))
        assert abs(f["seconds"] - total) < 0.02, (name, f, total)
    text = result.stdout.str()
    assert text.index("time per test file") < text.index("ten slowest tests") < text.index(str(out))
    slowest = text.split("ten slowest tests")[1].splitlines()[1]
    assert slowest.endswith("test_slow.py::test_first")
