"""score_choices (one forward per distinct context, choices scored against its KV cache) agrees
with the pairwise lm-eval-style scorer continuation_logprobs, example by example."""

import random

import pytest
import torch

from pipeline.data import Example, content_key, task_splits
from pipeline.model.scoring import choice_accuracy_by_task, continuation_logprobs, score_choices
from pipeline.data.encoding import encode_pair

TASKS = ("sst2", "siqa", "boolq", "piqa")  # 2 and 3 choices, one-token and long answers, long passages
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="module")
def held_out():
    return [ex for task in TASKS for ex in task_splits(task)[1][:10]]


def pairwise(model, tok, examples, max_length, batch_size=16):
    """Today's scorer: one full forward per (prompt, choice), regrouped per example."""
    flat = continuation_logprobs(model, tok, [(e.prompt, c) for e in examples for c in e.choices],
                                 max_length, batch_size)
    out, k = [], 0
    for e in examples:
        out.append([lp for lp, _ in flat[k : k + len(e.choices)]])
        k += len(e.choices)
    return out


def assert_matches_pairwise(model, tok, examples, max_length, batch_size):
    ours = score_choices(model, tok, examples, max_length=max_length, batch_size=batch_size)
    ref = pairwise(model, tok, examples, max_length)
    assert len(ours) == len(examples)
    for ex, row, want in zip(examples, ours, ref):
        assert row["task"] == ex.task
        assert len(row["choice_logprobs"]) == len(ex.choices)
        assert row["choice_logprobs"] == pytest.approx(want, abs=TOL, rel=0), (ex.task, ex.prompt[:60])
    return ours, ref


def truncated_contexts(tok, ex, max_length):
    return {tuple(ids[:n]) for ids, n in (encode_pair(tok, ex.prompt, c, max_length) for c in ex.choices)}


@pytest.mark.parametrize("max_length,batch_size", [(512, 16), (128, 5), (24, 3)])
def test_choice_logprobs_equal_the_pairwise_scorer(tiny, held_out, max_length, batch_size):
    model, tok = tiny
    assert {len(e.choices) for e in held_out} == {2, 3}
    n_ctx = [len(tok(e.prompt, add_special_tokens=False)["input_ids"]) for e in held_out]
    assert max(n_ctx) > 200  # long prompts (BoolQ passages)
    if max_length == 24:
        # left truncation where choices of different token lengths leave different contexts
        split = [e for e in held_out if len(truncated_contexts(tok, e, max_length)) > 1]
        assert len(split) >= 5 and {e.task for e in split} >= {"piqa", "siqa"}
    assert_matches_pairwise(model, tok, held_out, max_length, batch_size)


def test_edge_cases_empty_context_and_continuation_filling_max_length(tiny):
    model, tok = tiny
    long_choice = " and then" * 30  # more tokens than max_length: capped, context cut to one token
    examples = [
        Example("t", "", (" yes", " no thanks", " maybe so, maybe not"), 2),  # no context at all
        Example("t", "Question: is it?\nAnswer:", (" yes", long_choice), 1),
        Example("t", "Question: is it?\nAnswer:", (" no", " yes"), 0),  # same context as above, other choices
    ]
    assert_matches_pairwise(model, tok, examples, max_length=24, batch_size=2)


