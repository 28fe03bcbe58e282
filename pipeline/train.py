"""``python -m pipeline.train <run.yaml> [--set key=value ...]``: one R-LoRA fine-tuning run on
Ray Train (TorchTrainer, DDP; gloo on CPU, nccl on GPU), tracked in MLflow.

Flow: validate the YAML (exit 2 with one line on any problem, before Ray starts) -> resolve
the model (converting the embedded GGUF once) -> create the MLflow run and log the resolved
config -> TorchTrainer: every worker builds the same mixture, rank r trains on its shard of
length-aware batches; rank 0 logs step metrics to MLflow, evaluates per-task held-out
accuracy at eval intervals and writes checkpoints (adapter + optimizer + scheduler + step)
through ``ray.train.report``. After a worker dies, Ray restarts the group (FailureConfig) and
training resumes from the last checkpoint with the step count continuing. The driver then
logs the final adapter and figures (head-similarity heatmap and t-SNE, loss/grad-norm curves).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.config import RunConfig, load_run_config

KILL_ENV = "RLORA_TEST_KILL_RANK_AT_STEP"  # "rank:step": SIGKILL that worker once (failure tests)
TRAINER_STATE = "trainer_state.pt"


# ----------------------------------------------------------------------------------- worker side
def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def score_held_out(model, tok, examples, max_length: int, rank: int = 0, world: int = 1) -> list[dict]:
    """Per-example outcomes of the multiple-choice held-out examples, scored in shards over the
    ``world`` DDP ranks (rank r takes examples r, r+W, ...) and gathered in input order on every rank."""
    from pipeline.scoring import score_choices

    rows = score_choices(model, tok, examples[rank::world], max_length)
    if world == 1:
        return rows
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, rows)
    out: list = [None] * len(examples)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def evaluate(model, tok, held_out, max_length: int, rank: int = 0, world: int = 1):
    """(metrics, per-example table or None). Every rank must call it (the scoring is sharded);
    metrics are per-task accuracy, margin and gold log-prob with standard errors, their macro
    means (``eval/mean_acc`` ...), answer NLL of generative tasks and head similarity."""
    import pandas as pd

    from pipeline.batching import is_choice_task
    from pipeline.scoring import answer_nll_by_task
    from pipeline.stats import EXAMPLE_COLUMNS, score_metrics
    from rlora.analysis import head_similarity, similarity_summary

    choice = [e for e in held_out if is_choice_task(e.task)]
    gen = [e for e in held_out if not is_choice_task(e.task)]
    out: dict[str, float] = {}
    table = None
    if choice:
        rows = score_held_out(model, tok, choice, max_length, rank, world)
        table = pd.DataFrame([{c: r[c] for c in EXAMPLE_COLUMNS} for r in rows], columns=list(EXAMPLE_COLUMNS))
        out.update(score_metrics(table, prefix="eval"))
    if gen and rank == 0:
        for t, (nll, se) in answer_nll_by_task(model, tok, gen, max_length).items():
            out.update({f"eval/{t}/answer_nll": nll, f"eval/{t}/answer_nll_stderr": se})
    if rank == 0:
        sims = head_similarity(model)
        if sims:
            out.update(similarity_summary(sims))
    return out, table


def evaluate_confirmation(model, tok, data, rank: int = 0, world: int = 1, examples=None):
    """(``confirm/...`` metrics, per-example table) on the run's confirmation split
    (``pipeline.batching.confirmation_examples``), or ({}, None) where it has none. Scored once, at
    the end of training: nothing that trains, stops or ranks a trial ever sees these scores."""
    import pandas as pd

    from pipeline.batching import confirmation_examples
    from pipeline.stats import EXAMPLE_COLUMNS, score_metrics

    examples = confirmation_examples(data) if examples is None else examples  # (built once by a caller that has them)
    if not examples:
        return {}, None
    rows = score_held_out(model, tok, examples, data.max_length, rank, world)
    table = pd.DataFrame([{c: r[c] for c in EXAMPLE_COLUMNS} for r in rows], columns=list(EXAMPLE_COLUMNS))
    return score_metrics(table, prefix="confirm"), table


def log_examples(tracker, table, step: int, kind: str = "heldout") -> None:
    if tracker is None or table is None:
        return
    from pipeline.stats import examples_file, save_examples
    from pipeline.tracking import EXAMPLES_DIR

    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(save_examples(table, Path(tmp) / examples_file(kind, step)), EXAMPLES_DIR)


def log_mixture(tracker, cfg: RunConfig, mix) -> None:
    """The run's training and held-out examples as MLflow dataset inputs: named after the mixture,
    identified by a hash of their content, sourced from the data directory, counted per task."""
    import hashlib
    from collections import Counter

    from pipeline.data import content_key, data_dir

    name = cfg.data.tasks if isinstance(cfg.data.tasks, str) else "+".join(cfg.data.tasks)
    source = str(data_dir(cfg.data.data_dir).resolve())
    for split, examples, context in (("train", mix.train, "training"), ("held-out", mix.held_out, "evaluation")):
        digest = hashlib.sha256("\n".join(sorted(content_key(e) for e in examples)).encode()).hexdigest()[:16]
        tracker.log_dataset(f"{name}/{split}", digest, source, len(examples),
                            {"per_task": dict(sorted(Counter(e.task for e in examples).items())),
                             "max_length": cfg.data.max_length, "seed": cfg.data.seed}, context)


def adapter_model(tracker, name: str, cfg: RunConfig) -> str:
    """The run's adapter as an MLflow logged model: its held-out evaluations are linked to it as they
    are logged, its files uploaded when training ends (``Tracker.finish_model``)."""
    if cfg.adapter.uses_rlora:
        params = {"preset": cfg.adapter.tuner_preset, "num_heads": cfg.adapter.num_heads, "r": cfg.adapter.r,
                  "alpha": cfg.adapter.alpha, "gamma": cfg.adapter.gamma, "head_dropout": cfg.adapter.head_dropout}
    else:
        params = {"method": cfg.adapter.method, **getattr(cfg.adapter, cfg.adapter.method, {})}
    return tracker.create_model(name, {**params, "base_model": cfg.model},
                                tags={"rlora.load": "pipeline.adapters.load(base, <downloaded dir>)"})


def _save_checkpoint(model, opt, sched, step: int, directory: Path, final: bool) -> None:
    import torch

    from pipeline import adapters

    model.save_pretrained(directory / "adapter")
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                **adapters.training_state(model)}, directory / TRAINER_STATE)
    if final:
        from rlora.analysis import head_similarity, plot_head_similarity, plot_head_tsne

        sims = head_similarity(model)
        if sims:
            plot_head_similarity(sims, directory / "figures" / "head_similarity.png")
            try:
                plot_head_tsne(model, directory / "figures" / "head_tsne.png")
            except ValueError:
                pass  # too few heads of one type for a t-SNE


def error_line(e: BaseException) -> str:
    """One line for a run's ``error`` tag: the exception's first line, and for Ray Train's
    WorkerGroupError (whose first line only says that workers failed) the lowest failed rank's own."""
    def first(x: BaseException) -> str:
        text = str(x).strip()
        return f"{type(x).__name__}: {text.splitlines()[0] if text else ''}"

    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        cause = failures[rank]
        cause = getattr(cause, "cause", None) or cause  # a RayTaskError's original exception
        return f"{type(e).__name__} (rank {rank}): {first(cause)}"[:500]
    return first(e)[:500]


