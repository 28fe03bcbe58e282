"""The adapter a run trains: R-LoRA (``rlora/``) or one of PEFT's own methods, built, reloaded and
stepped through one interface, so training, checkpoints and the eval stage treat them alike.

PEFT's methods are PEFT's code: ``adapter.method`` picks the config class, the method's own
section (``adapter.lora``, ``adapter.adalora`` ...) holds that class's fields, validated by the
class's own type hints (pydantic) before anything runs. ``dora`` is PEFT's LoRA with
``use_dora``. AdaLoRA's budget schedule needs the run's step count (``total_step``) and a call of
``update_and_allocate`` after every optimizer step (``after_optimizer_step``). Prompt, P- and prefix
tuning (PEFT's prompt-learning methods) adapt no module, so ``target_modules`` does not apply to them;
the training loop's held-out scorer scores them pair by pair without their virtual tokens' logits
(``pipeline.model.scoring``; lm-eval's HFLM aligns those itself), and ``detach`` gives the untouched base back.
``full`` fine-tuning trains every weight of the base itself: its "adapter" directory is the whole
model as ``save_pretrained`` writes it (``config.json`` + ``model.safetensors``), and ``load`` puts
those weights, strictly, into a copy of the base, so a shared base stays untouched."""

from __future__ import annotations

import dataclasses
import enum
import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

# method -> (PEFT config class, fields the method fixes)
PEFT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {}),
    "dora": ("LoraConfig", {"use_dora": True}),
    "adalora": ("AdaLoraConfig", {}),
    "ia3": ("IA3Config", {}),
    "prompt_tuning": ("PromptTuningConfig", {}),
    "p_tuning": ("PromptEncoderConfig", {}),
    "prefix_tuning": ("PrefixTuningConfig", {}),
}
PROMPT_LEARNING_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")  # their PeftType values
# fields PEFT leaves unset (None) that its prompt-learning methods cannot build without; a run may override them
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "prompt_tuning": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20, "encoder_hidden_size": 128},
    "prefix_tuning": {"num_virtual_tokens": 20},
}
# methods built by this project's tuner (rlora/): R-LoRA's presets, and LoRA-MoE as its per-head-A structure
RLORA_METHODS = ("rlora", "lora_moe")
FULL = "full"  # full fine-tuning: no adapter, every weight of the base trains
FULL_WEIGHTS = "model.safetensors"  # what save_pretrained writes for a model that fits one file
_SET_HERE = ("task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode")


class AdapterLoadError(ValueError):
    """A saved adapter whose tensors do not match the adapter its adapter_config.json builds."""


def configurable_fields(method: str) -> set[str]:
    """The fields of ``method``'s PEFT config class a run may set (``adapter.<method>.<field>``)."""
    import peft

    cls_name, fixed = PEFT_METHODS[method]
    return {f.name for f in dataclasses.fields(getattr(peft, cls_name)) if f.init} - set(fixed) - set(_SET_HERE)


