"""BBH as lm-eval tasks: data, exemplars, prompts and answer extraction checked against the
official files and lm-eval's own ``bbh`` configs."""

from pathlib import Path

import pytest
import yaml

from eval.bbh import bbh_dir, cot_prompt, load_examples, subtasks
from eval.generate_tasks import FEWSHOT_FILTERS


def stock_config(variant: str, name: str) -> dict:
    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    path = Path(lm_eval.__file__).parent / "tasks" / "bbh" / variant / name
    return yaml.load(path.read_text(), Loader=Loader)


@pytest.fixture(scope="module")
def task_manager():
    from eval.harness import task_manager

    return task_manager()


def get_task(tm, name):
    return tm.load([name])["tasks"][name]


def test_27_subtasks_with_official_sizes():
    names = subtasks()
    assert len(names) == 27
    sizes = {n: len(load_examples(n)) for n in names}
    assert sum(sizes.values()) == 6511
    assert sizes["causal_judgement"] == 187 and sizes["penguins_in_a_table"] == 146 and sizes["snarks"] == 178
    assert load_examples("boolean_expressions")[0] == {"input": "not ( True ) and ( True ) is", "target": "False"}


@pytest.mark.parametrize("sub", subtasks())
def test_exemplars_from_cot_prompts_equal_lm_evals(sub):
    """The 3-shot exemplars parsed from the official cot-prompts file are exactly the ones lm-eval
    embeds in its bbh_cot_fewshot (reasoning) and bbh_fewshot (answer only) configs."""
    description, shots = cot_prompt(sub)
    cot, few = stock_config("cot_fewshot", f"{sub}.yaml"), stock_config("fewshot", f"{sub}.yaml")
    assert len(shots) == 3
    assert cot["description"] == description + "\n\n"
    assert [{"input": s.input, "target": s.reasoning} for s in shots] == cot["fewshot_config"]["samples"]
    assert [{"input": s.input, "target": s.answer} for s in shots] == few["fewshot_config"]["samples"]


def test_generated_tasks_keep_lm_evals_scoring():
    """Our task files carry lm-eval's prompt, generation settings, filters and metric unchanged."""
    from eval.harness import TASK_DIR

    for ours, variant in (("rlora_bbh", "cot_fewshot"), ("rlora_bbh_fewshot", "fewshot"), ("rlora_bbh_zeroshot", "zeroshot")):
        tmpl = yaml.safe_load((TASK_DIR / "bbh" / ours / "_template_yaml").read_text())
        stock = stock_config(variant, f"_{variant}_template_yaml")
        stock.pop("dataset_path")
        assert tmpl == stock
        for sub in ("navigate", "word_sorting", "date_understanding"):
            text = (TASK_DIR / "bbh" / ours / f"{ours}_{sub}.yaml").read_text()

            class L(yaml.SafeLoader):
                pass

            L.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
            cfg = yaml.load(text, Loader=L)
            s = stock_config(variant, f"{sub}.yaml")
            assert cfg["doc_to_text"] == s["doc_to_text"] and cfg["description"] == s["description"]
            if variant == "fewshot":  # lm-eval's raw score kept as "none", plus "strip"
                assert cfg["filter_list"] == FEWSHOT_FILTERS and "filter_list" not in s
            else:
                assert cfg.get("filter_list") == s.get("filter_list")
    group = yaml.safe_load((TASK_DIR / "bbh" / "rlora_bbh" / "_rlora_bbh.yaml").read_text())
    assert len(group["task"]) == 27
    assert group["aggregate_metric_list"] == stock_config("cot_fewshot", "_bbh_cot_fewshot.yaml")["aggregate_metric_list"]


def test_cot_prompt_rendered_by_lm_eval_is_the_official_prompt(task_manager):
    """lm-eval's 3-shot CoT context for a test question is the official prompt file followed by
    the question, as in the BBH paper's evaluation."""
    task = get_task(task_manager, "rlora_bbh_boolean_expressions")
    doc = task.test_docs()[0]
    ctx = task.fewshot_context(doc, num_fewshot=3)
    official = (bbh_dir() / "cot-prompts" / "boolean_expressions.txt").read_text().split("-----\n", 1)[1].strip()
    assert ctx == official + f"\n\nQ: {doc['input']}\nA: Let's think step by step.\n"


def _filtered(task, doc, text):
    from lm_eval.api.instance import Instance

    inst = Instance(request_type="generate_until", doc=doc, arguments=("", {}), idx=0)
    inst.resps = [text]
    for f in task._filters:
        f.apply([inst])
    return inst.filtered_resps


