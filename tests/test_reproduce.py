"""python -m eval.reproduce end to end on a tiny model: the five arms, one report."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_writes_table4_head_cosine_and_grad_norms(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    cfg = yaml.safe_load((ROOT / "sweeps" / "ablation.yaml").read_text())
    cfg["base"].update({
        "model": str(tiny_model_dir),
        "data": {"tasks": ["sst2", "boolq"], "train_per_task": 48, "eval_per_task": 6, "max_length": 80},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ablation"},
        "output_dir": str(tmp_path / "out"),
    })
    cfg["base"]["train"].update({"steps": 4, "eval_every": 2, "batch_size": 2})
    cfg["search"]["train.seed"] = {"grid": [0]}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "eval.reproduce", str(path), "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    table = (out / "table4.md").read_text().splitlines()
    assert table[0].startswith("| method | seeds | SST-2 | BoolQ* | Avg | head cos |")
    labels = [line.split("|")[1].strip() for line in table[2:]]
    assert labels == ["LoRA", "HydraLoRA", "+ multi-head dropout", "+ multi-head random init", "R-LoRA"]
    assert "– (1 head)" in table[2] and "– (1 head)" not in "".join(table[3:])
    assert "head cosine, R-LoRA | < 0.7 |" in report and "72.69 → 73.59" in report
    assert (out / "head_cosine.png").stat().st_size > 0 and (out / "early_grad_norms.png").stat().st_size > 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ablation")
    parent = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags][0]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "reproduce")}
    assert {"reproduce/report.md", "reproduce/table4.html", "reproduce/head_cosine.png",
            "reproduce/early_grad_norms.png"} <= arts
    # the report can be rebuilt from the finished sweep alone
    again = subprocess.run([sys.executable, "-m", "eval.reproduce", str(path), "--from-sweep", parent.info.run_id,
                            "--out", str(tmp_path / "again")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "table4.md").read_text() == (out / "table4.md").read_text()
