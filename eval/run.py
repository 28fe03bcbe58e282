"""``python -m eval.run --adapter <dir | MLflow run id | models:/name/version | none> --tasks bbh,mmlu``
``python -m eval.run --sweep <parent run id>``

Scores the base model, or base + an R-LoRA adapter, with lm-eval's ``simple_evaluate`` over
``HFLM(pretrained=<loaded model>)``. Offline (the default, ``--task-source local``) the stock
names (bbh, bbh_fewshot, bbh_zeroshot, mmlu, mmlu_continuation) map to this project's tasks in
``eval/tasks`` (data from the data directory and the installed wheels), plus the training
mixtures' held-out splits (heldout_<task|mixture>); ``--task-source stock`` passes names
straight to lm-eval for machines with the hub. Scores are printed, written as JSON and, with
``--mlflow-run`` (or an adapter given as a run id), logged to that run as ``<family>/<subtask>``
and ``<family>/avg``. ``--sweep`` runs the eval stage of a finished sweep (see eval/stage.py).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import re
import sys
from pathlib import Path
from typing import Optional

from eval.harness import EvalJob, EvalSettings, Evaluator
from eval.record import headline, log_results
from eval.stage import EvalStage, EvalStageError
from eval.task_names import EvalInputError, resolve_tasks
from pipeline.config.cli import fail, user_errors
from pipeline.config.loading import ConfigError, format_validation_error
from pipeline.model.adapters import FULL_WEIGHTS
from pipeline.tracking import check_reachable, resolve_tracking_uri


def load_adapter_dir(adapter: str, tracking_uri: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(local adapter dir or None, MLflow run id or None)."""
    if adapter == "none":
        return None, None
    if Path(adapter).is_dir():
        if not any((Path(adapter) / f).is_file() for f in ("adapter_config.json", FULL_WEIGHTS)):
            raise EvalInputError(f"--adapter: {adapter} has no adapter_config.json (nor a full model's {FULL_WEIGHTS})")
        return adapter, None
    if re.fullmatch(r"[0-9a-f]{32}", adapter):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        local = mlflow.artifacts.download_artifacts(run_id=adapter, artifact_path="adapter")
        return local, adapter
    if adapter.startswith("models:/"):
        import mlflow

        if tracking_uri:  # the registry lives in the tracking store (else MLflow falls back to ./mlflow.db)
            mlflow.set_registry_uri(tracking_uri)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=adapter, tracking_uri=tracking_uri)
        except Exception as e:
            raise EvalInputError(f"--adapter: {adapter} not found in the registry of {tracking_uri} "
                                 f"({str(e).splitlines()[0][:200]})") from None
        return local, None
    raise EvalInputError(f"--adapter: {adapter!r} is neither a directory, an MLflow run id, "
                         "models:/<name>/<version>, nor 'none'")


def _print_scores(scores: dict[str, float]) -> None:
    for k, v in headline(scores).items():
        if not k.endswith("_stderr"):
            se = scores.get(f"{k}_stderr")
            print(f"{k:32s} {v:.4f}" + (f" ± {se:.4f}" if se is not None else ""))


def run_sweep_stage(args, tracking_uri: str) -> int:
    """``--sweep <parent run id>``: the eval stage of a finished sweep, with its YAML's eval
    settings unless overridden on the command line."""
    import mlflow

    from pipeline.config.sweep import SweepConfig  # lazy: loads peft, torch

    try:
        path = mlflow.artifacts.download_artifacts(run_id=args.sweep, artifact_path="sweep_config.json",
                                                   tracking_uri=tracking_uri)
    except Exception as e:
        raise EvalInputError(f"--sweep: {args.sweep} is not a sweep parent run in {tracking_uri} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    data = json.loads(Path(path).read_text())
    for key, value in (("top_k", args.top_k), ("limit", args.limit), ("num_fewshot", args.num_fewshot),
                       ("gen_kwargs", args.gen_kwargs), ("task_source", args.task_source)):
        if value is not None:
            data.setdefault("eval", {})[key] = value
    if args.tasks:
        data.setdefault("eval", {})["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from pydantic import ValidationError

    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    out_dir = args.out or Path("outputs") / "eval" / f"sweep-{args.sweep}"
    try:
        # scored on this machine's devices (a GPU if it has one), whatever the sweep trained on
        out = replace(EvalStage.for_sweep(cfg, args.sweep, tracking_uri, Path(out_dir)), use_gpu=None).run()
    except EvalStageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((Path(out_dir) / "comparison.md").read_text().rstrip())
    print(f"evaluated {out['evaluated'] or 'nothing new'}; already scored with these settings: {out['cached'] or 'none'}; "
          f"registered model '{out['registry']}' versions {out['versions']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="adapter directory, MLflow run id, models:/<name>/<version>, or 'none' (base)")
    which.add_argument("--sweep", metavar="PARENT_RUN_ID", help="run (or re-run) the eval stage of a finished sweep")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated: bbh, bbh_fewshot, bbh_zeroshot, mmlu, mmlu_continuation, "
                         "heldout_<task|mixture> (default bbh,mmlu; with --sweep, the sweep YAML's)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=float, default=None, help="examples per subtask (or a fraction)")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--gen-kwargs", default=None, help="lm-eval generation override, e.g. max_gen_toks=256")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=None, help="with --sweep: how many of the best trials")
    ap.add_argument("--task-source", choices=["local", "stock"], default=None,
                    help="local (default): offline tasks in eval/tasks; stock: lm-eval's own (needs the hub)")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--mlflow-run", default=None, help="log the scores to this MLflow run")
    ap.add_argument("--out", type=Path, default=None, help="output (default outputs/eval/...)")
    args = ap.parse_args(argv)

    try:
        tracking_uri = resolve_tracking_uri(args.tracking_uri)
        check_reachable(tracking_uri)
        if args.sweep:
            return run_sweep_stage(args, tracking_uri)
        tasks = resolve_tasks([t.strip() for t in (args.tasks or "bbh,mmlu").split(",") if t.strip()],
                              args.task_source or "local")
        adapter_dir, run_from_adapter = load_adapter_dir(args.adapter, tracking_uri)
    except (EvalInputError, *user_errors()) as e:
        return fail(e)

    settings = EvalSettings(model=args.model, tasks=tuple(tasks), limit=args.limit, num_fewshot=args.num_fewshot,
                            batch_size=args.batch_size, gen_kwargs=args.gen_kwargs)
    res = Evaluator(settings).evaluate(EvalJob(args.adapter, adapter_dir))
    if res["error"]:
        print(res.get("traceback", ""), file=sys.stderr)
        print(f"error: {res['error']}", file=sys.stderr)
        return 1
    scores = res["scores"]
    _print_scores(scores)
    print(f"({len(scores)} scores, {res['wall_s']:.0f}s)")
    out = args.out or Path("outputs") / "eval" / f"{Path(args.adapter).name or 'adapter'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"adapter": args.adapter, "tasks": tasks, "settings": settings.__dict__,
                               "signature": settings.signature(), "scores": scores, "n_samples": res["n_samples"],
                               "wall_s": res["wall_s"]}, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    run_id = args.mlflow_run or run_from_adapter
    if run_id:  # scores, standard errors and the per-question table, as the eval stage logs them
        from mlflow import MlflowClient

        log_results([{**res, "run_id": run_id}], settings, tracking_uri, MlflowClient(tracking_uri))
        print(f"logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
