import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.data.batching import build_mixture, encode_example
from pipeline.config.run import DataSection
from pipeline.data import data_dir
from pipeline.data.mixture_cache import cache_dir, mixture_key, tokenised_mixture
from pipeline.model.base import resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLORA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def small_data(tmp_path):
    """A copy of two tasks' files, to edit."""
    root = tmp_path / "data"
    for task in ("sst2", "boolq"):
        shutil.copytree(data_dir() / task, root / task)
    return root


def test_a_cached_mixture_is_the_one_built_from_the_files(cache, tok, model_dir):
    data = DataSection(tasks=["sst2", "siqa", "boolq"], train_per_task=40, eval_per_task=7, max_length=64, seed=3)
    mix, enc, hit = tokenised_mixture(data, tok, model_dir)
    assert not hit and len(list(cache_dir().glob("*.json"))) == 1
    again, enc2, hit2 = tokenised_mixture(data, tok, model_dir)
    assert hit2
    fresh = build_mixture(data.tasks, 40, 7, 3)
    assert again.train == fresh.train and again.held_out == fresh.held_out and again.tasks == fresh.tasks
    assert enc2 == [encode_example(tok, ex, 64) for ex in fresh.train] == enc
    assert isinstance(again.train[0].choices, tuple)  # Examples as the builder makes them (hashable)


def test_a_changed_data_file_or_setting_is_never_served_from_a_stale_entry(cache, tok, model_dir, small_data):
    data = DataSection(tasks=["sst2", "boolq"], train_per_task=30, eval_per_task=5, max_length=48,
                       data_dir=str(small_data))
    first, _, _ = tokenised_mixture(data, tok, model_dir)
    # every training sentence of sst2 rewritten, the file's size kept: only its mtime tells
    train = small_data / "sst2" / "train.tsv"
    lines = train.read_text().splitlines()
    train.write_text("\n".join([lines[0]] + [l.replace("e", "E") for l in lines[1:]]) + "\n")
    os.utime(train, ns=(train.stat().st_atime_ns, train.stat().st_mtime_ns + 10**9))
    changed, _, hit = tokenised_mixture(data, tok, model_dir)
    assert not hit
    sst2 = [e.prompt for e in changed.train if e.task == "sst2"]
    assert sst2 and all("e" not in p.removeprefix("Review: ").split("\n")[0] for p in sst2)
    assert changed.train != first.train
    for field, value in (("max_length", 40), ("seed", 1), ("train_per_task", 29), ("eval_per_task", 4),
                         ("tasks", ["boolq", "sst2"])):
        other = data.model_copy(update={field: value})
        assert mixture_key(other, model_dir) != mixture_key(data, model_dir), field


def test_another_tokenizer_gets_its_own_entry(cache, tmp_path, tok, model_dir):
    data = DataSection(tasks=["sst2"], train_per_task=10, eval_per_task=2, max_length=32)
    other = tmp_path / "model"
    other.mkdir()
    for f in Path(model_dir).iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, other / f.name)
    assert mixture_key(data, str(other)) == mixture_key(data, model_dir)  # same files, same key
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert mixture_key(data, str(other)) != mixture_key(data, model_dir)
    assert mixture_key(data, "org/not-a-local-dir") is None


def test_an_unreadable_entry_is_rebuilt_and_the_cache_can_be_turned_off(cache, tok, model_dir, monkeypatch):
    data = DataSection(tasks=["boolq"], train_per_task=12, eval_per_task=3, max_length=48)
    mix, enc, _ = tokenised_mixture(data, tok, model_dir)
    entry = cache_dir() / f"{mixture_key(data, model_dir)}.json"
    entry.write_text(entry.read_text()[:1000])  # cut short
    again, enc2, hit = tokenised_mixture(data, tok, model_dir)
    assert not hit and again.train == mix.train and enc2 == enc
    assert json.loads(entry.read_text())["encoded"] == [list(map(list, e)) for e in enc]  # replaced whole
    monkeypatch.setenv("RLORA_MIXTURE_CACHE", "0")
    assert tokenised_mixture(data, tok, model_dir)[2] is False