def peft_config(method: str, fields: dict[str, Any], target_modules: Optional[Iterable[str]],
                total_step: Optional[int] = None):
    """PEFT's config object for ``method`` from the method's section; ValueError naming the field
    (``rr: not a field of peft.LoraConfig``) for an unknown, fixed or ill-typed one."""
    import peft
    from pydantic import TypeAdapter, ValidationError

    cls_name, fixed = PEFT_METHODS[method]
    cls = getattr(peft, cls_name)
    for key in set(fields) - configurable_fields(method):
        if key in fixed or key in _SET_HERE:
            raise ValueError(f"{key}: set by the pipeline for method {method}, not configurable")
        raise ValueError(f"{key}: not a field of peft.{cls_name}")
    kw: dict[str, Any] = {"task_type": "CAUSAL_LM", **PEFT_DEFAULTS.get(method, {}), **fixed, **fields}
    if target_modules is not None and "target_modules" in configurable_fields(method):
        kw.setdefault("target_modules", list(target_modules))
    if method == "adalora" and "total_step" not in fields:
        kw["total_step"] = total_step or 1  # the run's train.steps (wired by RunConfig)
    try:
        return TypeAdapter(cls).validate_python(kw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{where + ': ' if where else ''}{err['msg']}") from None


def build(base, section, total_steps: Optional[int] = None):
    """``base`` wrapped with the adapter ``section`` (an AdapterSection) describes; only the adapter trains."""
    import peft

    import rlora  # lazy: loads peft, torch

    if section.method == FULL:
        return base.requires_grad_(True)
    if section.uses_rlora:
        return rlora.get_peft_model(base, section.to_rlora())
    return peft.get_peft_model(base, section.to_peft(total_steps))


def resolved(section, total_steps: Optional[int] = None) -> dict[str, Any]:
    """The full config the adapter is built from (logged as the run's ``resolved.*`` params)."""
    if section.method == FULL:
        return {"method": FULL}
    cfg = section.to_rlora() if section.uses_rlora else section.to_peft(total_steps)
    return {k: sorted(v) if isinstance(v, set) else v.value if isinstance(v, enum.Enum) else v
            for k, v in cfg.to_dict().items()}


def trainable(model) -> dict[str, float]:
    """Trainable parameters and their share of the base's (the paper's "% params"): the frozen
    parameters are the base's, or, when nothing is frozen (full fine-tuning), the trained ones are."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable_params": n_train, "trainable_pct": 100.0 * n_train / (n_frozen or n_train)}


def ab_matrices(model) -> Optional[str]:
    """The paper's "A/B" column (its Table 3): low-rank down (A) and up (B) projections per adapted
    layer, read off the built model's first adapted layer: R-LoRA and HydraLoRA ``1/N`` (one shared
    A, a B per head), LoRA-MoE ``N/N``, LoRA, DoRA and AdaLoRA ``1/1``; None without A and B (IA³)."""
    from peft.tuners.lora import LoraLayer

    from rlora.layer import RLoraLayer  # lazy: loads peft, torch

    for module in model.modules():
        if isinstance(module, RLoraLayer) and module.rlora_settings:
            name = next(iter(module.rlora_settings))
            r = module.rlora_settings[name].r
            return f"{module.rlora_A[name].shape[0] // r}/{module.rlora_B[name].shape[1] // r}"
        if isinstance(module, LoraLayer) and module.lora_A:
            return "1/1"  # PEFT's LoRA family: one lora_A and one lora_B per adapter and layer
    return None


def is_prompt_learning(model) -> bool:
    """Whether ``model`` is a PeftModel of a prompt-learning method (virtual tokens, no adapted module)."""
    configs = getattr(model, "peft_config", None)
    return bool(configs) and bool(getattr(configs.get(model.active_adapter), "is_prompt_learning", False))


def is_full(model) -> bool:
    """Whether ``model`` is a fully fine-tuned model (``load`` of a full directory): no adapter wrapper."""
    return getattr(model, "peft_config", None) is None


def detach(model, base):
    """The base model back after ``model = load(base, ...)``: the adapter layers taken out
    (``unload``); for prompt-learning methods, which wrap the base without changing it, the base
    itself; for a full fine-tune, which was loaded into a copy, ``base`` as it was."""
    if is_full(model):
        return base
    return model.get_base_model() if is_prompt_learning(model) else model.unload()


def _is_adalora(model) -> bool:
    from peft import PeftType

    return not is_full(model) and model.peft_config[model.active_adapter].peft_type == PeftType.ADALORA


def after_optimizer_step(model, step: int) -> None:
    """AdaLoRA's budget allocation (importance scores from this step's gradients: call it after
    ``optimizer.step()`` and before ``zero_grad``); nothing for the other methods."""
    if _is_adalora(model):
        model.base_model.update_and_allocate(step)


def training_state(model) -> dict[str, Any]:
    """What a training checkpoint needs beside ``save_pretrained``'s directory to resume exactly
    (plain tensors and containers, for ``torch.load(weights_only=True)``). For AdaLoRA: once ranks
    are allocated, ``save_pretrained`` writes each matrix cut to its allocated rank, but training
    goes on at the initial rank with the pruned rows masked (and the optimizer's state has that
    shape), so the checkpoint keeps the trainable tensors at full rank, the rank pattern and the
    rank allocator's importance averages. Nothing for the other methods."""
    if not _is_adalora(model):
        return {}
    alloc = model.base_model.rankallocator
    return {"adalora": {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "rank_pattern": model.peft_config[model.active_adapter].rank_pattern,
        "ipt": dict(alloc.ipt), "exp_avg_ipt": dict(alloc.exp_avg_ipt), "exp_avg_unc": dict(alloc.exp_avg_unc)}}


# only when every key it names is an AdaLoRA lora_E key
ADALORA_FALSE_ALARM = r"The following rank_pattern keys did not match any targeted module and were ignored: \[('[^']*\.lora_E'(, )?)+\]\.?$"


