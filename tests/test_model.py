"""R-LoRA on a whole (tiny Llama) model through PEFT's machinery."""

import json

import pytest
import torch
from peft import PeftModel

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
    [("rlora", {}), ("rlora", {"correction": "routed"}), ("hydralora", {}), ("lora", {}), ("hydralora+init", {})],
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
                "dropout_mode", "router_init", "correction", "target_modules"):
        assert key in saved
    assert saved["peft_type"] == "RLORA"

    torch.manual_seed(999)  # a different RNG state: loading must not depend on re-drawing the init
    fresh = tiny_llama_factory()
    loaded = rlora.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, trained)
    # PEFT's own loader gives the same model once rlora is imported
    fresh2 = PeftModel.from_pretrained(tiny_llama_factory(), str(tmp_path)).eval()
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
    loaded = rlora.from_pretrained(tiny_llama_factory(dtype=torch.bfloat16), tmp_path)
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
