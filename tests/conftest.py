import os

import pytest
import torch

pytest_plugins = ["suite_times"]  # per-test durations to a file, time per file at the end

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def init_gloo(rank: int, world: int, init_file: str, timeout_s: float = 120.0):
    """A spawned test rank joins a gloo group on loopback; a collective that never completes raises
    after `timeout_s` instead of the default 30 min, and the rank's stacks are dumped to stderr
    (shown by pytest) shortly before, so a hang in CI is diagnosable."""
    import datetime
    import faulthandler

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # never a hostname that resolves off-machine
    faulthandler.dump_traceback_later(timeout_s - 10, exit=False)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def spawn_ranks(fn, args, nprocs: int = 2, timeout_s: float = 240.0):
    """torch.multiprocessing.spawn with a deadline: ranks still running after `timeout_s` fail the
    test, and no rank outlives the call (a live non-daemonic child would hang pytest at exit)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=2):  # raises ProcessRaisedException / ProcessExitedException
            if time.monotonic() > deadline:
                pytest.fail(f"{nprocs} spawned ranks still running after {timeout_s:.0f} s", pytrace=False)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(10)


def pytest_unconfigure(config):
    """A child process a failed test left alive must not keep the interpreter from exiting
    (multiprocessing joins its non-daemonic children at exit)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
        child.join(10)


@pytest.fixture
def tiny_llama_factory():
    """Returns make(seed=0, dtype=float32) -> a fresh tiny Llama with deterministic weights."""
    from transformers import LlamaForCausalLM

    def make(seed: int = 0, dtype=torch.float32, **overrides):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**overrides))
        return model.to(dtype).eval()

    return make


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 96, (3, 12), generator=g)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (2 layers, hidden 64) with the embedded SmolLM2 tokenizer, saved as an HF dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.model.base import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module's in-process sweeps, runs and eval workers, started as the pipeline
    starts it (``ensure_ray``): a Ray start costs seconds of wall time and more of CPU (its dashboard
    processes), so the module's tests share one instead of each starting and stopping their own."""
    from pipeline.runtime import ensure_ray

    ensure_ray(quiet=True)
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(autouse=True, scope="module")
def _ray_shut_down_after_module():
    """Tests that start Ray in-process (eval workers) leave no cluster behind for the next module."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