def test_peft_wrapped_model_matches_and_training_mode_is_restored(tiny_model_dir, tiny):
    import rlora
    from transformers import AutoModelForCausalLM

    _, tok = tiny
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = rlora.get_peft_model(base, rlora.RLoraConfig.from_preset(
        "rlora", r=4, num_heads=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: nonzero B, so the adapter changes the scores
        for name, p in model.named_parameters():
            if "rlora_B" in name:
                p.normal_(0, 0.5)
    examples = [ex for task in ("siqa", "piqa") for ex in task_splits(task)[1][:4]]
    model.train()
    ours, _ = assert_matches_pairwise(model, tok, examples, max_length=40, batch_size=4)
    assert model.training  # score_choices evaluates in eval mode, then restores the mode
    with model.disable_adapter():
        without = score_choices(model, tok, examples, max_length=40, batch_size=4)
    assert max(abs(a - b) for r, w in zip(ours, without)
               for a, b in zip(r["choice_logprobs"], w["choice_logprobs"])) > 1e-3


def test_pred_correct_margin_and_gold_logprob_follow_the_choice_logprobs(tiny, held_out):
    model, tok = tiny
    tie = Example("tie", "Answer:", (" yes", " yes"), 1)  # equal scores: the first max wins
    examples = held_out + [tie]
    rows = score_choices(model, tok, examples, max_length=128, batch_size=8)
    for ex, r in zip(examples, rows):
        s = r["choice_logprobs"]
        best = max(s)
        assert r["pred"] == s.index(best)  # first max wins
        assert r["correct"] == (1.0 if r["pred"] == ex.gold else 0.0)
        assert r["gold_logprob"] == s[ex.gold]
        assert r["margin"] == pytest.approx(s[ex.gold] - max(v for k, v in enumerate(s) if k != ex.gold), abs=0)
        if r["margin"] != 0:
            assert (r["margin"] > 0) == (r["correct"] == 1.0)
    t = rows[-1]
    assert t["choice_logprobs"][0] == t["choice_logprobs"][1]
    assert (t["pred"], t["correct"], t["margin"]) == (0, 0.0, 0.0)
    # predictions equal today's argmax over the pairwise scores, and accuracy is unchanged
    ref = pairwise(model, tok, held_out, 128)
    assert [r["pred"] for r in rows[:-1]] == [max(range(len(s)), key=s.__getitem__) for s in ref]
    acc = choice_accuracy_by_task(model, tok, held_out, max_length=128, batch_size=8)
    assert list(acc) == list(TASKS)
    for task in TASKS:
        hits = [int(max(range(len(s)), key=s.__getitem__) == e.gold) for e, s in zip(held_out, ref) if e.task == task]
        assert acc[task] == pytest.approx(sum(hits) / len(hits), abs=0)
    assert 0 < sum(r["correct"] for r in rows[:-1]) < len(held_out)


def test_example_ids_are_stable_distinct_and_follow_input_order(tiny, held_out):
    model, tok = tiny
    rows = score_choices(model, tok, held_out, max_length=64, batch_size=16)
    assert [r["example_id"] for r in rows] == [content_key(e)[:16] for e in held_out]
    assert all(len(r["example_id"]) == 16 for r in rows)
    distinct = {content_key(e) for e in held_out}
    assert len({r["example_id"] for r in rows}) == len(distinct) == len(held_out)
    # another order and batch size: the same example gets the same id and the same scores
    order = list(range(len(held_out)))
    random.Random(0).shuffle(order)
    again = score_choices(model, tok, [held_out[i] for i in order], max_length=64, batch_size=7)
    by_id = {r["example_id"]: r for r in rows}
    for i, r in zip(order, again):
        assert r["example_id"] == rows[i]["example_id"]
        assert r["task"] == held_out[i].task
        assert r["choice_logprobs"] == pytest.approx(by_id[r["example_id"]]["choice_logprobs"], abs=TOL, rel=0)


def test_answer_nll_is_per_answer_token_with_the_ratio_estimators_standard_error(tiny):
    """The generative tasks' held-out objective (``eval/<task>/answer_nll``, GSM8K's single-task
    sweep ranks on it): every example's answer tokens scored in its own forward pass, the total NLL
    over the total answer tokens, and the standard error of that ratio over the examples."""
    import math

    from pipeline.model.scoring import answer_nll_by_task

    model, tok = tiny
    examples = task_splits("gsm8k")[1][:5] + task_splits("codealpaca")[0][:3]
    per_example = {}
    for ex in examples:  # one unpadded forward per example, the answer's tokens only
        ctx = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        cont = tok(ex.answer, add_special_tokens=False)["input_ids"]
        ids = ctx + cont
        assert len(ids) <= 512  # nothing truncated at max_length 512
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        nll = -sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))
        per_example.setdefault(ex.task, []).append((nll, len(cont)))
    got = answer_nll_by_task(model, tok, examples, max_length=512, batch_size=3)
    assert set(got) == {"gsm8k", "codealpaca"}
    for task, rows in per_example.items():
        k, n = len(rows), sum(c for _, c in rows)
        ratio = sum(x for x, _ in rows) / n
        se = math.sqrt(sum((x - ratio * c) ** 2 for x, c in rows) / (k * (k - 1))) / (n / k)
        assert got[task][0] == pytest.approx(ratio, rel=1e-4)
        assert got[task][1] == pytest.approx(se, rel=1e-3) and se > 0
    single = answer_nll_by_task(model, tok, examples[:1], max_length=512)
    assert math.isnan(single["gsm8k"][1])  # one example: no spread to estimate an error from