class CheckpointError(RuntimeError):
    pass


def restore_checkpoint(model, opt, sched, directory: Path, device="cpu") -> int:
    """A checkpoint ``_save_checkpoint`` wrote, back into a freshly built run: the trained weights,
    the optimizer's and scheduler's state; the step it was written at."""
    from pipeline import adapters

    state = load_trainer_state(Path(directory) / TRAINER_STATE, device)
    adapters.restore(model, Path(directory) / "adapter", state)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"])


def load_trainer_state(path: Path, device="cpu") -> dict:
    """Optimizer/scheduler state and step, loaded with ``weights_only=True``: a checkpoint on shared
    storage that carries a pickled object is refused, never executed."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to load trainer state that is not plain tensors and "
                              f"containers ({str(e).splitlines()[0][:200]})") from None


def _process_start() -> float:
    """When this process started (epoch seconds): the worker's spawn, before its imports."""
    try:
        import psutil

        return psutil.Process().create_time()
    except ImportError:  # Linux without psutil: /proc
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one training step on one rank (its dropout masks). Drawn afresh every step,
    so a run resumed from a checkpoint draws exactly the masks the uninterrupted run drew, and
    ranks draw independent masks."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % 2**63


def _maybe_kill(rank: int, step: int, resumed: bool) -> None:
    spec = os.environ.get(KILL_ENV)
    if spec and not resumed:
        r, s = (int(x) for x in spec.split(":"))
        if r == rank and s == step:
            os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(loop_config: dict[str, Any], session=None) -> None:
    """One Ray Train worker's training; with ``session`` (a ``pipeline.in_trial.InProcess``) the
    whole run in the calling process, reporting and checkpointing through it."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pipeline import adapters
    from pipeline.batching import LengthAwareBatches
    from pipeline.mixture_cache import tokenised_mixture
    from pipeline.models import load_model
    from pipeline.precision import autocast, load_dtype
    from pipeline.step import accumulate_gradients, enable_gradient_checkpointing, peak_memory_gb, reset_peak_memory
    from pipeline.tracking import Tracker

    t_enter = time.perf_counter()
    # in a trial's own process (an actor Tune may have reused) there is no worker start-up to count
    stamps = {"time/at/worker_process": time.time() if session else _process_start(), "time/at/enter": time.time()}
    cfg = RunConfig.model_validate(loop_config["run"])
    if session:
        rank, world = session.rank, session.world
    else:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    # Ray assigns GPUs (CUDA_VISIBLE_DEVICES) whether or not this torch can use them: without CUDA
    # the worker computes on the CPU (a cluster that declares logical GPUs, as the tests do)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", 0) if session else ray.train.torch.get_device()

    def report(metrics: dict[str, Any], ckpt: Optional[Path] = None, step: Optional[int] = None) -> None:
        if session:
            session.report(metrics, ckpt, step)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)) if ckpt else None,
                             checkpoint_dir_name=f"step-{step:06d}" if ckpt else None)
    precision, accum = cfg.train.precision, cfg.train.grad_accum
    if session:  # the trial's process may have trained other runs: this run's peak only
        reset_peak_memory(device)
    peak = 0.0  # the peak so far (the kernel's high-water mark can read a few pages lower later)

    base, tok = load_model(loop_config["model_path"], dtype=load_dtype(precision))
    stamps["time/at/model"] = time.time()
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    torch.manual_seed(cfg.train.seed)  # same init on every rank; DDP also broadcasts rank 0's
    model = adapters.build(base, cfg.adapter, cfg.train.steps).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.train.warmup_steps, cfg.train.steps))

    start = 0
    if session:
        found = session.get_checkpoint()
        if found:
            start = restore_checkpoint(model, opt, sched, found, device)
            if start == cfg.train.steps:  # the run had finished (its trial runs again): report it again
                session.finished_report(found)
                return
    else:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                start = restore_checkpoint(model, opt, sched, Path(d), device)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    stamps["time/at/adapter"] = time.time()

    mix, encoded, cached = tokenised_mixture(cfg.data, tok, loop_config["model_path"])
    stream = LengthAwareBatches(encoded, cfg.train.batch_size, tok.pad_token_id, seed=cfg.train.seed)
    batches = stream.for_rank(rank, world, skip_steps=start * accum)
    stamps["time/at/data"] = time.time()

    tracker = Tracker(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    if tracker and start == 0:
        log_mixture(tracker, cfg, mix)
        tracker.log_params({**{f"adapter.{k}": v for k, v in adapters.trainable(model).items()},
                            "adapter.ab_matrices": adapters.ab_matrices(model) or "–"})
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:  # where the workers landed (placement strategy), recorded on the run
        import torch.distributed as dist

        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if tracker:
        tracker.set_tags({"ray.worker_node_ids": ",".join(nodes), "ray.num_nodes": str(len(set(nodes))),
                          "ray.gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
                          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                          "device": str(device), "rlora.mixture": "cached" if cached else "built"})
    if tracker and start:
        tracker.log_metrics({"resumed_from_step": start}, step=start)
    stamps["time/at/tracking"] = time.time()
    if start == 0 and cfg.train.eval_at_start:
        with autocast(precision, device):
            evals, table = evaluate(model, tok, mix.held_out, cfg.data.max_length, rank, world)
        if tracker:
            tracker.log_metrics(evals, step=0, model_id=loop_config.get("model_id"))
            log_examples(tracker, table, 0)
    t_last = t_loop = time.perf_counter()
    stamps["time/at/loop"] = time.time()
    timing = {"time/setup_s": t_loop - t_enter, **loop_config.get("driver_stamps", {}), **stamps}
    for step in range(start + 1, cfg.train.steps + 1):
        torch.manual_seed(step_seed(cfg.train.seed, step, rank))
        ddp_model.train()
        loss, tokens = accumulate_gradients(ddp_model, [next(batches) for _ in range(accum)], device, precision,
                                            sync_each=world == 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        adapters.after_optimizer_step(model, step)  # AdaLoRA's budget allocation, from this step's gradients
        sched.step()
        opt.zero_grad(set_to_none=True)
        stats = torch.tensor([loss, tokens], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
            stats[0] /= world
        if not math.isfinite(stats[0].item()):
            # Every rank sees the same all-reduced loss, so all stop here together. Reporting (not
            # raising) keeps Ray Train from retrying a deterministic divergence; the driver fails the run.
            if tracker:
                tracker.set_tags({"nan_loss_step": step})
            report({"step": step, "nan_loss": 1.0, **loop_config.get("nan_metrics", {})})
            return
        now = time.perf_counter()
        if tracker:
            tracker.log_metrics({"train/loss": stats[0].item(), "train/lr": sched.get_last_lr()[0],
                                 "train/grad_norm": float(grad_norm), "train/tokens_per_s": stats[1].item() / (now - t_last)},
                                step=step)
        t_last = now
        _maybe_kill(rank, step, resumed=start > 0)

        final = step == cfg.train.steps
        do_eval = final or step % cfg.train.eval_every == 0
        do_ckpt = final or step % cfg.train.checkpoint_every == 0
        if not (do_eval or do_ckpt):
            continue
        metrics: dict[str, float] = {"step": step, "train/loss": stats[0].item(), **timing}
        if do_eval:  # every rank scores its shard
            with autocast(precision, device):
                evals, table = evaluate(model, tok, mix.held_out, cfg.data.max_length, rank, world)
            if rank == 0:
                metrics.update(evals)
                metrics["time/loop_s"] = time.perf_counter() - t_loop
                tracker.log_metrics(evals, step=step, model_id=loop_config.get("model_id"))
                peak = max(peak, peak_memory_gb(device))
                tracker.log_metrics({"train/peak_mem_gb": peak}, step=step)
                log_examples(tracker, table, step)
            if final:  # the confirmation split: logged on the run, never reported to Tune
                with autocast(precision, device):
                    confirm, ctable = evaluate_confirmation(model, tok, cfg.data, rank, world)
                if tracker and ctable is not None:
                    tracker.log_metrics(confirm, step=step, model_id=loop_config.get("model_id"))
                    log_examples(tracker, ctable, step, "confirm")
                if rank == 0:  # scoring is the loop's work, not start-up or idle time
                    metrics["time/loop_s"] = time.perf_counter() - t_loop
        metrics.setdefault("time/loop_s", time.perf_counter() - t_loop)
        metrics["time/at/report"] = time.time()
        if rank == 0 and do_ckpt:
            with tempfile.TemporaryDirectory() as tmp:
                _save_checkpoint(model, opt, sched, step, Path(tmp), final)
                report(metrics, Path(tmp), step)
        else:
            report(metrics)
        t_last = time.perf_counter()  # eval/checkpoint time is not training throughput


# ----------------------------------------------------------------------------------- driver side
def ensure_ray(quiet: bool = False, worker_env: Optional[dict[str, str]] = None,
               resources: Optional[dict[str, float]] = None) -> None:
    """Connect to RAY_ADDRESS if set, else start a local single-node Ray (dashboard bound to
    127.0.0.1). The dashboard stays on: Ray Train's placement-group cleaner queries the state
    API it serves. ``worker_env``: extra environment variables for every worker process;
    ``resources``: what a local Ray declares (``num_cpus``, ``num_gpus``), default the machine's."""
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("RLORA_", "HF_")) or k == "PYTHONPATH"}
    env.update(worker_env or {})
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a Ray Job's driver: the job's runtime_env
        # (working_dir, env_vars) already reaches every worker
        ray.init(log_to_driver=not quiet, **({"runtime_env": {"env_vars": worker_env}} if worker_env else {}))
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=not quiet, runtime_env={"env_vars": env})
        return
    _start_local_ray(env, quiet, resources=resources)


