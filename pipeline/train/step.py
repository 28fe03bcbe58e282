"""One optimizer step's gradients: micro-batches, autocast, gradient checkpointing, peak memory."""

from __future__ import annotations

import contextlib
import warnings

from pipeline.data.encoding import IGNORE
from pipeline.model.precision import autocast

# PEFT asks every model the old name on each wrap (transformers >= 5.2x warns); nothing a user can change
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
def enable_gradient_checkpointing(base) -> None:
    """Recompute the frozen base's activations in backward (non-reentrant; the RNG state is
    restored for the recomputation, so dropout masks are the ones of the forward), with the hook
    PEFT models need so gradients reach the adapters through frozen embeddings."""
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; older: the deprecated name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.enable_input_require_grads()


def answer_tokens(batch) -> int:
    """Tokens the causal-LM loss counts in a batch (labels are shifted by one inside the model)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def accumulate_gradients(model, micro_batches: list[dict], device, precision: str, sync_each: bool = True
                         ) -> tuple[float, float]:
    """Forward + backward over ``micro_batches`` (one optimizer step's worth); returns (loss, input tokens).

    With several micro-batches the loss of each is its summed token losses over the answer tokens of
    all of them (``num_items_in_batch``), so the accumulated gradient is the gradient of one batch
    k times larger. Under DDP the inner micro-steps run in ``no_sync`` (one all-reduce per step)."""
    total, loss_sum, tokens = sum(answer_tokens(b) for b in micro_batches), 0.0, 0.0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        kwargs = {"num_items_in_batch": total} if len(micro_batches) > 1 else {}
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync_each or last else model.no_sync():
            with autocast(precision, device):
                loss = model(**batch, **kwargs).loss
            loss.backward()
        loss_sum += loss.item()
        tokens += float(batch["attention_mask"].sum())
    return loss_sum, tokens


def reset_peak_memory(device) -> None:
    """Start ``peak_memory_gb`` afresh (a run trained in a process that ran others before it): the CUDA
    allocator's peak, or on Linux the resident-set high-water mark (``/proc/self/clear_refs``)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_gb(device) -> float:
    """This process's peak memory so far, GiB: on a GPU the CUDA allocator's peak on ``device``,
    else the peak resident set size (model, optimizer, activations and the interpreter, as a
    machine's memory limit sees them). On Linux that is ``VmHWM`` of ``/proc/self/status``, not
    ``ru_maxrss``: the kernel carries ``ru_maxrss`` across fork + exec, so a worker started by a
    3 GiB process would report 3 GiB before it allocated anything."""
    import resource
    import sys

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
