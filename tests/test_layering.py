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
    from eval.stage import EvalStage
    from pipeline.sweep.stages import find_eval_stage

    assert find_eval_stage() is EvalStage


PACKAGES = ("rlora", "pipeline", "eval", "benchmarks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports anywhere in its file (functions included):
    ``from a.b import c`` is an edge to ``a.b.c`` where that is a module, else to ``a.b``."""
    files = {module_name(f): f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # a name inside a module: the module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_project_modules():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


# pipeline/ by stage: each stage imports only the stages listed for it (and itself), so the import
# graph reads in one direction: rlora <- core <- data <- model <- config <- train <- sweep.
# cluster/ tooling needs the core, the config schema and the data directory's setting (submit validates
# a sweep's YAML and passes the data directory on before the job leaves the machine). The commands
# (python -m pipeline.submit, .schedule, .server, .demo) and eval/ may use any stage.
STAGE_DEPS = {
    "core": {"rlora"},
    "data": {"rlora", "core"},
    "model": {"rlora", "core", "data"},
    "config": {"rlora", "core", "data", "model"},
    "train": {"rlora", "core", "data", "model", "config"},
    "sweep": {"rlora", "core", "data", "model", "config", "train"},
    "cluster": {"core", "data", "config"},
}
STAGES = set(STAGE_DEPS) - {"core"}
COMMANDS = {"pipeline.submit", "pipeline.schedule", "pipeline.server", "pipeline.demo"}


def stage_of(module: str) -> str:
    """rlora, core, data, model, config, train, sweep, cluster, commands, eval or benchmarks."""
    parts = module.split(".")
    if parts[0] != "pipeline":
        return parts[0]
    if len(parts) > 2 or (len(parts) == 2 and (ROOT / "pipeline" / parts[1]).is_dir()):
        if parts[1] not in STAGES:  # a new subpackage must be given its place in the order
            raise AssertionError(f"pipeline/{parts[1]}/ is not a stage of STAGE_DEPS")
        return parts[1]
    return "commands" if module in COMMANDS else "core"


def stage_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, targets in sorted(graph.items()):
        stage = stage_of(mod)
        for t in sorted(targets):
            if stage in STAGE_DEPS and stage_of(t) not in STAGE_DEPS[stage] | {stage}:
                out.append(f"{mod} ({stage}) imports {t} ({stage_of(t)})")
    return out


def test_the_stage_rule_finds_an_import_against_it():
    assert stage_violations({"pipeline.data.batching": {"pipeline.model.scoring"},
                             "pipeline.model.scoring": {"pipeline.data.encoding"}}) == [
        "pipeline.data.batching (data) imports pipeline.model.scoring (model)"]
    assert stage_violations({"pipeline.tracking": {"pipeline.sweep.driver"}}) != []
    assert stage_violations({"pipeline.cluster.submit": {"pipeline.train.driver"}}) != []


def test_the_import_graph_holds_the_edges_the_files_have():
    graph = import_graph()
    assert "pipeline.model.adapters" in graph["pipeline.train.worker"]  # from pipeline.model import adapters
    assert "pipeline.config.run" in graph["pipeline.train.request"]  # from pipeline.config.run import RunConfig
    assert "pipeline.train.worker" in graph["pipeline.train.driver"]  # inside a function
    with pytest.raises(AssertionError, match="pipeline/extras/"):
        stage_of("pipeline.extras.x")


def test_each_pipeline_stage_imports_only_the_stages_below_it():
    bad = stage_violations(import_graph())
    assert not bad, "\n".join(bad)


def third_party_imports() -> dict[str, str]:
    """Top-level third-party module -> one file importing it, across the project's packages."""
    import sys

    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for top, _ in imported_packages(f):
                if top not in sys.stdlib_module_names and top not in PACKAGES:
                    out.setdefault(top, str(f.relative_to(ROOT)))
    return out


def test_every_third_party_import_is_a_declared_dependency():
    """A module the code imports must come from a distribution ``pyproject.toml`` names, not from
    whatever another dependency happens to pull in today."""
    import re
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in project["dependencies"] + [x for v in project["optional-dependencies"].values() for x in v]}
    dists = packages_distributions()
    missing = [f"{mod} (imported in {where}; from {dists.get(mod, ['?'])})"
               for mod, where in sorted(third_party_imports().items())
               if not {d.lower().replace("_", "-") for d in dists.get(mod, [])} & declared]
    assert not missing, "undeclared: " + ", ".join(missing)


def test_no_private_name_is_imported_from_another_module():
    """``_name`` is a module's own business: another module that needs it gets a public name."""
    bad = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
                    bad += [f"{f.relative_to(ROOT)}:{node.lineno} imports {a.name} from {node.module}"
                            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)
