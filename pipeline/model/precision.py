"""``train.precision``: how the model is loaded and run, in training, held-out scoring and the eval stage.

- ``fp32``: everything in fp32.
- ``bf16-mixed``: fp32 weights (the adapters' are the master weights the optimizer updates); the
  forward runs under ``torch.autocast(bfloat16)`` on CPU or CUDA, so the base and adapter matrix
  products run in bf16 while the router softmax, the loss and the optimizer stay fp32.
- ``bf16``: a bf16 base model (half the memory), adapters still fp32 (``rlora`` never lets them
  drop below fp32), the delta cast to bf16 once per layer.
"""

from __future__ import annotations

import contextlib

PRECISIONS = ("fp32", "bf16-mixed", "bf16")


def load_dtype(precision: str) -> str:
    """The dtype the base model is loaded in."""
    return "bfloat16" if precision == "bf16" else "float32"


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in (autocast for ``bf16-mixed``, nothing otherwise)."""
    if precision != "bf16-mixed":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
