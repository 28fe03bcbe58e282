"""``python -m eval.compare RUN_A RUN_B [--tracking-uri URI] [--json FILE]``

Paired comparison of two MLflow runs on the examples both scored, from the per-example tables
the runs carry (``examples/confirm-<step>.parquet`` and ``examples/heldout-<step>.parquet`` from
training, ``examples/lmeval-<round>.parquet`` from the eval stage; the latest of each). For the
confirmation split and the held-out (selection) split: accuracy, gold-vs-best-wrong margin and gold
log-prob, as macro means over tasks; for each lm-eval family (bbh_fewshot, mmlu, ...): accuracy
pooled over its questions. Each line gives A - B with a 95 % paired-bootstrap interval, McNemar's
exact p for accuracies, and whether the difference is resolved. Two trials of a sweep were ranked
on the held-out split: compare them on the confirmation split (listed first), which did not choose them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.config.cli import fail, user_errors
from pipeline.paired import paired_compare
from pipeline.runs import run_examples
from pipeline.stats import VALUE_NAMES, display_scale, score_table
from pipeline.tracking import check_reachable, resolve_tracking_uri


class CompareError(ValueError):
    pass


def compare_runs(client, run_a: str, run_b: str) -> list[dict[str, Any]]:
    for rid in (run_a, run_b):  # both checked before anything is downloaded
        try:
            client.get_run(rid)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own types
            raise CompareError(f"run {rid} not found ({str(e).splitlines()[0][:160]})") from None
    a, b = run_examples(client, run_a), run_examples(client, run_b)
    common = sorted(set(a) & set(b))
    if not common:
        raise CompareError(f"runs {run_a} and {run_b} have no per-example tables of the same kind "
                           f"(A: {sorted(a) or 'none'}, B: {sorted(b) or 'none'})")
    out = []
    split = {"confirm": "confirmation split (macro over tasks)",
             "heldout": "held-out selection split (macro over tasks; the examples a sweep ranked its trials on)"}
    for kind in sorted(common, key=lambda k: (k not in split, k != "confirm", k)):
        ta, tb = a[kind], b[kind]
        if kind in split:
            groups = [(split[kind], ta, tb, True)]
        else:
            fams = sorted({t.split("/")[0] for t in ta["task"]} & {t.split("/")[0] for t in tb["task"]})
            groups = [(fam, ta[ta["task"].str.startswith(fam + "/")], tb[tb["task"].str.startswith(fam + "/")], False)
                      for fam in fams]
        for label, ga, gb, by_task in groups:
            for col in ("correct", "margin", "gold_logprob"):
                if ga[col].isna().all() or gb[col].isna().all():
                    continue
                c = paired_compare(ga, gb, col, by_task=by_task)
                if c.n == 0:
                    continue
                scale, unit = display_scale(col)
                sa = score_table(ga, col)[1] if by_task else None
                sb = score_table(gb, col)[1] if by_task else None
                out.append({"scope": label, "score": VALUE_NAMES[col], "n": c.n, "delta": c.delta, "se": c.se,
                            "lo": c.lo, "hi": c.hi, "p_mcnemar": c.p_mcnemar, "resolved": c.resolved,
                            "a": sa.fmt(scale, 1 if unit == "points" else 3) if sa else None,
                            "b": sb.fmt(scale, 1 if unit == "points" else 3) if sb else None,
                            "line": c.sentence("A", "B", scale, unit)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--json", type=Path, default=None, help="also write the comparison as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
        check_reachable(uri)
        rows = compare_runs(MlflowClient(uri), args.run_a, args.run_b)
    except (CompareError, *user_errors()) as e:
        return fail(e)
    print(f"A = {args.run_a}\nB = {args.run_b}\n")
    for r in rows:
        score = f"{r['scope']}, {r['score']}"
        means = f" (A {r['a']}, B {r['b']})" if r["a"] else ""
        print(f"{score}{means}: {r['line']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
