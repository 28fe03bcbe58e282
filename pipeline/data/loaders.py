"""One loader per dataset in the data directory; each returns a list of ``Example``.

Splits are the files' own (see ``../shared/data/SOURCES.md``); the registry in
``tasks.py`` decides which becomes train and which held-out.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from .core import DataError, Example, data_dir, require_file

YES_NO = (" yes", " no")


def _tsv(path: Path) -> list[list[str]]:
    with require_file(path).open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _jsonl(path: Path) -> list[dict]:
    out = []
    with require_file(path).open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
    return out


def _labels(path: Path) -> list[str]:
    return [x.strip() for x in require_file(path).read_text().splitlines() if x.strip()]


def _bad(path: Path, where, what: str, got) -> DataError:
    return DataError(f"{path}:{where}: {what}, got {got!r}")


def _split(split: str, allowed: dict[str, str], task: str) -> str:
    if split not in allowed:
        raise DataError(f"{task}: split must be one of {sorted(allowed)}, got {split!r}")
    return allowed[split]


def load_sst2(split: str = "train", root=None) -> list[Example]:
    """GLUE SST-2 (train 67,349 / dev 872); the copy's header reads ``text<TAB>label``."""
    path = data_dir(root) / "sst2" / _split(split, {"train": "train.tsv", "dev": "dev.tsv"}, "sst2")
    out = []
    for i, row in enumerate(_tsv(path)[1:], start=2):
        if len(row) != 2 or row[1] not in ("0", "1"):
            raise _bad(path, i, "expected 'sentence<TAB>0|1'", row)
        out.append(Example("sst2", f"Review: {row[0].strip()}\nSentiment:", (" negative", " positive"), int(row[1])))
    return out


def load_qnli(split: str = "dev", root=None) -> list[Example]:
    """GLUE QNLI dev (5,463; the train file was not obtainable)."""
    path = data_dir(root) / "qnli" / _split(split, {"dev": "dev.tsv"}, "qnli")
    out = []
    for i, row in enumerate(_tsv(path)[1:], start=2):
        if len(row) != 4 or row[3] not in ("entailment", "not_entailment"):
            raise _bad(path, i, "expected index, question, sentence, label", row)
        prompt = f"Question: {row[1].strip()}\nSentence: {row[2].strip()}\nDoes the sentence answer the question?\nAnswer:"
        out.append(Example("qnli", prompt, YES_NO, 0 if row[3] == "entailment" else 1))
    return out


def load_piqa(split: str = "valid", root=None) -> list[Example]:
    """PIQA validation (1,838), inputs and labels in separate files aligned by line."""
    base = data_dir(root) / "piqa"
    _split(split, {"valid": "valid"}, "piqa")
    rows, labels = _jsonl(base / "valid.jsonl"), _labels(base / "valid-labels.lst")
    if len(rows) != len(labels):
        raise DataError(f"{base}: valid.jsonl has {len(rows)} rows but valid-labels.lst {len(labels)}")
    return [
        Example("piqa", f"Goal: {r['goal'].strip()}\nSolution:", (" " + r["sol1"].strip(), " " + r["sol2"].strip()), int(y))
        for r, y in zip(rows, labels)
    ]


def load_siqa(split: str = "train", root=None) -> list[Example]:
    """Social IQa (train 33,410 / dev 1,954); labels 1-based in ``*-labels.lst``."""
    base = data_dir(root) / "siqa"
    name = _split(split, {"train": "train", "dev": "dev"}, "siqa")
    rows, labels = _jsonl(base / f"{name}.jsonl"), _labels(base / f"{name}-labels.lst")
    if len(rows) != len(labels):
        raise DataError(f"{base}: {name}.jsonl has {len(rows)} rows but {name}-labels.lst {len(labels)}")
    out = []
    for r, y in zip(rows, labels):
        prompt = f"Context: {r['context'].strip()}\nQuestion: {r['question'].strip()}\nAnswer:"
        choices = tuple(" " + r[k].strip() for k in ("answerA", "answerB", "answerC"))
        out.append(Example("siqa", prompt, choices, int(y) - 1))
    return out


def load_boolq(split: str = "val", root=None) -> list[Example]:
    """BoolQ dev (SuperGLUE copy, 3,270); ``label`` is the string "true"/"false"."""
    path = data_dir(root) / "boolq" / _split(split, {"val": "val.jsonl"}, "boolq")
    out = []
    for i, r in enumerate(_jsonl(path), start=1):
        label = str(r.get("label")).lower()
        if label not in ("true", "false"):
            raise _bad(path, i, "label must be 'true' or 'false'", r.get("label"))
        q = r["question"].strip()
        prompt = f"Passage: {r['passage'].strip()}\nQuestion: {q}{'' if q.endswith('?') else '?'}\nAnswer:"
        out.append(Example("boolq", prompt, YES_NO, 0 if label == "true" else 1))
    return out


_OBQA_CHOICE = re.compile(r"\(([A-D])\)\s*(.*?)\s*(?=\([A-D]\)|$)")


def load_openbookqa(split: str = "train", root=None) -> list[Example]:
    """OpenBookQA main (train 4,957 / dev 500 / test 500), official TSV form."""
    path = data_dir(root) / "openbookqa" / _split(split, {s: f"{s}.tsv" for s in ("train", "dev", "test")}, "openbookqa")
    out = []
    for i, row in enumerate(_tsv(path)[1:], start=2):
        if len(row) != 5:
            raise _bad(path, i, "expected 5 columns", row)
        found = _OBQA_CHOICE.findall(row[2])
        labels = [k for k, _ in found]
        # One train row (line 3334) lists a fifth choice, also labelled (D); its key is B, so we
        # keep every listed choice and take the first one carrying the key's label.
        if labels[:4] != ["A", "B", "C", "D"] or row[4] not in labels:
            raise _bad(path, i, "choices '(A) .. (D) ..' with an answer key among them", row[2])
        out.append(Example("openbookqa", f"Question: {row[1].strip()}\nAnswer:",
                           tuple(" " + t for _, t in found), labels.index(row[4])))
    return out