def _start_local_ray(env: dict[str, str], quiet: bool, attempts: int = 3,
                     resources: Optional[dict[str, float]] = None) -> None:
    """Start a single-node Ray on 127.0.0.1 whose workers know its address (RAY_ADDRESS).

    Ray's state API, which Ray Train's placement-group cleaner calls from inside the cluster,
    finds "the" local cluster by scanning processes when RAY_ADDRESS is unset: with a second Ray
    instance on the machine (a notebook, a test suite) it fails, the cleaner dies and a sweep with
    ASHA waits forever for resources its stopped trials still hold. So the GCS port is chosen here
    (retried if another process takes it first) and passed to every worker."""
    import ray

    from pipeline.loopback import free_port

    for attempt in range(attempts):
        port = free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the head node ray.init starts
        try:
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                     log_to_driver=not quiet, **(resources or {}),
                     runtime_env={"env_vars": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}})
            return
        except Exception:
            if ray.is_initialized() or attempt == attempts - 1:
                raise
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def use_gpu_for(setting) -> bool:
    if setting == "auto":
        import torch

        return torch.cuda.is_available()
    return bool(setting)


def worker_resources(scaling, use_gpu: bool) -> dict[str, float]:
    """One Train worker's Ray resources: its CPUs, and its (possibly fractional) GPU share."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if use_gpu else {})}


def torch_backend(scaling, use_gpu: bool) -> str:
    """``scaling.backend``; auto: nccl for GPU workers when this torch is a CUDA build (the driver may
    run on a node without GPUs), gloo otherwise (also for GPUs declared to Ray on a CPU-only build)."""
    if scaling.backend != "auto":
        return scaling.backend
    import torch

    return "nccl" if use_gpu and torch.backends.cuda.is_built() else "gloo"


def run_training(cfg: RunConfig, config_path: Optional[str] = None, parent_run_id: Optional[str] = None,
                 quiet: bool = False, trial_id: Optional[str] = None, callbacks: Optional[list] = None,
                 train_name: Optional[str] = None, storage_path: Optional[str] = None,
                 nan_metrics: Optional[dict[str, float]] = None, extra_tags: Optional[dict[str, str]] = None,
                 in_trial: bool = False, started_at: Optional[float] = None) -> dict[str, Any]:
    """Train one run; returns {'run_id', 'metrics', 'adapter_dir', 'result_dir', 'wall_s'}.

    Raises on failure (``FloatingPointError`` when the loss diverged). Inside a sweep trial,
    ``trial_id`` makes the MLflow child run unique per trial: a trial restarted after the
    driver died logs into its existing run instead of creating a second one. ``in_trial`` (the sweep's
    ``tune.train_in_trial``): one worker, run in this process (``pipeline.in_trial``), its checkpoints
    under the run's storage directory and its reports to Tune in place of ``callbacks``. ``started_at``
    (epoch seconds): when the caller started on this run, the start of its ``driver`` phase."""
    t_start = started_at or time.time()
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline import adapters, timeline
    from pipeline.models import resolve_model
    from pipeline.tracking import Tracker, check_reachable, resolve_tracking_uri

    out_dir = Path(cfg.output_dir).resolve()
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_reachable(tracking_uri)
    model_path = resolve_model(cfg.model)
    use_gpu = use_gpu_for(cfg.scaling.use_gpu)

    tracker = Tracker(tracking_uri)
    run_name = cfg.mlflow.run_name or cfg.adapter.label
    backend = torch_backend(cfg.scaling, use_gpu)
    params = {**cfg.model_dump(mode="json"), "resolved": {
        "model_path": model_path, "use_gpu": use_gpu, "backend": backend,
        "rlora" if cfg.adapter.uses_rlora else "peft" if cfg.adapter.uses_peft else "full":
            adapters.resolved(cfg.adapter, cfg.train.steps),
        "effective_batch_size": cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.num_workers}}
    # the process driving the run (in a sweep: the trial's actor, reused by later trials)
    tags = {"config_file": config_path or "", "ray.driver_pid": str(os.getpid()), **cfg.adapter.tags,
            **(extra_tags or {})}
    existing = tracker.find_trial_run(cfg.mlflow.experiment, trial_id, parent_run_id) if trial_id else None
    if existing:
        run_id = tracker.reopen(existing)
        tracker.set_tags({"ray.driver_pid": tags["ray.driver_pid"]})
    else:
        if trial_id:
            tags["rlora.trial_id"] = trial_id
        run_id = tracker.start_run(cfg.mlflow.experiment, run_name, params, tags=tags, parent_run_id=parent_run_id)
    model_id = adapter_model(tracker, run_name, cfg)
    if not quiet:
        print(f"MLflow run {run_id} ({tracking_uri})", flush=True)

    ensure_ray(quiet)
    name, storage = train_name or f"train-{run_id}", storage_path or cfg.storage or str(out_dir / "ray")
    t0 = time.time()  # the driver's stamps travel in every report, so a trial ASHA stops keeps its phases
    loop_config = {"run": cfg.model_dump(mode="json"), "model_path": model_path, "model_id": model_id,
                   "tracking_uri": tracking_uri, "run_id": run_id, "nan_metrics": nan_metrics or {},
                   "driver_stamps": {f"{timeline.PREFIX}start": t_start, f"{timeline.PREFIX}fit": t0}}
    trainer = None if in_trial else TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=worker_resources(cfg.scaling, use_gpu),
                                               placement_strategy=cfg.scaling.placement_strategy),
        torch_config=TorchConfig(backend=backend),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        if in_trial:
            result_metrics, checkpoint = _run_in_trial(cfg, loop_config, storage, name, callbacks)
        else:
            result = trainer.fit()
            result_metrics, checkpoint = result.metrics, result.checkpoint
    except BaseException as e:
        tracker.set_tags({"error": error_line(e)})
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if not isinstance(e, KeyboardInterrupt):  # interrupted: --resume continues with this model
            tracker.client.finalize_logged_model(model_id, "FAILED")
        raise
    return _finish_run(cfg, tracker, run_id, model_id, run_name, t_start, t0, result_metrics or {}, checkpoint)


def _run_in_trial(cfg: RunConfig, loop_config: dict, storage: str, name: str, callbacks) -> tuple:
    import ray.train

    from pipeline.in_trial import InProcess

    if cfg.scaling.num_workers != 1 or "://" in storage.removeprefix("file://"):
        raise ValueError("in_trial: one worker, and checkpoints on a local path")
    session = InProcess(Path(storage.removeprefix("file://")) / name, cfg.train.steps if callbacks else None)
    train_loop_per_worker(loop_config, session)
    return session.metrics, ray.train.Checkpoint.from_directory(str(session.checkpoint)) if session.checkpoint else None


def _finish_run(cfg: RunConfig, tracker, run_id: str, model_id: str, run_name: str, t_start: float, t0: float,
                result_metrics: dict, checkpoint) -> dict[str, Any]:
    """After training: the failure checks, the adapter and figures logged, the run FINISHED."""
    from pipeline import timeline
    from pipeline.tracking import plot_curves

    out_dir = Path(cfg.output_dir).resolve()
    t_fit_end = time.time()
    wall = t_fit_end - t0
    nan_step = tracker.client.get_run(run_id).data.tags.get("nan_loss_step")  # set by rank 0
    failure = None
    if nan_step is not None:
        failure = FloatingPointError(f"loss went NaN/inf at step {nan_step}")
    elif checkpoint is None:
        failure = RuntimeError("training ended without a checkpoint")
    if failure is not None:
        tracker.set_tags({"error": str(failure)})
        tracker.finish("FAILED")
        tracker.client.finalize_logged_model(model_id, "FAILED")
        raise type(failure)(f"run {run_id}: {failure}")
    final_dir = out_dir / "runs" / run_id
    with checkpoint.as_directory() as d:
        import shutil

        shutil.copytree(d, final_dir, dirs_exist_ok=True)
    tracker.log_artifacts(final_dir / "adapter", "adapter")
    tracker.finish_model(model_id, final_dir / "adapter", cfg.train.steps)
    if (final_dir / "figures").is_dir():
        tracker.log_artifacts(final_dir / "figures", "figures")
    curves = plot_curves(tracker, ["train/loss", "train/grad_norm", "train/lr"], final_dir / "figures" / "curves.png",
                         title=run_name)
    if curves:
        tracker.log_artifact(curves, "figures")
    metrics = {k: v for k, v in result_metrics.items() if isinstance(v, (int, float))}
    metrics.update(timeline.metrics({**metrics, "start": t_start, "fit": t0, "fit_end": t_fit_end, "done": time.time()}))
    tracker.log_metrics({"train/wall_s": wall, **{k: v for k, v in metrics.items() if k.startswith("time/")
                                                  and not k.startswith(timeline.PREFIX)}}, step=cfg.train.steps)
    tracker.finish("FINISHED")
    (final_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return {"run_id": run_id, "metrics": metrics, "adapter_dir": str(final_dir / "adapter"),
            "result_dir": str(final_dir), "wall_s": wall}


def main(argv=None) -> int:
    from pipeline.cli import base_parser, fail, user_errors

    args = base_parser("python -m pipeline.train", __doc__, "run YAML (see configs/)", "train.steps=20").parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        out = run_training(cfg, args.config)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        return fail(e)
    m = out["metrics"]
    accs = {k.split("/")[1]: v for k, v in m.items() if k.startswith("eval/") and k.endswith("/acc")}
    print(f"\nrun {out['run_id']} finished in {out['wall_s']:.0f}s; adapter: {out['adapter_dir']}")
    if accs:
        print("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items())
              + f" | mean {m.get('eval/mean_acc', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
