"""Register R-LoRA as a first-class PEFT method.

PEFT keys its tuner registry on the ``PeftType`` string enum, which has no public hook
for third-party methods. We add one member, ``PeftType.RLORA``, the same way the enum
would have declared it, then call PEFT's own ``register_peft_method``. From then on
``peft.get_peft_model``, ``PeftModel.save_pretrained`` and ``PeftModel.from_pretrained``
treat R-LoRA exactly like LoRA. Importing :mod:`rlora` runs it once. The one other PEFT
hook used is the per-method load hook ``_remap_adapter_state_dict_for_load``, which
``RLoraModel`` overrides to make loading strict (rlora/model.py).
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

from .config import RLoraConfig

NAME = "rlora"
PEFT_TYPE_NAME = NAME.upper()


def _add_enum_member(enum_cls, name: str) -> None:
    if name in enum_cls.__members__:
        return
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)


def register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    _add_enum_member(PeftType, PEFT_TYPE_NAME)
    if PeftType.RLORA in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    from .model import RLoraModel  # lazy: loads torch

    register_peft_method(name=NAME, config_cls=RLoraConfig, model_cls=RLoraModel, prefix="rlora_")
