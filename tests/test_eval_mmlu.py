"""MMLU through lm-eval with the project's offline tasks, checked against an independent
implementation of lm-eval's ``mmlu`` prompt + log-likelihood scoring."""

import pytest
import torch

from eval.mmlu import LETTERS, load_all, mmlu_path
from eval.harness import EvalSettings, Evaluator
from eval.results import flatten_scores

SUBJECTS = ["abstract_algebra", "world_religions", "high_school_us_history"]  # short to long questions
PER_SUBJECT = 3


def test_mmlu_file_has_14042_questions_in_57_subjects():
    data = load_all()
    assert len(data) == 57 and sum(map(len, data.values())) == 14042  # 2 stray header rows dropped
    assert mmlu_path().name == "mmlu.jsonl"
    assert all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for rows in data.values() for r in rows)


def independent_mmlu_predictions(model, tok, subject, rows):
    """lm-eval's mmlu, re-implemented: description + question + lettered choices, continuation
    ' A'..' D' scored by summed token log-probability, argmax."""
    desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    preds = []
    for r in rows:
        ctx = desc + r["question"].strip() + "".join(f"\n{l}. {c}" for l, c in zip(LETTERS, r["choices"])) + "\nAnswer:"
        scores = []
        for letter in LETTERS:
            # lm-eval encodes context+continuation together and splits at the context's length
            whole = tok(ctx + " " + letter, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
        preds.append(max(range(4), key=scores.__getitem__))
    return preds


@pytest.mark.slow
def test_project_mmlu_task_matches_independent_scoring():
    tasks = [f"rlora_mmlu_{s}" for s in SUBJECTS]
    ev = Evaluator(EvalSettings("smollm2-135m-instruct", tuple(tasks), limit=PER_SUBJECT, num_fewshot=0, batch_size=8))
    res = ev.run(None, log_samples=True)
    model, tok = ev.base, ev.tok
    data = load_all()
    for s in SUBJECTS:
        rows = data[s][:PER_SUBJECT]
        preds = independent_mmlu_predictions(model, tok, s, rows)
        samples = sorted(res["samples"][f"rlora_mmlu_{s}"], key=lambda x: x["doc_id"])
        lm_eval_preds = [max(range(4), key=lambda i: x["filtered_resps"][i][0]) for x in samples]
        assert lm_eval_preds == preds, s
        ours = sum(p == r["answer"] for p, r in zip(preds, rows)) / len(rows)
        assert res["results"][f"rlora_mmlu_{s}"]["acc,none"] == pytest.approx(ours)
    again = ev.run(None)
    assert flatten_scores(again["results"]) == flatten_scores(res["results"])  # stable run to run
