"""Sweep reports: trials table (markdown, CSV, HTML) and objective-vs-parameter scatter plots."""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any, Optional


def section_cell(v: Any) -> Any:
    """A search value for a table cell: a section (mapping) as ``method=lora, lora.r=24``."""
    if not isinstance(v, dict):
        return v

    def flat(d, prefix=""):
        for k, x in d.items():
            yield from flat(x, f"{prefix}{k}.") if isinstance(x, dict) else [(f"{prefix}{k}", x)]

    # Tune hands the mapping back with its keys reordered: method and preset first, the rest by name
    first = {"method": 0, "preset": 1}
    items = sorted(flat(v), key=lambda kv: (first.get(kv[0], 2), kv[0]))
    return ", ".join(f"{k}={x}" for k, x in items)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and "." in v:  # MLflow params come back as strings
        try:
            return f"{float(v):.4g}"
        except ValueError:
            pass
    return str(v)


def _cell(r: dict, c: str) -> str:
    """A cell for people: ``x ± se`` when the row has ``<c>_stderr``."""
    se = r.get(f"{c}_stderr")
    if se is None or r.get(c) is None or (isinstance(se, float) and se != se):
        return _fmt(r.get(c))
    return f"{_fmt(r.get(c))} ± {_fmt(se)}"


def write_table(rows: list[dict], cols: list[str], out_dir: Path, stem: str) -> tuple[Path, Path, Path]:
    """``rows`` (in order) as <stem>.md, <stem>.csv and <stem>.html under ``out_dir``. A column
    ``c`` whose rows carry ``c_stderr`` is shown as ``x ± se`` in md/html; the CSV keeps both."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, c) for c in cols) + " |" for r in rows]
    md.write_text("\n".join(lines) + "\n")
    csv_path = out_dir / f"{stem}.csv"
    csv_cols = [x for c in cols for x in ([c, f"{c}_stderr"] if any(f"{c}_stderr" in r for r in rows) else [c])]
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    page = out_dir / f"{stem}.html"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r, c))}</td>" for c in cols) + "</tr>" for r in rows)
    page.write_text(f"<table border=1 cellpadding=4><tr>{head}</tr>{body}</table>\n")
    return md, csv_path, page


PCT_COL = "% params"  # trainable parameters as % of the frozen base (the paper's Tables 2 and 3)
AB_COL = "A/B"  # down / up projection matrices per adapted layer (Table 3)


def adapter_cells(params: dict) -> dict:
    """The two adapter columns from a run's logged params (``adapter.trainable_pct``,
    ``adapter.ab_matrices``); empty for runs that did not log them (the base model, older runs)."""
    out = {}
    if params.get("adapter.trainable_pct") is not None:
        out[PCT_COL] = f"{float(params['adapter.trainable_pct']):.3g}"
    if params.get("adapter.ab_matrices") is not None:
        out[AB_COL] = params["adapter.ab_matrices"]
    return out


DELTA_COL = "Δ vs best (95% CI)"
BASE_COL = "Δ vs base (95% CI)"


def trials_table(rows: list[dict], params: list[str], metric: str, out_dir: Path,
                 mode: str = "max", confirm: Optional[str] = None, note: str = "") -> tuple[Path, Path, Path]:
    """Trials best first by the selection split's objective ``metric`` (what ranked them), each as
    ``x ± se``; where the trials have one, their score on the confirmation split (``confirm``)
    and the paired difference to the best trial (and to the base model, when it was scored) with
    its interval and whether it is resolved; ``note`` (what the Δ columns measure) under the
    markdown table."""
    cols = ["trial_id", "status", "steps", metric]
    if confirm and any(r.get(confirm) is not None for r in rows):
        cols.append(confirm)
    if any(r.get(DELTA_COL) for r in rows):
        cols += [DELTA_COL, "resolved"]
    if any(r.get(BASE_COL) for r in rows):
        cols += [BASE_COL, "vs base resolved"]
    cols += [c for c in (PCT_COL, AB_COL) if any(r.get(c) is not None for r in rows)]
    cols += [*params, "mlflow_run"]
    sign = -1.0 if mode == "max" else 1.0  # ties in trial-id order, as the sweep picks its best
    ordered = sorted(rows, key=lambda r: (r[metric] is None, sign * (r[metric] or 0), str(r["trial_id"])))
    files = write_table(ordered, cols, out_dir, "trials")
    if note:
        files[0].write_text(files[0].read_text() + "\n" + note + "\n")
    return files


EVAL_SECTION = "\n\n## Eval stage\n"


def run_link(experiment_id: str, run_id: str) -> str:
    """A link to a run, relative to the MLflow UI that shows the description holding it."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def sweep_description(name: str, metric: str, best: Optional[dict], params: list[str], sentences: list[str],
                      trials_md: str, experiment_id: str, rows: list[dict], confirm: Optional[str] = None) -> str:
    """The sweep's parent-run description (markdown): the best configuration with its objective ± se
    on the selection split (which chose it) and on the confirmation split (which measures it), the
    paired verdicts, the trials table and links to every trial's run."""
    lines = [f"# Sweep {name}", ""]
    if best:
        on_confirm = f"; on the confirmation split {confirm} = {_cell(best, confirm)}" \
            if confirm and best.get(confirm) is not None else ""
        lines.append(f"**Best trial** [{best['trial_id']}]({run_link(experiment_id, best['mlflow_run'])}): "
                     f"{metric} = {_cell(best, metric)} on the selection split{on_confirm}; "
                     + ", ".join(f"`{p}` = {_fmt(best.get(p))}" for p in params))
    else:
        lines.append("No trial finished with an objective.")
    lines += ["", *[f"- {s}" for s in sentences if s], "", "## Trials", "", trials_md.strip(), "",
              "Trial runs: " + ", ".join(f"[{r['trial_id']}]({run_link(experiment_id, r['mlflow_run'])})"
                                         for r in rows if r.get("mlflow_run"))]
    return "\n".join(lines)


def with_eval_section(description: str, eval_md: str) -> str:
    """The description with its eval-stage section (replaced when the stage runs again)."""
    return description.split(EVAL_SECTION)[0] + EVAL_SECTION + "\n" + eval_md.strip()


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here, nor on Ray workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_objective_vs_params(rows: list[dict], params: list[str], metric: str, path: Path) -> Optional[Path]:
    plt = pyplot()

    pts = [r for r in rows if r.get(metric) is not None]
    if not pts or not params:
        return None
    fig, axes = plt.subplots(1, len(params), figsize=(3.4 * len(params), 3.0), squeeze=False)
    colors = {"DONE": "C0", "STOPPED": "C1", "ERROR": "C3"}
    for ax, p in zip(axes[0], params):
        xs = [r.get(p) for r in pts]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:
            cats = sorted({str(x) for x in xs})
            xs = [cats.index(str(x)) for x in xs]
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
        elif min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.scatter(xs, [r[metric] for r in pts], c=[colors.get(r["status"], "C7") for r in pts], s=22)
        ax.set_xlabel(p)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle("objective vs hyper-parameters (blue: done, orange: stopped by ASHA)", fontsize=9)
    return save_figure(fig, path)
