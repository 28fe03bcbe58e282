"""The training-step benchmark: every method variant builds and steps, and its cost ratios carry a
range that decides whether a difference is resolved."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ratio_range_from_quartiles_decides_resolved():
    from benchmarks.train_step import add_ratio

    ref = {"step_s": 1.0, "step_s_q1": 0.9, "step_s_q3": 1.1}
    slower = {"step_s": 1.5, "step_s_q1": 1.4, "step_s_q3": 1.6}
    overlapping = {"step_s": 1.05, "step_s_q1": 0.95, "step_s_q3": 1.2}
    for row in (ref, slower, overlapping):
        add_ratio(row, ref, "x")
    assert abs(slower["x_lo"] - 1.4 / 1.1) < 1e-12 and abs(slower["x_hi"] - 1.6 / 0.9) < 1e-12
    assert slower["x_lo"] <= slower["x"] <= slower["x_hi"] and slower["x_resolved"]
    assert overlapping["x_lo"] < 1.0 < overlapping["x_hi"] and not overlapping["x_resolved"]
    assert ref["x"] == 1.0 and not ref["x_resolved"] and ref["x_range"] == "–"


def test_method_variants_step_on_a_tiny_architecture(tmp_path):
    out = tmp_path / "ts.json"
    variants = ["base", "peft_adalora", "peft_ia3", "peft_prompt_tuning", "peft_prefix_tuning", "rlora_N3", "lora_moe_N3",
                "full"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--model", "arch:tiny", "--batch", "2",
                           "--seq", "16", "--steps", "3", "--variants", ",".join(variants), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == variants
    ref = rows["rlora_N3"]
    for r in rows.values():  # by hand from the 3 measured step times: quartiles of 3 values, the median
        t = r["step_times_s"]  # step and its tokens/s, the ratio to R-LoRA and its range from the quartiles
        assert len(t) == 3 and (r["step_s_q1"], r["step_s"], r["step_s_q3"]) == (min(t), statistics.median(t), max(t))
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / statistics.median(t))
        assert r["step_vs_rlora_N3"] == pytest.approx(statistics.median(t) / statistics.median(ref["step_times_s"]))
        assert r["step_vs_rlora_N3_lo"] == pytest.approx(min(t) / max(ref["step_times_s"]))
        assert r["step_vs_rlora_N3_hi"] == pytest.approx(max(t) / min(ref["step_times_s"]))
    # trainable parameters as built: LoRA-MoE has N down projections where R-LoRA shares one
    assert rows["lora_moe_N3"]["trainable_params"] > rows["rlora_N3"]["trainable_params"]
    assert rows["peft_ia3"]["trainable_params"] < rows["rlora_N3"]["trainable_params"]
    # 20 virtual tokens of width 64; prefix tuning: a key and a value of 2 kv heads x 16 per token and layer
    assert rows["peft_prompt_tuning"]["trainable_params"] == 20 * 64
    assert rows["peft_prefix_tuning"]["trainable_params"] == 20 * 2 * 2 * 32
    # full fine-tuning trains every weight of the architecture (the tied embedding once)
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.train_step import MODEL_ARCHS

    kind, kw = MODEL_ARCHS["tiny"]
    n_arch = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kw)).parameters())
    assert rows["full"]["trainable_params"] == n_arch


def test_the_profiled_split_is_not_moved_by_one_disturbed_step():
    """A step the machine stalls once (here: one step does 1000 extra full-width passes) leaves the
    per-step split where the other steps put it."""
    import torch

    from benchmarks.layer_breakdown import profile_split

    d, tokens = 64, 32
    x = torch.randn(tokens, d)
    calls = []

    def step():
        calls.append(1)
        for _ in range(1000 if len(calls) == 3 else 1):
            x.add(1.0)

    clean = profile_split(lambda: x.add(1.0), d, tokens, iters=5)["full_width"]
    split = profile_split(step, d, tokens, iters=5)
    assert split["full_width"] < 3 * clean, (split, clean)


def test_layer_breakdown_puts_the_adapter_time_in_its_categories():
    """The frozen base has no adapter GEMM and no full-width add; the fused layer has both, and its
    per-head dropout and router show up as small element-wise work the base does not do."""
    from benchmarks.layer_breakdown import breakdown_row

    row = breakdown_row(d=128, tokens=256, n=3, r=4, pairs=3, prof_iters=5)
    assert row["base_adapter_gemm_ms"] == 0 < row["fused_adapter_gemm_ms"]
    assert row["base_full_width_ms"] < row["fused_full_width_ms"]
    assert row["base_small_elem_ms"] < row["fused_small_elem_ms"]
    # the base GEMMs are the same ops on the same shapes in both (forward + input gradient)
    assert row["base_base_gemm_ms"] > 0 and row["fused_base_gemm_ms"] > 0
    assert row["fused_vs_base_q1"] <= row["fused_vs_base"] <= row["fused_vs_base_q3"] and row["pairs"] == 3
    assert row["overhead_adapter_gemm"] > 0 and row["overhead_full_width"] > 0 and row["overhead_small_elem"] > 0
    assert 1.0 < row["floor_vs_base"] < row["profiled_fused_vs_base"]
