"""RLoraModel: PEFT BaseTuner that swaps target nn.Linear modules for RLoraLinear."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .config import RLoraConfig
from .layer import RLoraLayer, RLoraLinear

_PEFT_PREFIX = "base_model.model."
_TENSOR_ATTRS = ("rlora_A", "rlora_B", "rlora_router", "rlora_A0", "rlora_B0")
_MAX_LISTED = 8  # problems listed per kind in an AdapterLoadError message


class AdapterLoadError(ValueError):
    """A saved R-LoRA adapter does not match the adapter its adapter_config.json builds.

    Raised instead of loading partially: a tensor left out of the checkpoint would otherwise keep
    its freshly drawn random init (A0/B0 are random), silently giving a different model.
    ``missing`` / ``unexpected`` are checkpoint keys; ``mismatched`` holds
    ``(key, checkpoint_shape, expected_shape)``.
    """

    def __init__(self, adapter_name: str, source: Optional[str], config: RLoraConfig,
                 missing: list, unexpected: list, mismatched: list) -> None:
        self.adapter_name, self.adapter_dir = adapter_name, source
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        where = f" from {source!r}" if source else ""
        built = (f"adapter config (r={config.r}, num_heads={config.num_heads}, correction={config.correction!r}, "
                 f"down_projection={config.down_projection!r})")
        lines = []
        for kind, items, fmt in (
            ("mismatched", mismatched, lambda m: f"tensor {m[0]!r} has shape {m[1]} in the checkpoint, expected {m[2]}"),
            ("missing", missing, lambda k: f"missing tensor {k!r}"),
            ("unexpected", unexpected, lambda k: f"unexpected tensor {k!r}"),
        ):
            lines += [f"  {fmt(item)}" for item in items[:_MAX_LISTED]]
            if len(items) > _MAX_LISTED:
                lines.append(f"  ... and {len(items) - _MAX_LISTED} more {kind}")
        super().__init__(
            f"R-LoRA adapter {adapter_name!r}{where} does not match the adapter built from its {built}: "
            f"{len(mismatched)} mismatched, {len(missing)} missing, {len(unexpected)} unexpected tensor(s)\n"
            + "\n".join(lines)
            + "\nrefusing to load it: the result would not be the saved adapter (a tensor not loaded keeps "
            "its freshly drawn random init)"
        )


class RLoraModel(BaseTuner):
    """Create an R-LoRA model from a transformers (or any torch) model. Use via
    ``rlora.get_peft_model`` / ``peft.get_peft_model`` rather than directly."""

    prefix: str = "rlora_"
    tuner_layer_cls = RLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        rlora_config: RLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, RLoraLinear):
            target.update_layer(adapter_name, rlora_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"R-LoRA adapts torch.nn.Linear only; target {current_key!r} is {type(base).__name__}"
            )
        new_module = RLoraLinear(target, adapter_name, rlora_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    # -- strict loading ---------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's per-method load hook, called by ``set_peft_model_state_dict`` (so by
        ``PeftModel.from_pretrained``, ``load_adapter`` and ``rlora.from_pretrained``) right before
        ``load_state_dict(strict=False)``. We remap as PEFT does, then require the checkpoint to hold
        exactly the adapter's tensors with exactly their shapes."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected: dict[str, torch.Tensor] = {}  # model key -> tensor of the freshly built adapter
        for name, module in model.named_modules():
            if not isinstance(module, RLoraLayer):
                continue
            for attr in _TENSOR_ATTRS:
                container = getattr(module, attr)
                if adapter_name in container:
                    expected[f"{name}.{attr}.{adapter_name}"] = container[adapter_name]

        model_keys = set(model.state_dict())

        def ckpt_key(k: str) -> str:  # the key as it is written in the adapter file
            return k.removesuffix(f".{adapter_name}")

        seen, unexpected, mismatched = set(), [], []
        for k, v in remapped.items():
            # without a PeftModel wrapper the checkpoint's "base_model.model." prefix is dropped later
            mk = k if k in expected or k in model_keys else k.removeprefix(_PEFT_PREFIX)
            if mk in expected:
                seen.add(mk)
                if tuple(v.shape) != tuple(expected[mk].shape):
                    mismatched.append((ckpt_key(mk), tuple(v.shape), tuple(expected[mk].shape)))
            elif mk not in model_keys or ".rlora_" in mk:  # no such tensor, or another adapter's
                unexpected.append(k)
        missing = [ckpt_key(k) for k in expected if k not in seen]
        if missing or unexpected or mismatched:
            raise AdapterLoadError(adapter_name, getattr(config, "_source_dir", None), config,
                                   sorted(missing), sorted(unexpected), sorted(mismatched))
        return remapped
