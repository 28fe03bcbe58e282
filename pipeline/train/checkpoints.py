"""A training run's checkpoints: the adapter plus optimizer, scheduler and step, written atomically."""

from __future__ import annotations

from pathlib import Path

from pipeline.model import adapters

TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(model, opt, sched, step: int, directory: Path, final: bool) -> None:
    import torch

    model.save_pretrained(directory / "adapter")
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                **adapters.training_state(model)}, directory / TRAINER_STATE)
    if final:
        from rlora.analysis import head_similarity, plot_head_similarity, plot_head_tsne  # lazy: loads peft, torch

        sims = head_similarity(model)
        if sims:
            plot_head_similarity(sims, directory / "figures" / "head_similarity.png")
            try:
                plot_head_tsne(model, directory / "figures" / "head_tsne.png")
            except ValueError:
                pass  # too few heads of one type for a t-SNE


class CheckpointError(RuntimeError):
    pass


def restore_checkpoint(model, opt, sched, directory: Path, device="cpu") -> int:
    """A checkpoint ``save_checkpoint`` wrote, back into a freshly built run: the trained weights,
    the optimizer's and scheduler's state; the step it was written at."""
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
