"""What the eval stage records: per-run results, the paired comparison table, plot and registry versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from eval.harness import EvalSettings
from pipeline.claims import confirm_metric
from pipeline.data.eval_names import CATEGORY_GROUPS, FAMILIES
from pipeline.paired import compare_family
from pipeline.reports import AB_COL, PCT_COL, pyplot, save_figure, write_table
from pipeline.runs import run_examples
from pipeline.stats import examples_file, save_examples
from pipeline.tracking import EXAMPLES_DIR, MODEL_ID_TAG, Tracker

SIG_TAG = "rlora.eval.signature"


ROUND_TAG = "rlora.eval.round"


def headline(scores: dict[str, float]) -> dict[str, float]:
    """The scores worth a column: family averages, MMLU categories, held-out accuracies."""
    keep = {k for k in scores if not k.endswith("_stderr") and (
        k.endswith("/avg") or k.startswith("heldout/")
        or (k.split("/")[0].startswith("mmlu") and k.split("/")[1] in CATEGORY_GROUPS))}
    keep |= {f"{k}_stderr" for k in keep if f"{k}_stderr" in scores}  # shown as x ± se
    return {k: scores[k] for k in sorted(keep)}


def register(client, name: str, run, scores: dict[str, float], metric: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    tags = {k: f"{v:.4f}" for k, v in headline(scores).items()}
    tags.update({"trial_id": run.data.tags.get("rlora.trial_id", ""), metric: f"{run.data.metrics.get(metric, float('nan')):.4f}"})
    confirm = confirm_metric(metric)  # the score that measures it, beside the one that chose it
    if confirm in run.data.metrics:
        tags[confirm] = f"{run.data.metrics[confirm]:.4f}"
    existing = client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'")
    if existing:
        version = existing[0].version
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        return str(version)
    try:
        client.create_registered_model(name, description="R-LoRA adapters evaluated after the sweep")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    model_id = run.data.tags.get(MODEL_ID_TAG)  # the run's logged model (runs before it: the adapter artifact)
    source = f"models:/{model_id}" if model_id else f"{run.info.artifact_uri}/adapter"
    import mlflow

    before = mlflow.get_tracking_uri()
    # MLflow's SQL registry resolves a models:/<id> source through the process-global tracking URI,
    # not this client's (a TODO in its code): point it at this store while the version is created
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mv = client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags, model_id=model_id,
                                         description=f"trial {tags['trial_id']}: adapter directory (PEFT format; full "
                                                     "fine-tuning: the whole model), load with pipeline.model.adapters.load")
    finally:
        mlflow.set_tracking_uri(before)
    return str(mv.version)


def plot_comparison(rows: list[dict], keys: list[str], path: Path) -> Optional[Path]:
    plt = pyplot()

    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys or not rows:
        return None
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(keys) + 1), 3.4))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(keys))]
        err = [r.get(f"{k}_stderr") or 0.0 for k in keys]  # lm-eval's standard error
        ax.bar(xs, [r.get(k) or 0.0 for k in keys], width, yerr=err, capsize=2, label=r["model"],
               color="0.55" if r["model"] == "base" else None)
    ax.set_xticks(range(len(keys)), keys, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title("eval stage: base model vs top trials (error bars: ±1 standard error)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def log_results(results: list[dict], settings: EvalSettings, tracking_uri: str, client) -> dict[str, dict]:
    """Scores onto each job's run, at the next eval round (a new setting is a new point, never a
    duplicate); a failed job gets its error as a tag. Returns the scores by job name."""
    scores = {}
    for r in results:
        t = Tracker(tracking_uri, r["run_id"])
        if r["error"]:
            t.set_tags({"rlora.eval.error": r["error"][:500]})
            continue
        tags = client.get_run(r["run_id"]).data.tags
        rnd = int(tags.get(ROUND_TAG, "-1")) + 1
        t.log_metrics(r["scores"], step=rnd, model_id=tags.get(MODEL_ID_TAG))  # linked to the trial's adapter model
        t.log_metrics({"eval/wall_s": r["wall_s"]}, step=rnd)
        if r.get("examples") is not None and len(r["examples"]):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                t.log_artifact(save_examples(r["examples"], Path(tmp) / examples_file("lmeval", rnd)), EXAMPLES_DIR)
        t.set_tags({SIG_TAG: settings.signature(), ROUND_TAG: str(rnd),
                    "rlora.eval.settings": json.dumps(settings.__dict__, default=str)})
        scores[r["name"]] = r["scores"]
    return scores


def paired_rows(client, models: list[tuple[str, str]]) -> list[dict]:
    """Per task family, each model's paired difference (on the questions all of the family's models
    answered) to the base model and to the best trial (the first non-base model: targets are
    ranked by the sweep's objective, on data that is not these questions), with simultaneous 95 %
    intervals per family of comparisons (``pipeline.paired.compare_family``: every trial vs the
    base model, every other trial vs the best)."""
    tables = {name: run_examples(client, rid, "lmeval").get("lmeval") for name, rid in models}
    tables = {k: t for k, t in tables.items() if t is not None}
    trials = [name for name, _ in models if name != "base" and name in tables]
    families = sorted({t.split("/")[0] for name in trials for t in tables[name]["task"]})
    rows = {(name, fam): {"model": name, "family": fam} for fam in families for name in trials}
    for fam in families:
        if fam == "heldout":  # the pool the trials were ranked on: scores only, no claim (the sweep's confirmation split makes them)
            continue
        sub = {k: t[t["task"].str.startswith(fam + "/")] for k, t in tables.items()}
        sub = {k: t for k, t in sub.items() if len(t)}
        members = [k for k in trials if k in sub]
        refs = [("base", "base", members), ("best", trials[0], [k for k in members if k != trials[0]])]
        for label, ref, others in refs:
            if ref not in sub or not others:
                continue
            for name, c in compare_family(sub[ref], {k: sub[k] for k in others}, "correct", by_task=False).items():
                if c.n == 0:
                    continue
                row = rows[(name, fam)]
                row[f"Δ vs {label}"] = f"{100 * c.delta:+.1f} [{100 * c.lo:+.1f}, {100 * c.hi:+.1f}]"
                row[f"resolved vs {label}"] = "yes" if c.resolved else "no"
                row[f"sentence vs {label}"] = c.sentence(name, ref)
                row["n"] = c.n
    return [rows[(name, fam)] for name in trials for fam in families if len(rows[(name, fam)]) > 2]


def write_comparison(rows: list[dict], keys: list[str], metric: str, params: list[str], out_dir: Path,
                     paired: Optional[list[dict]] = None, confirm: Optional[str] = None) -> list[Path]:
    """comparison.{md,csv,html} (every headline score as x ± se), comparison_paired.{md,csv,html}
    (paired differences to the base model and to the best trial) and comparison.png."""
    adapter_cols = [c for c in (PCT_COL, AB_COL) if any(r.get(c) is not None for r in rows)]
    files = list(write_table(rows, ["model", metric, *([confirm] if confirm else []), *adapter_cols, *params, *keys,
                                    "registry_version", "run_id"], out_dir, "comparison"))
    if paired:
        cols = ["model", "family", "n", "Δ vs base", "resolved vs base", "Δ vs best", "resolved vs best"]
        cols = [c for c in cols if any(c in r for r in paired)]
        files += list(write_table(paired, cols, out_dir, "comparison_paired"))
        note = ["", "Differences in points (×100), paired over the questions the family's models all answered; "
                "simultaneous 95 % intervals per task family and reference (max-t bootstrap over every trial vs "
                "the base model, and over every other trial vs the best); 'no' = not resolved at this sample size. "
                "The trials were chosen on the sweep's selection split; heldout_* tasks draw on the same held-out "
                "pool, so they get scores above but no paired claims (the sweep's confirmation split makes those).",
                ""]
        note += [f"- {r[k]}" for r in paired for k in ("sentence vs base", "sentence vs best") if k in r]
        md = files[0]
        md.write_text(md.read_text() + "\n" + files[3].read_text() + "\n".join(note) + "\n")
    fig = plot_comparison(rows, [k for k in keys if k.endswith("/avg") or k.startswith("heldout/")],
                          out_dir / "comparison.png")
    return files + ([fig] if fig else [])


def is_eval_metric(key: str) -> bool:
    return key.split("/")[0] in (*FAMILIES, "heldout")