def load(base, path: str | Path, is_trainable: bool = False):
    """A saved adapter of any method onto a fresh base, strictly: R-LoRA through ``rlora.from_pretrained``
    (its own check), PEFT's methods with the saved tensors compared to the ones the config builds, so
    a missing, unexpected or mis-shaped tensor is an AdapterLoadError naming it instead of a fresh init."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils import load_peft_weights

    import rlora  # lazy: loads peft, torch

    path = Path(path)
    if not (path / "adapter_config.json").exists():
        if (path / FULL_WEIGHTS).exists():
            return load_full(base, path, is_trainable)
        raise AdapterLoadError(f"{path}: neither an adapter (adapter_config.json) nor a fully fine-tuned model ({FULL_WEIGHTS})")
    peft_type = json.loads((path / "adapter_config.json").read_text()).get("peft_type")
    if peft_type == "RLORA":
        return rlora.from_pretrained(base, path, is_trainable=is_trainable)
    saved = load_peft_weights(str(path), device="cpu")
    try:
        with warnings.catch_warnings():
            # PEFT's generic check of rank_pattern keys against module names warns that an AdaLoRA
            # adapter's allocated ranks "were ignored": its keys name the module's lora_E, and AdaLoRA
            # applies them when the weights load (the reload has the pruned shapes; tests/test_methods.py)
            warnings.filterwarnings("ignore", category=RuntimeWarning, message=ADALORA_FALSE_ALARM)
            model = PeftModel.from_pretrained(base, str(path), is_trainable=is_trainable)
    except RuntimeError as e:  # torch's size mismatch: keep its last line, which names the tensor
        msg = str(e).splitlines()[-1].strip()
        if peft_type in PROMPT_LEARNING_TYPES:  # the prompt encoder names its own "weight": name the saved tensor
            msg = f"{', '.join(sorted(saved))}: {msg}"
        raise AdapterLoadError(f"{path}: {msg}") from None
    except KeyError as e:  # a prompt-learning method's encoder reads its tensor by name
        raise AdapterLoadError(f"{path}: {peft_type} adapter missing tensor(s) {e.args[0]}") from None
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise AdapterLoadError(f"{path}: {peft_type} adapter "
                               + "; ".join(f"{kind} tensor(s) {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                                           for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    return model


def load_full(base, path: str | Path, is_trainable: bool = False):
    """A fully fine-tuned model's weights (``save_pretrained``'s ``model.safetensors``) in a copy of
    ``base``, strictly: every tensor of the base must be there with its shape (tied ones once) and
    nothing else, else an AdapterLoadError naming them; ``base`` itself is not changed."""
    import copy

    from safetensors.torch import load_model

    model = copy.deepcopy(base)
    try:
        load_model(model, str(Path(path) / FULL_WEIGHTS), strict=True)
    except RuntimeError as e:  # missing/unexpected keys, or torch's size mismatch naming the tensor
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise AdapterLoadError(f"{path}: full model {' '.join(lines[1:] if len(lines) > 1 else lines)[:600]}") from None
    return model.requires_grad_(is_trainable)


def restore(model, directory: str | Path, state: Optional[dict[str, Any]] = None) -> None:
    """A training checkpoint's trained weights (``directory``, as ``save_pretrained`` wrote them)
    back into the run's freshly built model: the adapter's tensors, or for full fine-tuning the
    whole model's; for AdaLoRA the full-rank tensors and allocator state ``training_state`` saved
    (``state``), strictly: a checkpoint without them cannot be resumed exactly and is refused."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    if _is_adalora(model):
        ada = (state or {}).get("adalora")
        if ada is None:
            raise AdapterLoadError(f"{directory}: AdaLoRA checkpoint without its full-rank training state "
                                   "(written before AdaLoRA checkpoints were resumable): it cannot be resumed "
                                   "exactly; start this run again from step 0")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        saved = ada["weights"]
        wrong = sorted(set(params) ^ set(saved)) + sorted(n for n in set(params) & set(saved)
                                                           if params[n].shape != saved[n].shape)
        if wrong:
            raise AdapterLoadError(f"{directory}: AdaLoRA checkpoint does not match this model's adapter: "
                                   f"{', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        model.peft_config[model.active_adapter].rank_pattern = ada["rank_pattern"]
        alloc = model.base_model.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (dict(ada[k]) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc"))
        return
    if is_full(model):
        load_model(model, str(directory / FULL_WEIGHTS), strict=True)
    else:
        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
