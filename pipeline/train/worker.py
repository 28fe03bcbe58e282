"""The training loop each Ray Train worker runs (or a sweep trial's own process, through
``pipeline.train.in_trial``): build the adapter, resume, load the data, open tracking, then train,
scoring the held-out set and checkpointing as the run's config says."""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.data.batching import LengthAwareBatches
from pipeline.data.mixture_cache import tokenised_mixture
from pipeline.model import adapters
from pipeline.model.base import load_model
from pipeline.model.precision import autocast, load_dtype
from pipeline.tracking import Tracker
from pipeline.train.checkpoints import restore_checkpoint, save_checkpoint
from pipeline.train.heldout import evaluate, evaluate_confirmation, log_examples
from pipeline.train.request import TrainRequest, log_mixture, lr_schedule, maybe_kill, process_start, step_seed
from pipeline.train.step import accumulate_gradients, enable_gradient_checkpointing, peak_memory_gb, reset_peak_memory


def train_loop_per_worker(loop_config: dict[str, Any], session=None) -> None:
    """One worker's run (``loop_config``: a ``TrainRequest`` as a dict); with ``session`` (a
    ``pipeline.train.in_trial.InProcess``) the whole run in the calling process, reporting and
    checkpointing through it."""
    run = WorkerRun(TrainRequest(**loop_config), session)
    if run.resume():  # the run had finished (its trial runs again): reported once more
        return
    run.load_data()
    run.open_tracking()
    run.evaluate_at_start()
    for step in range(run.start + 1, run.cfg.train.steps + 1):
        loss = run.train_step(step)
        if loss is None:  # diverged: reported, the driver fails the run
            return
        run.evaluate_and_report(step, loss)


