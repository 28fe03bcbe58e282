"""R-LoRA on a whole (tiny Llama) model through PEFT's machinery."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file, save_file

import rlora
from rlora import RLoraConfig, rlora_layers

ALL_PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def max_logit_dev(model, base_logits, ids):
    with torch.no_grad():
        return (model(ids).logits - base_logits).abs().max().item()


@pytest.mark.parametrize(
    "overrides", [{"router_init": "zero"}, {"correction": "routed"}, {"correction": "routed", "router_init": "zero"}]
)
def test_exact_start_with_zero_router_or_routed_correction(tiny_llama_factory, token_ids, overrides):
    base = tiny_llama_factory()
    with torch.no_grad():
        base_logits = base(token_ids).logits
    model = rlora.get_peft_model(base, RLoraConfig.from_preset("rlora", r=8, num_heads=4, **overrides)).eval()
    torch.testing.assert_close(model(token_ids).logits, base_logits, atol=1e-5, rtol=0)
    # the heads themselves are random and non-zero: the cancellation is real, not a zero delta
    assert all(m.rlora_B["default"].abs().min() > 0 for _, m in rlora_layers(model))


def test_paper_default_start_beats_no_correction(tiny_llama_factory, token_ids):
    base = tiny_llama_factory()
    with torch.no_grad():
        base_logits = base(token_ids).logits
    devs = {}
    for correction in ("mean", "none"):
        torch.manual_seed(7)  # same A, B, router draws for both
        m = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig.from_preset("rlora", correction=correction))
        devs[correction] = max_logit_dev(m.eval(), base_logits, token_ids)
    assert devs["none"] > 1e-3  # random heads do perturb the model ...
    assert devs["mean"] < devs["none"] / 2  # ... and Eq. 4 removes most of it with a Kaiming router
    assert devs["mean"] > 1e-6  # but not exactly: the router is not uniform (paper's Limitations)


LOAD_SEED = 12345  # != the RNG state the saved adapters were drawn from (the fixture seeds 0)


def fresh_base(factory, **kw):
    """A fresh base for loading onto: identical base weights (the fixture reseeds 0), but a
    different RNG state afterwards, so the adapter PEFT builds before loading draws different
    random A, B, router, A0, B0 than the saved one. Any tensor the load fails to overwrite then
    shows up as different logits instead of silently matching."""
    base = factory(**kw)
    torch.manual_seed(LOAD_SEED)
    return base


def train_steps(model, ids, steps=3, lr=5e-3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "preset,extra",
    [("rlora", {}), ("rlora", {"correction": "routed"}), ("hydralora", {}), ("lora", {}), ("hydralora+init", {}),
     ("lora_moe", {})],
)
def test_train_save_load_on_fresh_base_reproduces_outputs(tiny_llama_factory, token_ids, tmp_path, preset, extra):
    model = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig.from_preset(preset, r=4, **extra))
    losses = train_steps(model, token_ids, steps=4)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(token_ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("r", "num_heads", "alpha", "use_rslora", "gamma", "head_init", "head_dropout",
                "dropout_mode", "router_init", "correction", "down_projection", "target_modules"):
        assert key in saved
    assert saved["peft_type"] == "RLORA"

    loaded = rlora.from_pretrained(fresh_base(tiny_llama_factory), tmp_path)
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, trained)
    # PEFT's own loader gives the same model once rlora is imported
    fresh2 = PeftModel.from_pretrained(fresh_base(tiny_llama_factory), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(fresh2(token_ids).logits, trained)


def test_disable_adapter_context_gives_base_and_restores(tiny_llama_factory, token_ids):
    base = tiny_llama_factory()
    with torch.no_grad():
        base_logits = base(token_ids).logits
    model = rlora.get_peft_model(base, RLoraConfig(r=4, correction="none")).eval()
    with torch.no_grad():
        adapted = model(token_ids).logits
        assert (adapted - base_logits).abs().max() > 1e-3
        with model.disable_adapter():
            assert torch.equal(model(token_ids).logits, base_logits)
        assert torch.equal(model(token_ids).logits, adapted)


def test_optimizer_step_changes_adapter_params_only(tiny_llama_factory, token_ids):
    model = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig(r=4, num_heads=3))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(t in n for t in ("rlora_A.", "rlora_B.", "rlora_router.")) for n in trainable)
    train_steps(model, token_ids, steps=1, lr=1e-2)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k in trainable}
    assert not any("rlora_A0" in k or "rlora_B0" in k for k in changed)


def test_bf16_base_model_fp32_adapters(tiny_llama_factory, token_ids, tmp_path):
    model = rlora.get_peft_model(tiny_llama_factory(dtype=torch.bfloat16), RLoraConfig(r=4, router_init="zero"))
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "base_layer" in n)
    losses = train_steps(model, token_ids, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in adapter.values())
    model.eval()
    with torch.no_grad():
        out = model(token_ids).logits
    assert out.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = rlora.from_pretrained(fresh_base(tiny_llama_factory, dtype=torch.bfloat16), tmp_path)
    assert all(p.dtype == torch.float32 for n, p in loaded.named_parameters() if "rlora_" in n)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, out)


def test_attention_and_mlp_projections_are_all_adapted(tiny_llama_factory):
    model = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig())
    layers = rlora_layers(model)
    assert {n.rsplit(".", 1)[-1] for n, _ in layers} == ALL_PROJ
    assert len(layers) == 2 * len(ALL_PROJ)
    assert not any(n.endswith("lm_head") for n, _ in layers)


def test_target_subset_and_regex(tiny_llama_factory):
    m = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig(target_modules=["q_proj", "v_proj"]))
    assert {n.rsplit(".", 1)[-1] for n, _ in rlora_layers(m)} == {"q_proj", "v_proj"}
    m = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj"))
    assert sorted(n.split("model.")[-1] for n, _ in rlora_layers(m)) == ["layers.1.mlp.down_proj", "layers.1.mlp.up_proj"]


# -- strict loading -------------------------------------------------------------------------------
ADAPTER_FILE = "adapter_model.safetensors"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
D0 = "base_model.model.model.layers.0.mlp.down_proj"  # listed first: the message sorts keys


def save_adapter(factory, path, ids, **cfg):
    """Save a briefly trained adapter (drawn at the fixture's seed 0); return its logits on ids."""
    model = rlora.get_peft_model(factory(), RLoraConfig.from_preset("rlora", r=4, **cfg))
    train_steps(model, ids, steps=2)
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(path)
    return logits


def load_rlora(base, path):
    return rlora.from_pretrained(base, path)


def load_peft(base, path):
    return PeftModel.from_pretrained(base, str(path))


def load_second(base, path, good):
    model = rlora.from_pretrained(base, good)
    model.load_adapter(str(path), adapter_name="second")
    return model


LOADERS = {"rlora.from_pretrained": load_rlora, "PeftModel.from_pretrained": load_peft,
           "load_adapter": load_second}


def edit_tensors(path, fn):
    sd = load_file(str(path / ADAPTER_FILE))
    fn(sd)
    save_file(sd, str(path / ADAPTER_FILE))


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update({k: v(cfg[k]) for k, v in changes.items()})
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _drop_a0_b0(d):
    edit_tensors(d, lambda sd: [sd.pop(k) for k in [k for k in sd if ".rlora_A0" in k or ".rlora_B0" in k]])


def _widen(sd):
    sd[f"{Q0}.rlora_B"] = torch.zeros(sd[f"{Q0}.rlora_B"].shape[0], sd[f"{Q0}.rlora_B"].shape[1] + 1)


# corruption -> (apply to the saved dir, strings the error must contain)
CORRUPTIONS = {
    "drop-A0-B0": (_drop_a0_b0, ["missing", f"{D0}.rlora_A0'", f"{D0}.rlora_B0'", "and 20 more missing"]),
    "drop-one-B": (lambda d: edit_tensors(d, lambda sd: sd.pop(f"{Q0}.rlora_B")), ["missing", f"{Q0}.rlora_B'"]),
    "drop-router": (lambda d: edit_tensors(d, lambda sd: sd.pop(f"{Q0}.rlora_router")),
                    ["missing", f"{Q0}.rlora_router'"]),
    "extra-tensor": (lambda d: edit_tensors(d, lambda sd: sd.update({f"{Q0}.rlora_C": torch.zeros(2)})),
                     ["unexpected", f"{Q0}.rlora_C'"]),
    "extra-untargeted": (
        lambda d: edit_tensors(d, lambda sd: sd.update({"base_model.model.lm_head.rlora_A": torch.zeros(4, 64)})),
        ["unexpected", "base_model.model.lm_head.rlora_A'"],
    ),
    "wrong-shape": (lambda d: edit_tensors(d, _widen),
                    [f"{Q0}.rlora_B' has shape (64, 13) in the checkpoint, expected (64, 12)"]),
    "config-num_heads+1": (lambda d: edit_config(d, num_heads=lambda n: n + 1),
                           [f"{D0}.rlora_B' has shape (64, 12) in the checkpoint, expected (64, 16)",
                            f"{D0}.rlora_router' has shape (3, 112) in the checkpoint, expected (4, 112)",
                            "num_heads=4"]),
    "config-r*2": (lambda d: edit_config(d, r=lambda r: r * 2),
                   [f"{D0}.rlora_A' has shape (4, 112) in the checkpoint, expected (8, 112)", "r=8"]),
    "config-down-per_head": (lambda d: edit_config(d, down_projection=lambda v: "per_head"),
                             [f"{D0}.rlora_A' has shape (4, 112) in the checkpoint, expected (12, 112)",
                              "down_projection='per_head'"]),
    "config-correction-none": (lambda d: edit_config(d, correction=lambda c: "none"),
                               ["unexpected", f"{D0}.rlora_A0'", "28 unexpected"]),
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_load_refuses_adapter_it_cannot_reproduce(tiny_llama_factory, token_ids, tmp_path, loader, corruption):
    good, bad = tmp_path / "good", tmp_path / "bad"
    save_adapter(tiny_llama_factory, good, token_ids)
    shutil.copytree(good, bad)
    corrupt, needles = CORRUPTIONS[corruption]
    corrupt(bad)
    load = LOADERS[loader]
    args = (good,) if loader == "load_adapter" else ()
    with pytest.raises(rlora.AdapterLoadError) as info:
        load(fresh_base(tiny_llama_factory), bad, *args)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert f"from {str(bad)!r}" in msg
    assert f"R-LoRA adapter {'second' if loader == 'load_adapter' else 'default'!r}" in msg
    for needle in needles:
        assert needle in msg, msg


def test_adapter_saved_before_down_projection_existed_loads_exactly(tiny_llama_factory, token_ids, tmp_path):
    """adapter_config.json files written before the ``down_projection`` field (LoRA-MoE) have no such
    key: they load as what they were, a shared A, bit for bit."""
    trained = save_adapter(tiny_llama_factory, tmp_path, token_ids)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["down_projection"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = rlora.from_pretrained(fresh_base(tiny_llama_factory), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, trained)


def test_fresh_base_really_redraws_a_different_adapter(tiny_llama_factory, token_ids, tmp_path, monkeypatch):
    """Guards the guard: with the strict check switched off, a file lacking A0/B0 loads onto
    fresh_base() and gives different logits, so the round-trip tests above compare real loads."""
    trained = save_adapter(tiny_llama_factory, tmp_path, token_ids)
    _drop_a0_b0(tmp_path)
    lenient = classmethod(BaseTuner._remap_adapter_state_dict_for_load.__func__)  # PEFT's, unchecked
    monkeypatch.setattr(rlora.RLoraModel, "_remap_adapter_state_dict_for_load", lenient)
    with pytest.warns(UserWarning, match="missing adapter keys"):
        loaded = rlora.from_pretrained(fresh_base(tiny_llama_factory), tmp_path)
    with torch.no_grad():
        assert not torch.allclose(loaded(token_ids).logits, trained, atol=1e-6, rtol=0)


def test_load_adapter_second_named_adapter_reproduces(tiny_llama_factory, token_ids, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    trained_a = save_adapter(tiny_llama_factory, a, token_ids)
    trained_b = save_adapter(tiny_llama_factory, b, token_ids, num_heads=2, correction="routed")
    model = rlora.from_pretrained(fresh_base(tiny_llama_factory), a)
    torch.manual_seed(LOAD_SEED + 1)
    model.load_adapter(str(b), adapter_name="second")
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, trained_a)
        model.set_adapter("second")
        assert torch.equal(model(token_ids).logits, trained_b)


def test_routed_correction_gives_the_router_no_gradient_at_init(tiny_llama_factory, token_ids):
    """What the README states about correction: routed: every head's term s*w_i*(B_i A x - B_i0 A0 x)
    is 0 at init whatever w is, so without dropout the router's first gradient is exactly 0 (with
    correction: mean it is not); it grows once the heads move."""
    def router_grad(correction):
        torch.manual_seed(3)
        m = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig.from_preset(
            "rlora", r=8, num_heads=4, correction=correction, head_dropout=0.0)).train()
        m(token_ids, labels=token_ids).loss.backward()
        return sum(p.grad.abs().sum().item() for n, p in m.named_parameters() if "rlora_router" in n)

    assert router_grad("routed") == 0.0
    assert router_grad("mean") > 1e-3
