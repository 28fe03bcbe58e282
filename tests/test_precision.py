"""train.precision, gradient accumulation and activation checkpointing, in process on the tiny Llama."""

import math

import pytest
import torch

import rlora
from pipeline.data.encoding import IGNORE
from pipeline.train.step import accumulate_gradients, enable_gradient_checkpointing


def adapted(tiny_llama_factory, dropout=0.0, seed=0, **over):
    base = tiny_llama_factory(seed=seed, **over)
    torch.manual_seed(seed + 1)
    cfg = rlora.RLoraConfig.from_preset("rlora", r=4, num_heads=3, head_dropout=dropout)
    model = rlora.get_peft_model(base, cfg)
    with torch.no_grad():  # trained-looking adapters: the heads and router away from their init
        g = torch.Generator().manual_seed(seed + 2)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def batches(sizes_and_lengths, seed=0, vocab=96):
    """Right-padded causal-LM batches whose answer spans (the loss tokens) differ in length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in sizes_and_lengths:
        width = max(n for n, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (n, n_answer) in enumerate(rows):
            ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
            labels[i, n - n_answer:n] = ids[i, n - n_answer:n]
            mask[i, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def concat(parts):
    """The micro-batches as one batch (padded to the widest)."""
    width = max(b["input_ids"].shape[1] for b in parts)
    pad = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE}
    return {k: torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1]), value=pad[k]) for b in parts])
            for k in pad}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


ROWS = [[(10, 2), (7, 5)], [(12, 9)], [(5, 1), (11, 3), (9, 6)]]  # 7, 9 and 10 answer tokens


def test_accumulating_micro_batches_equals_one_larger_batch(tiny_llama_factory):
    """k micro-batches of unequal answer lengths accumulate to the gradient (and loss) of one batch
    holding all of them: each micro-loss is divided by the answer tokens of the whole step."""
    micro = batches(ROWS)
    model = adapted(tiny_llama_factory)
    loss_k, tokens_k = accumulate_gradients(model, micro, "cpu", "fp32")
    g_k = grads(model)
    model.zero_grad(set_to_none=True)
    loss_1, tokens_1 = accumulate_gradients(model, [concat(micro)], "cpu", "fp32")
    g_1 = grads(model)
    assert loss_k == pytest.approx(loss_1, rel=1e-5)
    assert tokens_k == tokens_1 == sum(n for rows in ROWS for n, _ in rows)
    assert g_k.keys() == g_1.keys() and len(g_k) > 0
    for name in g_k:
        torch.testing.assert_close(g_k[name], g_1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mean_of_micro_batch_means_would_not_equal_the_larger_batch(tiny_llama_factory):
    """The check above can fail: averaging each micro-batch's own mean loss (the naive accumulation)
    weights tokens unequally, and these micro-batches are built so it shows."""
    micro = batches(ROWS)
    model = adapted(tiny_llama_factory)
    for b in micro:
        (model(**b).loss / len(micro)).backward()
    naive = grads(model)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [concat(micro)], "cpu", "fp32")
    exact = grads(model)
    worst = max(((naive[n] - exact[n]).norm() / exact[n].norm()).item() for n in exact)
    assert worst > 1e-2


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_same_gradients_less_saved_activation(tiny_llama_factory, dropout):
    """Checkpointing recomputes the base's activations in backward: gradients equal (with dropout too:
    the recomputation replays the forward's RNG, so the per-head masks are the same), and far fewer
    activation bytes are kept for backward."""
    from benchmarks.common import saved_activation_bytes

    batch = batches([[(12, 6), (9, 4)]])[0]

    def run(checkpointing):
        model = adapted(tiny_llama_factory, dropout=dropout, num_hidden_layers=4)
        if checkpointing:
            enable_gradient_checkpointing(model.get_base_model())
        torch.manual_seed(7)
        box = {}

        def forward():
            box["loss"] = model(**batch).loss
            return box["loss"]

        saved = saved_activation_bytes(forward)
        box["loss"].backward()
        return saved, box["loss"].item(), grads(model)

    saved_plain, loss_plain, g_plain = run(False)
    saved_ckpt, loss_ckpt, g_ckpt = run(True)
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)


class _SoftmaxDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtype of every softmax input while active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "softmax":
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_mixed_runs_matmuls_in_bf16_router_softmax_and_master_weights_fp32(tiny_llama_factory):
    """Under autocast (CPU here, CUDA alike) the adapter's GEMMs run in bf16, so the output moves off
    the fp32 result by about bf16's rounding; the router softmax still sees fp32 logits; gradients and
    optimizer updates land on fp32 adapter weights."""
    from pipeline.model.precision import autocast

    batch = batches([[(12, 6), (9, 4)]])[0]
    model = adapted(tiny_llama_factory).eval()
    with torch.no_grad():
        ref = model(**batch).logits
        spy = _SoftmaxDtypes()
        with autocast("bf16-mixed", "cpu"), spy:
            mixed = model(**batch).logits
    rel = ((mixed.float() - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 3e-2, rel  # bf16 arithmetic happened, and only bf16 rounding apart
    assert spy.seen == [torch.float32] * (2 * 7), spy.seen  # one router per adapted projection (SDPA attention)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss, _ = accumulate_gradients(model, [batch], "cpu", "bf16-mixed")
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trained)
    opt.step()
    assert all(p.dtype == torch.float32 for p in trained)
    assert math.isfinite(loss), loss  # (nan and inf both fail)


def test_precision_settings_load_and_autocast():
    from pipeline.config.run import load_run_config
    from pipeline.model.precision import autocast, load_dtype

    assert [load_dtype(p) for p in ("fp32", "bf16-mixed", "bf16")] == ["float32", "float32", "bfloat16"]
    with autocast("bf16-mixed", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    for p in ("fp32", "bf16"):
        with autocast(p, "cpu"):
            assert not torch.is_autocast_enabled("cpu")
    # earlier configs said train.dtype: they still load, as the precision they meant
    assert load_run_config(None, ["train.dtype=bfloat16"]).train.precision == "bf16"
    assert load_run_config(None, ["train.dtype=float32"]).train.precision == "fp32"


def _tiny_factory(seed=0, **over):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**over)).eval()


def _ddp_rank(rank, world, init_file, out_dir, sync_each):
    import pickle
    from pathlib import Path

    import torch.distributed as dist
    from conftest import init_gloo
    from torch.nn.parallel import DistributedDataParallel

    init_gloo(rank, world, init_file)
    try:
        torch.set_num_threads(1)
        model = DistributedDataParallel(adapted(_tiny_factory))
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(1)
            fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        model.register_comm_hook(None, counting_allreduce)
        micro = batches(ROWS[:2] if rank == 0 else ROWS[1:], seed=rank)
        accumulate_gradients(model, micro, "cpu", "fp32", sync_each=sync_each)
        buckets_per_step, g = len(calls), grads(model.module)
        calls.clear()
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, [concat(micro)], "cpu", "fp32")
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps({"calls_accum": buckets_per_step,
                                                                       "calls_one": len(calls), "grads": g}))
    finally:
        dist.destroy_process_group()


def test_ddp_accumulation_all_reduces_once_per_step(tmp_path):
    """Two gloo ranks accumulating two micro-batches each: the inner micro-step runs in DDP's
    no_sync, so a step all-reduces as often as one with a single batch (not once per micro-batch),
    and the gradient equals the average of the ranks' one-batch gradients."""
    import pickle

    from conftest import spawn_ranks

    spawn_ranks(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path), False))
    out = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1)]
    for o in out:
        assert o["calls_one"] > 0 and o["calls_accum"] == o["calls_one"]
    # the step's gradient: every rank holds the same all-reduced one; recompute it in one process
    model = adapted(_tiny_factory)
    expected = {}
    for rank, rows in ((0, ROWS[:2]), (1, ROWS[1:])):
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, [concat(batches(rows, seed=rank))], "cpu", "fp32")
        for n, g in grads(model).items():
            expected[n] = expected.get(n, 0) + g / 2
    for n in expected:
        torch.testing.assert_close(out[0]["grads"][n], expected[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(out[1]["grads"][n], expected[n], rtol=1e-4, atol=1e-6, msg=n)
