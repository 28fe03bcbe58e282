"""RLoraModel: PEFT BaseTuner that swaps target nn.Linear modules for RLoraLinear."""

from __future__ import annotations

from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .config import RLoraConfig
from .layer import RLoraLayer, RLoraLinear


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
