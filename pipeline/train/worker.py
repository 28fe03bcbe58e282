"""The training loop each Ray Train worker runs: set-up, resume, steps, held-out scoring, checkpoints."""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.config.run import RunConfig
from pipeline.data import content_key, data_dir
from pipeline.data.batching import LengthAwareBatches
from pipeline.data.mixture_cache import tokenised_mixture
from pipeline.model import adapters
from pipeline.model.base import load_model
from pipeline.model.precision import autocast, load_dtype
from pipeline.tracking import Tracker
from pipeline.train.checkpoints import restore_checkpoint, save_checkpoint
from pipeline.train.heldout import evaluate, evaluate_confirmation, log_examples
from pipeline.train.step import accumulate_gradients, enable_gradient_checkpointing, peak_memory_gb, reset_peak_memory

KILL_ENV = "RLORA_TEST_KILL_RANK_AT_STEP"  # "rank:step": SIGKILL that worker once (failure tests)


# ----------------------------------------------------------------------------------- worker side
def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def log_mixture(tracker, cfg: RunConfig, mix) -> None:
    """The run's training and held-out examples as MLflow dataset inputs: named after the mixture,
    identified by a hash of their content, sourced from the data directory, counted per task."""
    import hashlib
    from collections import Counter


    name = cfg.data.tasks if isinstance(cfg.data.tasks, str) else "+".join(cfg.data.tasks)
    source = str(data_dir(cfg.data.data_dir).resolve())
    for split, examples, context in (("train", mix.train, "training"), ("held-out", mix.held_out, "evaluation")):
        digest = hashlib.sha256("\n".join(sorted(content_key(e) for e in examples)).encode()).hexdigest()[:16]
        tracker.log_dataset(f"{name}/{split}", digest, source, len(examples),
                            {"per_task": dict(sorted(Counter(e.task for e in examples).items())),
                             "max_length": cfg.data.max_length, "seed": cfg.data.seed}, context)


def process_start() -> float:
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
    """One Ray Train worker's training; with ``session`` (a ``pipeline.train.in_trial.InProcess``) the
    whole run in the calling process, reporting and checkpointing through it."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist


    t_enter = time.perf_counter()
    # in a trial's own process (an actor Tune may have reused) there is no worker start-up to count
    stamps = {"time/at/worker_process": time.time() if session else process_start(), "time/at/enter": time.time()}
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
                save_checkpoint(model, opt, sched, step, Path(tmp), final)
                report(metrics, Path(tmp), step)
        else:
            report(metrics)
        t_last = time.perf_counter()  # eval/checkpoint time is not training throughput
