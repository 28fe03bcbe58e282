"""Every loader parses its real files in the data dir; counts match SOURCES.md."""

import pytest

from pipeline.data import MIXTURES, TASKS, DataError, content_key, data_dir, resolve_tasks, task_splits
from pipeline.data import loaders

# (loader, split) -> examples, as stated in ../shared/data/SOURCES.md
COUNTS = [
    (loaders.load_sst2, "train", 67349),
    (loaders.load_sst2, "dev", 872),
    (loaders.load_qnli, "dev", 5463),
    (loaders.load_piqa, "valid", 1838),
    (loaders.load_siqa, "train", 33410),
    (loaders.load_siqa, "dev", 1954),
    (loaders.load_boolq, "val", 3270),
    (loaders.load_openbookqa, "train", 4957),
    (loaders.load_openbookqa, "dev", 500),
    (loaders.load_openbookqa, "test", 500),
    (loaders.load_cosmosqa, "valid", 2985),
    (loaders.load_dpr, "train", 1316),
    (loaders.load_dpr, "test", 564),
    (loaders.load_wsc, "val", 104),
    (loaders.load_arc_challenge, "dev", 299),
    (loaders.load_arc_challenge, "test", 1172),
    (loaders.load_arc_easy, "dev", 570),
    (loaders.load_arc_easy, "test", 2376),
    (loaders.load_gsm8k, "train", 7473),
    (loaders.load_gsm8k, "test", 1319),
    (loaders.load_codealpaca, "all", 2015),  # 2,017 records, 2 have an empty output and are dropped
]


@pytest.mark.parametrize("loader,split,n", COUNTS, ids=[f"{l.__name__[5:]}-{s}" for l, s, _ in COUNTS])
def test_loader_parses_real_file_with_documented_count(loader, split, n):
    examples = loader(split)
    assert len(examples) == n
    for ex in examples:
        assert ex.prompt.strip() and len(ex.choices) >= 1 and 0 <= ex.gold < len(ex.choices)
        assert all(c.startswith(" ") and c.strip() for c in ex.choices)


def test_documented_label_balance():
    boolq = loaders.load_boolq("val")
    assert sum(e.gold == 0 for e in boolq) == 2033  # SOURCES.md: 2033 true, 1237 false
    wsc = loaders.load_wsc("val")
    assert sum(e.gold == 0 for e in wsc) == 38  # 38 true, 66 false
    arc = loaders.load_arc_challenge("dev") + loaders.load_arc_challenge("test") + \
        loaders.load_arc_easy("dev") + loaders.load_arc_easy("test")
    assert sum(len(e.choices) == 3 for e in arc) + sum(len(e.choices) == 5 for e in arc) > 0


@pytest.mark.parametrize("task", list(TASKS))
def test_held_out_is_never_trained_on(task):
    train, held = task_splits(task)
    assert train and held
    assert not {content_key(e) for e in train} & {content_key(e) for e in held}
    # deterministic: a second load gives the same split in the same order
    train2, held2 = task_splits(task)
    assert [content_key(e) for e in held2] == [content_key(e) for e in held]
    assert len(train2) == len(train)


def test_hash_split_fraction_is_about_20_percent():
    train, held = task_splits("qnli")
    assert 0.17 < len(held) / (len(train) + len(held)) < 0.23


def test_mixtures_resolve_to_known_tasks():
    assert resolve_tasks("five_task") == ["sst2", "qnli", "piqa", "siqa", "boolq"]
    assert len(resolve_tasks("eight_task")) == 8
    assert all(t in TASKS for m in MIXTURES.values() for t in m)
    with pytest.raises(DataError, match="unknown task 'qqp'"):
        resolve_tasks(["sst2", "qqp"])


def test_missing_data_is_reported_with_its_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "sst2" / "dev.tsv")):
        loaders.load_sst2("dev", tmp_path)
    with pytest.raises(DataError, match="data directory not found"):
        data_dir(tmp_path / "nope")
    with pytest.raises(DataError, match="split must be one of"):
        loaders.load_qnli("train")


def test_malformed_file_names_path_and_line(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("text\tlabel\ngood movie\t1\nbad row without label\n")
    with pytest.raises(DataError, match=r"dev.tsv:3"):
        loaders.load_sst2("dev", tmp_path)