class WorkerRun:
    """One worker's share of a run, its phases in the order ``train_loop_per_worker`` calls them."""

    def __init__(self, req: TrainRequest, session=None):
        self.t_enter = time.perf_counter()
        # in a trial's own process (an actor Tune may have reused) there is no worker start-up to count
        self.stamps = {"time/at/worker_process": time.time() if session else process_start(),
                       "time/at/enter": time.time()}
        self.req, self.session, self.cfg = req, session, req.config
        if session:
            self.rank, self.world = session.rank, session.world
        else:
            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(self.cfg.scaling.cpus_per_worker)
        # Ray assigns GPUs (CUDA_VISIBLE_DEVICES) whether or not this torch can use them: without CUDA
        # the worker computes on the CPU (a cluster that declares logical GPUs, as the tests do)
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", 0) if session else ray.train.torch.get_device()
        if session:  # the trial's process may have trained other runs: this run's peak only
            reset_peak_memory(self.device)
        self.peak = 0.0  # the peak so far (the kernel's high-water mark can read a few pages lower later)
        self.tracker: Optional[Tracker] = None
        self.start = 0
        self._build()

    def _build(self) -> None:
        """The base model, its adapter, optimizer and schedule (same init on every rank)."""
        train = self.cfg.train
        self.base, self.tok = load_model(self.req.model_path, dtype=load_dtype(train.precision))
        self.stamps["time/at/model"] = time.time()
        if train.gradient_checkpointing:
            enable_gradient_checkpointing(self.base)
        torch.manual_seed(train.seed)  # DDP also broadcasts rank 0's
        self.model = adapters.build(self.base, self.cfg.adapter, train.steps).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_schedule(train.warmup_steps, train.steps))

    def resume(self) -> bool:
        """Continue from the newest checkpoint, if any; True when that checkpoint ends the run."""
        if self.session:
            found = self.session.get_checkpoint()
            if found:
                self.start = restore_checkpoint(self.model, self.opt, self.sched, found, self.device)
                if self.start == self.cfg.train.steps:
                    self.session.finished_report(found)
                    return True
        else:
            checkpoint = ray.train.get_checkpoint()
            if checkpoint:
                with checkpoint.as_directory() as d:
                    self.start = restore_checkpoint(self.model, self.opt, self.sched, Path(d), self.device)
        self.ddp_model = ray.train.torch.prepare_model(self.model, move_to_device=False) if self.world > 1 else self.model
        self.stamps["time/at/adapter"] = time.time()
        return False

    def load_data(self) -> None:
        """The tokenised mixture (cached across runs) and this rank's batches from the resumed step on."""
        cfg = self.cfg
        self.mix, encoded, self.cached = tokenised_mixture(cfg.data, self.tok, self.req.model_path)
        stream = LengthAwareBatches(encoded, cfg.train.batch_size, self.tok.pad_token_id, seed=cfg.train.seed)
        self.batches = stream.for_rank(self.rank, self.world, skip_steps=self.start * cfg.train.grad_accum)
        self.stamps["time/at/data"] = time.time()

    def open_tracking(self) -> None:
        """Rank 0 logs into the run: the mixture and adapter size once, where the workers landed."""
        if self.rank == 0:
            self.tracker = Tracker(self.req.tracking_uri, self.req.run_id)
        if self.tracker and self.start == 0:
            log_mixture(self.tracker, self.cfg, self.mix)
            self.tracker.log_params({**{f"adapter.{k}": v for k, v in adapters.trainable(self.model).items()},
                                     "adapter.ab_matrices": adapters.ab_matrices(self.model) or "–"})
        nodes = [ray.get_runtime_context().get_node_id()]
        if self.world > 1:  # where the workers landed (placement strategy), recorded on the run
            nodes = [None] * self.world
            dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        if self.tracker:
            self.tracker.set_tags({
                "ray.worker_node_ids": ",".join(nodes), "ray.num_nodes": str(len(set(nodes))),
                "ray.gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "device": str(self.device), "rlora.mixture": "cached" if self.cached else "built"})
        if self.tracker and self.start:
            self.tracker.log_metrics({"resumed_from_step": self.start}, step=self.start)
        self.stamps["time/at/tracking"] = time.time()

    def evaluate_at_start(self) -> None:
        """Step 0's held-out scores (``train.eval_at_start``), then the loop's clocks start."""
        if self.start == 0 and self.cfg.train.eval_at_start:
            self._score_held_out(0)
        self.t_last = self.t_loop = time.perf_counter()
        self.stamps["time/at/loop"] = time.time()
        self.timing = {"time/setup_s": self.t_loop - self.t_enter, **self.req.driver_stamps, **self.stamps}

    def train_step(self, step: int) -> Optional[float]:
        """One optimizer step; the loss averaged over ranks, or None where it diverged (then reported)."""
        train = self.cfg.train
        torch.manual_seed(step_seed(train.seed, step, self.rank))
        self.ddp_model.train()
        loss, tokens = accumulate_gradients(self.ddp_model, [next(self.batches) for _ in range(train.grad_accum)],
                                            self.device, train.precision, sync_each=self.world == 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, train.grad_clip)
        self.opt.step()
        adapters.after_optimizer_step(self.model, step)  # AdaLoRA's budget allocation, from this step's gradients
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        stats = torch.tensor([loss, tokens], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(stats)
            stats[0] /= self.world
        if not math.isfinite(stats[0].item()):
            # Every rank sees the same all-reduced loss, so all stop here together. Reporting (not
            # raising) keeps Ray Train from retrying a deterministic divergence; the driver fails the run.
            if self.tracker:
                self.tracker.set_tags({"nan_loss_step": step})
            self._report({"step": step, "nan_loss": 1.0, **self.req.nan_metrics})
            return None
        now = time.perf_counter()
        if self.tracker:
            self.tracker.log_metrics({"train/loss": stats[0].item(), "train/lr": self.sched.get_last_lr()[0],
                                      "train/grad_norm": float(grad_norm),
                                      "train/tokens_per_s": stats[1].item() / (now - self.t_last)}, step=step)
        self.t_last = now
        maybe_kill(self.rank, step, resumed=self.start > 0)
        return stats[0].item()

    def evaluate_and_report(self, step: int, loss: float) -> None:
        """On eval and checkpoint steps: score (every rank its shard), report, checkpoint (rank 0)."""
        train = self.cfg.train
        final = step == train.steps
        do_eval = final or step % train.eval_every == 0
        do_ckpt = final or step % train.checkpoint_every == 0
        if not (do_eval or do_ckpt):
            return
        metrics: dict[str, float] = {"step": step, "train/loss": loss, **self.timing}
        scored = None  # scoring is the loop's work, its logging not
        if do_eval:
            evals, scored = self._score_held_out(step)
            metrics.update(evals)
            if final:  # the confirmation split: logged on the run, never reported to Tune
                self._score_confirmation(step)
                scored = time.perf_counter()
        metrics["time/loop_s"] = (scored or time.perf_counter()) - self.t_loop
        metrics["time/at/report"] = time.time()
        if self.rank == 0 and do_ckpt:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(self.model, self.opt, self.sched, step, Path(tmp), final)
                self._report(metrics, Path(tmp), step)
        else:
            self._report(metrics)
        self.t_last = time.perf_counter()  # eval/checkpoint time is not training throughput

    def _score_held_out(self, step: int) -> tuple[dict[str, float], float]:
        """The selection split's scores (every rank scores its shard; rank 0 logs them and gets them)
        and when the scoring ended."""
        with autocast(self.cfg.train.precision, self.device):
            evals, table = evaluate(self.model, self.tok, self.mix.held_out, self.cfg.data.max_length,
                                    self.rank, self.world)
        scored = time.perf_counter()
        if not self.tracker:
            return {}, scored
        self.tracker.log_metrics(evals, step=step, model_id=self.req.model_id)
        log_examples(self.tracker, table, step)
        if step > 0:
            self.peak = max(self.peak, peak_memory_gb(self.device))
            self.tracker.log_metrics({"train/peak_mem_gb": self.peak}, step=step)
        return evals, scored

    def _score_confirmation(self, step: int) -> None:
        with autocast(self.cfg.train.precision, self.device):
            confirm, table = evaluate_confirmation(self.model, self.tok, self.cfg.data, self.rank, self.world)
        if self.tracker and table is not None:
            self.tracker.log_metrics(confirm, step=step, model_id=self.req.model_id)
            log_examples(self.tracker, table, step, "confirm")

    def _report(self, metrics: dict[str, Any], ckpt: Optional[Path] = None, step: Optional[int] = None) -> None:
        if self.session:
            self.session.report(metrics, ckpt, step)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)) if ckpt else None,
                             checkpoint_dir_name=f"step-{step:06d}" if ckpt else None)
