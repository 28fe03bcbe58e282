"""R-LoRA: multi-head LoRA with multi-head dropout and multi-head random init (arXiv 2502.15455).

A PEFT method: ``rlora.get_peft_model(model, RLoraConfig(...))`` returns a ``peft.PeftModel``
whose ``save_pretrained`` / ``rlora.from_pretrained`` round-trip exactly.
"""

from __future__ import annotations

from ._registry import register as _register

_register()

from .config import DEFAULT_TARGET_MODULES, PRESETS, RLoraConfig  # noqa: E402
from .layer import HeadSettings, RLoraLayer, RLoraLinear, fused_delta, init_std  # noqa: E402
from .model import AdapterLoadError, RLoraModel  # noqa: E402

__all__ = [
    "AdapterLoadError",
    "DEFAULT_TARGET_MODULES",
    "PRESETS",
    "HeadSettings",
    "RLoraConfig",
    "RLoraLayer",
    "RLoraLinear",
    "RLoraModel",
    "fused_delta",
    "from_pretrained",
    "get_peft_model",
    "init_std",
    "rlora_layers",
]


def get_peft_model(model, config: RLoraConfig, adapter_name: str = "default", **kwargs):
    """Wrap ``model`` with an R-LoRA adapter; only adapter parameters are trainable."""
    import peft

    if not isinstance(config, RLoraConfig):
        raise TypeError(f"config must be an RLoraConfig, got {type(config).__name__}")
    return peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


def from_pretrained(base_model, path, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
    """Load an adapter saved with ``save_pretrained`` onto a fresh, unmodified base model.

    Strict: raises :class:`AdapterLoadError` if the saved tensors are missing, unexpected or
    mis-shaped for the adapter that adapter_config.json builds (also via ``PeftModel.from_pretrained``
    and ``load_adapter``, see ``RLoraModel._remap_adapter_state_dict_for_load``)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(path), adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)


def rlora_layers(model):
    """(name, RLoraLayer) pairs of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RLoraLayer)]
