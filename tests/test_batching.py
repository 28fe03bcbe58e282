import pytest

from pipeline.data.batching import IGNORE, LengthAwareBatches, build_mixture, encode_example
from pipeline.data import Example, content_key, task_splits
from pipeline.model.base import resolve_model


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    t.pad_token = t.pad_token or t.eos_token
    return t


def test_loss_is_on_answer_tokens_only(tok):
    ex = Example("sst2", "Review: a fine film\nSentiment:", (" negative", " positive"), 1)
    ids, labels = encode_example(tok, ex, max_length=64)
    n_prompt = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    answer = [t for t in labels if t != IGNORE]
    assert tok.decode(answer[:-1]) == " positive" and answer[-1] == tok.eos_token_id
    assert ids[n_prompt:] == answer


def test_long_prompts_are_truncated_from_the_left_keeping_the_answer(tok):
    ex = Example("boolq", "word " * 400 + "\nAnswer:", (" yes", " no"), 0)
    ids, labels = encode_example(tok, ex, max_length=48)
    assert len(ids) == 48
    assert tok.decode([t for t in labels if t != IGNORE][:-1]) == " yes"


def test_length_aware_batches_group_similar_lengths_and_shard_by_rank():
    encoded = [([1] * n, [1] * n) for n in list(range(5, 400, 3)) * 4]
    stream = LengthAwareBatches(encoded, batch_size=8, pad_id=0, seed=3, pool_batches=8)
    batches = [b for b, _ in zip(stream.for_rank(0, 1), range(20))]
    spread = [int(b["attention_mask"].sum(1).max() - b["attention_mask"].sum(1).min()) for b in batches]
    assert sum(spread) / len(spread) < 80  # pools of 8 batches: ~400/8; random batches spread ~300
    r0 = [b["input_ids"].shape for b, _ in zip(stream.for_rank(0, 2), range(5))]
    r1 = [b["input_ids"].shape for b, _ in zip(stream.for_rank(1, 2), range(5))]
    everything = [b["input_ids"].shape for b, _ in zip(stream.for_rank(0, 1), range(10))]
    assert r0 == everything[0::2] and r1 == everything[1::2]
    resumed = [b["input_ids"].shape for b, _ in zip(stream.for_rank(0, 1, skip_steps=4), range(3))]
    assert resumed == everything[4:7]


def test_mixture_caps_and_never_trains_on_held_out():
    mix = build_mixture("five_task", train_per_task=50, eval_per_task=10, seed=1)
    counts = mix.counts()
    assert all(counts[f"train/{t}"] == 50 and counts[f"held_out/{t}"] == 10 for t in mix.tasks)
    held = {content_key(e) for e in mix.held_out}
    assert not held & {content_key(e) for e in mix.train}
    again = build_mixture("five_task", train_per_task=50, eval_per_task=10, seed=1)
    assert [content_key(e) for e in again.train] == [content_key(e) for e in mix.train]
    full_held = {content_key(e) for e in task_splits("qnli")[1]}
    assert {content_key(e) for e in mix.held_out if e.task == "qnli"} <= full_held