@pytest.mark.parametrize("sub", subtasks())
def test_answer_extraction_on_real_cot_answers(task_manager, sub):
    """Each official chain-of-thought answer, scored as a model generation by our rlora_bbh task
    (lm-eval's get-answer filter + exact_match), is correct; a wrong final answer is not."""
    task = get_task(task_manager, f"rlora_bbh_{sub}")
    _, shots = cot_prompt(sub)
    for s in shots:
        doc = {"input": s.input, "target": s.answer}
        got = _filtered(task, doc, s.reasoning)["get-answer"]
        assert got == s.answer
        assert task.process_results(doc, [got])["exact_match"] == 1.0
        wrong = s.reasoning[: s.reasoning.rindex("So the answer is")] + "So the answer is (Z) nothing."
        assert task.process_results(doc, [_filtered(task, doc, wrong)["get-answer"]])["exact_match"] == 0.0


def stock_filters(sub: str):
    """lm-eval's own zero-shot filter pipelines for a subtask, built from its stock YAML (the
    ``!function utils.X`` filters taken from lm-eval's own bbh/zeroshot/utils.py)."""
    import importlib

    from lm_eval.filters import build_filter_ensemble

    utils = importlib.import_module("lm_eval.tasks.bbh.zeroshot.utils")
    out = {}
    for spec in stock_config("zeroshot", f"{sub}.yaml")["filter_list"]:
        steps = []
        for step in spec["filter"]:
            fn = step["function"]
            fn = getattr(utils, fn[1].split(".", 1)[1]) if isinstance(fn, tuple) else fn
            steps.append((fn, {k: v for k, v in step.items() if k != "function"}))
        out[spec["name"]] = build_filter_ensemble(spec["name"], steps)
    return out


def test_zero_shot_flexible_extract_on_real_cot_answers_is_lm_evals(task_manager):
    """Our zero-shot tasks' 'flexible-extract' (used for the bbh_zeroshot average) takes from each
    official chain-of-thought text exactly what lm-eval's stock bbh_zeroshot filters take, for every
    subtask: the oracle is lm-eval's own filter pipeline built from its stock YAML, not our files.
    Chain-of-thought text often names other options before the answer and the filter takes the first
    match, so only some answers are recovered; at least half are."""
    from lm_eval.api.instance import Instance

    recovered, total = 0, 0
    for sub in subtasks():
        task = get_task(task_manager, f"rlora_bbh_zeroshot_{sub}")
        stock = stock_filters(sub)["flexible-extract"]
        for s in cot_prompt(sub)[1]:
            doc = {"input": s.input, "target": s.answer}
            ours = _filtered(task, doc, s.reasoning)["flexible-extract"]
            inst = Instance(request_type="generate_until", doc=doc, arguments=("", {}), idx=0)
            inst.resps = [s.reasoning]
            stock.apply([inst])
            assert ours == inst.filtered_resps["flexible-extract"], (sub, s.input[:60])
            total += 1
            recovered += int(task.process_results(doc, [ours])["exact_match"] == 1.0)
    assert total == 81 and recovered > total / 2, recovered


@pytest.mark.parametrize("sub", ["boolean_expressions", "date_understanding", "word_sorting"])
def test_direct_answer_scoring_strips_the_generated_leading_space(task_manager, sub):
    """A direct answer generated after "A:" starts with a space; lm-eval's raw bbh_fewshot score
    ("none") calls it wrong, the reported "strip" score does not."""
    task = get_task(task_manager, f"rlora_bbh_fewshot_{sub}")
    for s in cot_prompt(sub)[1]:
        doc = {"input": s.input, "target": s.answer}
        out = _filtered(task, doc, " " + s.answer)
        assert task.process_results(doc, [out["strip"]])["exact_match"] == 1.0
        assert task.process_results(doc, [out["none"]])["exact_match"] == 0.0


def test_committed_task_files_are_what_the_generator_writes(tmp_path, monkeypatch):
    import filecmp

    import eval.generate_tasks as gen
    from eval.harness import TASK_DIR

    monkeypatch.setattr(gen, "TASKS", tmp_path)
    monkeypatch.setattr(gen, "OUT", tmp_path / "mmlu")
    gen.main()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(TASK_DIR) for p in TASK_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert written == committed
    assert all(filecmp.cmp(tmp_path / p, TASK_DIR / p, shallow=False) for p in written)
