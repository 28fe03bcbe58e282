"""The eval stage's task names, for everything that must know them without importing ``eval/``
(the config schema validates ``eval.tasks`` with them; ``eval/`` builds on them). The import
direction is one way: rlora <- pipeline <- eval, benchmarks."""

from __future__ import annotations

from pipeline.data.tasks import MIXTURES, TASKS

# family (the metric prefix and the name users pass) -> (our offline group, lm-eval's stock group,
# stock subtask prefix). Subtask and category metrics are <family>/<name>; the group is <family>/avg.
FAMILIES = {
    "mmlu": ("rlora_mmlu", "mmlu", "mmlu_"),
    "mmlu_continuation": ("rlora_mmlu_continuation", "mmlu_continuation", "mmlu_continuation_"),
    "bbh": ("rlora_bbh", "bbh", "bbh_cot_fewshot_"),
    "bbh_fewshot": ("rlora_bbh_fewshot", "bbh_fewshot", "bbh_fewshot_"),
    "bbh_zeroshot": ("rlora_bbh_zeroshot", "bbh_zeroshot", "bbh_zeroshot_"),
    "gsm8k": ("rlora_gsm8k", "gsm8k", "gsm8k_"),  # one task: its score is gsm8k/avg
}
LOCAL_NAMES = {family: local for family, (local, _, _) in FAMILIES.items()}
CATEGORY_GROUPS = ("stem", "other", "social_sciences", "humanities")


def choice_tasks() -> list[str]:
    return [t for t, spec in TASKS.items() if spec.kind == "choice"]


def heldout_mixtures() -> dict[str, list[str]]:
    ok = set(choice_tasks())
    return {m: list(ts) for m, ts in MIXTURES.items() if set(ts) <= ok}


def heldout_names() -> dict[str, str]:
    """``heldout_<task|mixture>`` (what --tasks accepts) -> our lm-eval task or group."""
    return {f"heldout_{n}": f"rlora_heldout_{n}" for n in (*choice_tasks(), *heldout_mixtures())}


def local_names() -> dict[str, str]:
    """Every name ``--tasks`` / ``eval.tasks`` accepts offline -> our lm-eval task or group."""
    return {**LOCAL_NAMES, **heldout_names()}
