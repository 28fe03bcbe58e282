"""RLoraLinear against an explicit per-head reference, init, dropout, dtypes."""

import math

import pytest
import torch
from torch import nn

import rlora
from rlora import PRESETS, RLoraConfig, RLoraLinear


def make_layer(d_in=24, d_out=40, seed=0, bias=True, **cfg):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    config = RLoraConfig(**cfg)
    layer = RLoraLinear(base, "default", config)
    return layer, config


def perturb_(layer, seed=1):
    """Simulate training: move every trainable adapter tensor away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in (layer.rlora_A, layer.rlora_B, layer.rlora_router):
            for p in d.values():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def reference_forward(layer, x, A_init, B_init, config):
    """Explicit per-head loop of the paper's equations, in float64."""
    x = x.double()
    base = layer.get_base_layer()
    y = x @ base.weight.double().T
    if base.bias is not None:
        y = y + base.bias.double()
    n, r, s = config.num_heads, config.r, config.scaling
    per_head_down = config.down_projection == "per_head" and n > 1

    def down(A, i):  # head i's down projection: the shared A, or its own block A_i (LoRA-MoE)
        return A[i * r : (i + 1) * r] if per_head_down else A

    A = layer.rlora_A["default"].double()
    heads = layer.head_weights("default").double()  # (N, d_out, r)
    if n > 1:
        w = torch.softmax(x @ layer.rlora_router["default"].double().T, dim=-1)
    else:
        w = torch.ones(*x.shape[:-1], 1, dtype=torch.float64)
    for i in range(n):
        y = y + s * w[..., i : i + 1] * ((x @ down(A, i).T) @ heads[i].T)
    if config.uses_correction:
        heads0 = B_init.double().view(B_init.shape[0], n, r).permute(1, 0, 2)
        A0 = A_init.double()
        if config.correction == "mean" or n == 1:
            C = sum(heads0[i] @ down(A0, i) for i in range(n)) / n
            y = y - s * (x @ C.T)
        else:
            for i in range(n):
                y = y - s * w[..., i : i + 1] * ((x @ down(A0, i).T) @ heads0[i].T)
    return y


CASES = [(p, c, ri) for p in PRESETS for c in ("mean", "routed", "none") for ri in ("kaiming", "zero")]


@pytest.mark.parametrize("preset,correction,router_init", CASES)
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24), (2, 3, 4, 24)])
def test_forward_matches_per_head_reference_fp64(preset, correction, router_init, shape):
    heads = 1 if preset == "lora" else 4
    overrides = {"correction": correction} if "correction" not in PRESETS[preset] else {}
    config = RLoraConfig.from_preset(
        preset, r=3, num_heads=heads, alpha=6.0, head_dropout=0.2, router_init=router_init, **overrides
    )
    torch.manual_seed(0)
    layer = RLoraLinear(nn.Linear(24, 40), "default", config)
    A_init = layer.rlora_A["default"].detach().clone()
    B_init = layer.rlora_B["default"].detach().clone()
    perturb_(layer)
    layer = layer.double().eval()  # dropout off
    x = torch.randn(*shape, dtype=torch.float64)
    got = layer(x)
    want = reference_forward(layer, x, A_init, B_init, config)
    assert got.dtype == torch.float64 and got.shape == (*shape[:-1], 40)
    # The mean factor mean_i B_i0 is stored in fp32 (rounded once, ~6e-8 relative); all else is exact.
    tol = 1e-7 if config.uses_correction and (config.correction == "mean" or heads == 1) else 1e-10
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("head_init,correction", [("random", "mean"), ("random", "routed"), ("random", "none"),
                                                  ("zero", "none")])
def test_per_head_down_projection_matches_the_per_expert_loop_fp64(correction, head_init):
    """LoRA-MoE's structure (an A_i per head, one stacked GEMM) against the explicit loop over
    experts, with every correction when the heads start non-zero."""
    config = RLoraConfig(r=3, num_heads=3, alpha=6.0, head_dropout=0.2, head_init=head_init,
                         correction=correction, down_projection="per_head")
    torch.manual_seed(0)
    layer = RLoraLinear(nn.Linear(24, 40), "default", config)
    assert layer.rlora_A["default"].shape == (9, 24)  # N*r rows: a block per expert, drawn independently
    blocks = layer.rlora_A["default"].view(3, 3, 24)
    assert all(not torch.equal(blocks[i], blocks[j]) for i in range(3) for j in range(i))
    A_init = layer.rlora_A["default"].detach().clone()
    B_init = layer.rlora_B["default"].detach().clone()
    perturb_(layer)
    layer = layer.double().eval()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_forward(layer, x, A_init, B_init, config), rtol=1e-10, atol=1e-10)


