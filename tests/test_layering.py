"""Imports go one way: rlora <- pipeline <- eval, benchmarks (function-local imports included)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"rlora": {"pipeline", "eval", "benchmarks"}, "pipeline": {"eval", "benchmarks"}, "eval": {"benchmarks"}}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {(a.name.split(".")[0], node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.module.split(".")[0], node.lineno))
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_against_the_layering(layer):
    bad = [f"{f.relative_to(ROOT)}:{line} imports {pkg}"
           for f in sorted((ROOT / layer).rglob("*.py"))
           for pkg, line in imported_packages(f) if pkg in FORBIDDEN[layer]]
    assert not bad, "\n".join(bad)


def test_the_sweep_finds_the_eval_stage_through_its_entry_point():
    from eval.stage import run_for_sweep
    from pipeline.sweep import post_sweep_stage

    assert post_sweep_stage() is run_for_sweep