def load_cosmosqa(split: str = "valid", root=None) -> list[Example]:
    """Cosmos QA validation (2,985)."""
    path = data_dir(root) / "cosmosqa" / _split(split, {"valid": "valid.csv"}, "cosmosqa")
    with require_file(path).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for i, r in enumerate(rows, start=2):
        if r.get("label") not in ("0", "1", "2", "3"):
            raise _bad(path, i, "label must be 0-3", r.get("label"))
        prompt = f"Context: {r['context'].strip()}\nQuestion: {r['question'].strip()}\nAnswer:"
        out.append(Example("cosmosqa", prompt, tuple(" " + r[f"answer{k}"].strip() for k in range(4)), int(r["label"])))
    return out


def load_dpr(split: str = "train", root=None) -> list[Example]:
    """Definite Pronoun Resolution (train 1,316 / test 564): 4-line blocks."""
    path = data_dir(root) / "dpr" / _split(split, {"train": "train.c.txt", "test": "test.c.txt"}, "dpr")
    blocks = [b for b in re.split(r"\n\s*\n", require_file(path).read_text(encoding="utf-8")) if b.strip()]
    out = []
    for i, block in enumerate(blocks, start=1):
        lines = [x.strip() for x in block.strip().splitlines()]
        if len(lines) != 4:
            raise _bad(path, f"block {i}", "expected 4 lines (sentence, pronoun, candidates, answer)", lines)
        sentence, pronoun, cands, answer = lines
        choices = [c.strip() for c in cands.split(",")]
        if answer not in choices:
            raise _bad(path, f"block {i}", "answer must be one of the candidates", answer)
        prompt = f"Sentence: {sentence}\nIn the sentence above, \"{pronoun}\" refers to"
        out.append(Example("dpr", prompt, tuple(" " + c for c in choices), choices.index(answer)))
    return out


def load_wsc(split: str = "val", root=None) -> list[Example]:
    """SuperGLUE WSC validation (104)."""
    path = data_dir(root) / "wsc" / _split(split, {"val": "val.jsonl"}, "wsc")
    out = []
    for i, r in enumerate(_jsonl(path), start=1):
        t = r["target"]
        label = str(r.get("label")).lower()
        if label not in ("true", "false"):
            raise _bad(path, i, "label must be 'true' or 'false'", r.get("label"))
        prompt = (f"Passage: {r['text'].strip()}\nQuestion: In the passage above, does \"{t['span2_text']}\" "
                  f"refer to \"{t['span1_text']}\"?\nAnswer:")
        out.append(Example("wsc", prompt, YES_NO, 0 if label == "true" else 1))
    return out


def _load_arc(task: str, folder: str, split: str, root) -> list[Example]:
    name = _split(split, {"dev": "Dev", "test": "Test"}, task)
    path = data_dir(root) / "arc" / folder / f"{folder}-{name}.jsonl"
    out = []
    for i, r in enumerate(_jsonl(path), start=1):
        labels = [c["label"] for c in r["question"]["choices"]]
        if r["answerKey"] not in labels:
            raise _bad(path, i, "answerKey must be a choice label", r["answerKey"])
        out.append(Example(task, f"Question: {r['question']['stem'].strip()}\nAnswer:",
                           tuple(" " + c["text"].strip() for c in r["question"]["choices"]), labels.index(r["answerKey"])))
    return out


def load_arc_challenge(split: str = "dev", root=None) -> list[Example]:
    """ARC-Challenge (dev 299 / test 1,172), original AI2 schema."""
    return _load_arc("arc_challenge", "ARC-Challenge", split, root)


def load_arc_easy(split: str = "dev", root=None) -> list[Example]:
    """ARC-Easy (dev 570 / test 2,376), original AI2 schema."""
    return _load_arc("arc_easy", "ARC-Easy", split, root)


def load_gsm8k(split: str = "train", root=None) -> list[Example]:
    """GSM8K (train 7,473 / test 1,319); generative: one 'choice', the worked answer."""
    path = data_dir(root) / "gsm8k" / _split(split, {"train": "train.jsonl", "test": "test.jsonl"}, "gsm8k")
    out = []
    for i, r in enumerate(_jsonl(path), start=1):
        if "####" not in r.get("answer", ""):
            raise _bad(path, i, "answer must end with '#### <number>'", r.get("answer", "")[-40:])
        out.append(Example("gsm8k", f"Question: {r['question'].strip()}\nAnswer:", (" " + r["answer"].strip(),), 0))
    return out


def load_codealpaca(split: str = "all", root=None) -> list[Example]:
    """CodeAlpaca 2k pilot sample (2,017 records; the 2 with an empty output are dropped); generative."""
    path = data_dir(root) / "codealpaca" / _split(split, {"all": "code_alpaca_2k.json"}, "codealpaca")
    try:
        rows = json.loads(require_file(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e.msg})") from None
    out = []
    for r in rows:
        if not r.get("output", "").strip():
            continue
        inp = f"\nInput: {r['input'].strip()}" if r.get("input", "").strip() else ""
        out.append(Example("codealpaca", f"Instruction: {r['instruction'].strip()}{inp}\nResponse:",
                           (" " + r["output"].strip(),), 0))
    return out