def test_rslora_scaling():
    assert RLoraConfig(r=16, alpha=32).scaling == 2.0
    assert RLoraConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0


@pytest.mark.parametrize("d_in,d_out,gamma", [(512, 1024, 64.0), (1536, 576, 64.0), (768, 512, 16.0)])
def test_random_init_std_matches_paper_formula(d_in, d_out, gamma):
    layer, _ = make_layer(d_in, d_out, r=8, num_heads=4, gamma=gamma)
    c = d_out**0.25 / math.sqrt(gamma)
    A, B = layer.rlora_A["default"], layer.rlora_B["default"]
    assert A.dtype == B.dtype == torch.float32
    assert abs(A.std().item() / (c / math.sqrt(d_in)) - 1) < 0.05
    for head in layer.head_weights():  # every head, not just their union
        assert abs(head.std().item() / (c / math.sqrt(d_out)) - 1) < 0.05
    assert abs(A.mean().item()) < 0.1 * A.std().item()


def test_zero_init_heads_start_at_zero_and_need_no_correction():
    layer, _ = make_layer(head_init="zero", num_heads=3)
    assert torch.count_nonzero(layer.rlora_B["default"]) == 0
    assert "default" not in layer.rlora_A0 and "default" not in layer.rlora_B0
    assert layer.rlora_A["default"].abs().sum() > 0


def test_mean_correction_is_stored_as_rank_r_factors():
    layer, cfg = make_layer(d_in=24, d_out=40, r=3, num_heads=5, correction="mean")
    assert layer.rlora_A0["default"].shape == (3, 24)
    assert layer.rlora_B0["default"].shape == (40, 3)  # mean_i B_i, not N heads
    routed, _ = make_layer(d_in=24, d_out=40, r=3, num_heads=5, correction="routed")
    assert routed.rlora_B0["default"].shape == (40, 15)
    # correction buffers are not trainable
    assert all(not b.requires_grad for b in list(layer.rlora_A0.values()) + list(layer.rlora_B0.values()))


def test_base_weight_is_never_edited():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    w = base.weight.detach().clone()
    RLoraLinear(base, "default", RLoraConfig(r=4, num_heads=3))
    assert torch.equal(base.weight, w)


def _selector_layer(mode, p=0.5, n=3, r=16, down="shared"):
    """Heads wired so output block i reads head i's dropped r-vector: d_out = N*r, B_i = block identity."""
    cfg = RLoraConfig(r=r, num_heads=n, head_init="zero", head_dropout=p, dropout_mode=mode, router_init="zero",
                      down_projection=down)
    torch.manual_seed(0)
    layer = RLoraLinear(nn.Linear(8, n * r, bias=False), "default", cfg)
    with torch.no_grad():
        layer.get_base_layer().weight.zero_()
        layer.rlora_B["default"].copy_(torch.eye(n * r))
    return layer, cfg


@pytest.mark.parametrize("mode,down", [("per_head", "shared"), ("shared", "shared"), ("per_head", "per_head")])
def test_train_mode_dropout_masks_per_head_or_shared(mode, down):
    n, r, p = 3, 16, 0.5
    layer, cfg = _selector_layer(mode, p, n, r, down)
    x = torch.randn(64, 8)
    layer.train()
    out = layer(x).view(64, n, r)
    h = x @ layer.rlora_A["default"].T  # (64, r), or (64, N*r) with an A_i per head
    clean = (cfg.scaling / n) * (h.view(64, n, r) if down == "per_head" else h.unsqueeze(1))  # w_i = 1/N
    masks = (out / clean).round(decimals=4)  # 0 or 1/(1-p)
    assert set(masks.unique().tolist()) <= {0.0, round(1 / (1 - p), 4)}
    kept = (masks > 0).float()
    assert 0.35 < kept.mean() < 0.65
    differ = (kept[:, 0] != kept[:, 1]).any() or (kept[:, 1] != kept[:, 2]).any()
    if mode == "per_head":
        assert differ, "heads must get independent dropout masks"
    else:
        assert not differ, "shared mode must use one mask for all heads"


def test_eval_mode_is_deterministic_and_dropout_free():
    layer, cfg = _selector_layer("per_head")
    x = torch.randn(32, 8)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    h = x @ layer.rlora_A["default"].T
    torch.testing.assert_close(a.view(32, 3, 16), ((cfg.scaling / 3) * h).unsqueeze(1).expand(32, 3, 16))


def test_bf16_base_keeps_fp32_adapter_and_returns_base_dtype():
    torch.manual_seed(0)
    base = nn.Linear(32, 48).to(torch.bfloat16)
    config = RLoraConfig(r=4, num_heads=3, router_init="kaiming")  # a real (non-uniform) router
    layer = RLoraLinear(base, "default", config)
    for d in (layer.rlora_A, layer.rlora_B, layer.rlora_router, layer.rlora_A0, layer.rlora_B0):
        assert d["default"].dtype == torch.float32
    perturb_(layer)  # a trained adapter: a delta the size of the base output's
    A0, B0 = layer.rlora_A0["default"].clone(), layer.rlora_B0["default"]
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    layer.eval()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # fp64 reference of the adapter's delta on the bf16 input; base output as the bf16 layer gives it
    with torch.no_grad():
        plain = x.double() @ base.weight.double().T + base.bias.double()
        heads0 = B0.double().repeat(1, config.num_heads)  # the mean correction as N equal heads
        delta = reference_forward(layer, x, A0, heads0.float(), config) - plain
        expect = base(x).double() + delta
    # two bf16 roundings: the delta cast to bf16, then the sum: each at most eps/2 relative
    eps = torch.finfo(torch.bfloat16).eps
    bound = eps / 2 * (delta.abs() + expect.abs()) + 1e-6
    assert ((y.double() - expect).abs() <= bound).all()
    assert delta.abs().max() > 0.1  # the adapter's contribution is far above bf16 noise
    layer.train()
    layer(x).float().sum().backward()
    assert layer.rlora_A["default"].grad.dtype == torch.float32
    assert torch.isfinite(layer.rlora_B["default"].grad).all()
    assert layer.rlora_router["default"].grad.abs().sum() > 0


def test_to_dtype_keeps_adapters_fp32_and_moves_the_base():
    torch.manual_seed(0)
    layer = RLoraLinear(nn.Linear(16, 20), "default", RLoraConfig(r=4, num_heads=2))
    perturb_(layer)
    before = {n: t.detach().clone() for n, t in layer.state_dict().items() if "rlora_" in n}
    layer.to(torch.bfloat16)
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    after = {n: t for n, t in layer.state_dict().items() if "rlora_" in n}
    assert all(t.dtype == torch.float32 and torch.equal(t, before[n]) for n, t in after.items())
    assert layer(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    layer.half()
    assert layer.get_base_layer().weight.dtype == torch.float16 and layer.rlora_B["default"].dtype == torch.float32
    layer.double()  # up-casts apply (exact fp64 references)
    assert layer.get_base_layer().weight.dtype == torch.float64 and layer.rlora_B["default"].dtype == torch.float64


def test_merge_single_head_and_refuse_multi_head():
    torch.manual_seed(0)
    lin = nn.Linear(16, 20)
    layer = RLoraLinear(lin, "default", RLoraConfig.from_preset("lora", r=4))
    perturb_(layer)
    layer.eval()
    x = torch.randn(3, 16)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    multi = RLoraLinear(nn.Linear(16, 20), "default", RLoraConfig(num_heads=3))
    with pytest.raises(ValueError, match="cannot be merged"):
        multi.merge()


def test_merge_and_unmerge_with_the_correction_term():
    """A single random-init head keeps its frozen correction: merging folds s(BA - B0A0) into W."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 20)
    w0 = lin.weight.detach().clone()
    layer = RLoraLinear(lin, "default", RLoraConfig(num_heads=1, head_init="random", correction="mean"))
    assert "default" in layer.rlora_A0
    perturb_(layer)
    layer.eval()
    x = torch.randn(7, 16)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.get_base_layer()(x), before, atol=1e-5, rtol=1e-5)  # all in W now
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


def test_non_linear_target_is_rejected(tiny_llama_factory):
    model = tiny_llama_factory()
    with pytest.raises(TypeError, match="nn.Linear"):
        rlora.get_peft_model(model, RLoraConfig(target_modules=["embed_tokens"]))
