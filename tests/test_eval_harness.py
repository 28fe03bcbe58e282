"""Eval workers: one base model, adapters swapped on it; parallel Ray actors; held-out tasks."""

import os

import pytest
import torch

from eval.harness import EvalJob, EvalSettings, Evaluator, evaluate_jobs
from eval.results import flatten_scores, metric_name
from eval.task_names import resolve_tasks

N = 12


def make_adapter(model_dir, out, seed):
    """A saved R-LoRA adapter whose heads have been moved off their init (so it changes outputs)."""
    import rlora
    from pipeline.model.base import load_model

    base, _ = load_model(str(model_dir))
    torch.manual_seed(seed)
    model = rlora.get_peft_model(base, rlora.RLoraConfig(r=4, num_heads=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "rlora_B" in n:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, d / f"a{i}", seed=i) for i in range(2)]


def settings_for(model_dir, **kw):
    return EvalSettings(model=str(model_dir), tasks=("rlora_heldout_sst2", "rlora_heldout_boolq"), limit=N, **kw)


def base_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_swap_on_one_base_without_leaking(tiny_model_dir, adapters):
    from pipeline.model.base import load_model

    ev = Evaluator(settings_for(tiny_model_dir), device="cpu")
    ids = torch.arange(1, 17)[None]
    fresh, _ = load_model(str(tiny_model_dir))
    base1 = ev.evaluate(EvalJob("base"))
    a0 = ev.evaluate(EvalJob("a0", adapters[0]))
    a1 = ev.evaluate(EvalJob("a1", adapters[1]))
    base2 = ev.evaluate(EvalJob("base"))
    assert not any(r["error"] for r in (base1, a0, a1, base2))
    assert base1["scores"] == base2["scores"]
    assert set(base1["scores"]) == {"heldout/sst2", "heldout/boolq", "heldout/sst2_stderr", "heldout/boolq_stderr"}
    # lm-eval's standard error is the hand-computed one, and the per-question table agrees with the score
    ex = a0["examples"]
    assert len(ex) == 2 * N and not ex.duplicated(["task", "example_id"]).any()
    for task in ("sst2", "boolq"):
        p = a0["scores"][f"heldout/{task}"]
        assert ex[ex["task"] == f"heldout/{task}"]["correct"].mean() == pytest.approx(p)
        assert a0["scores"][f"heldout/{task}_stderr"] == pytest.approx((p * (1 - p) / (N - 1)) ** 0.5)
    assert ((ex["margin"] > 0) == (ex["correct"] == 1)).all()
    # the unloaded model is the untouched base, bit for bit
    assert torch.equal(base_logits(ev.base, ids), base_logits(fresh, ids))
    assert not any("rlora" in n for n, _ in ev.base.named_modules())
    # an adapter scored after another one scores as it does on a fresh worker
    alone = Evaluator(settings_for(tiny_model_dir), device="cpu").evaluate(EvalJob("a1", adapters[1]))
    assert alone["scores"] == a1["scores"]
    assert base1["n_samples"] == {"rlora_heldout_sst2": N, "rlora_heldout_boolq": N}


def test_bad_adapter_is_reported_not_raised(tiny_model_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    res = Evaluator(settings_for(tiny_model_dir), device="cpu").evaluate(EvalJob("broken", str(tmp_path)))
    assert res["error"] and res["scores"] == {}


@pytest.mark.slow
def test_parallel_ray_workers_match_in_process_results(tiny_model_dir, adapters, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    settings = settings_for(tiny_model_dir)
    jobs = [EvalJob("base"), EvalJob("a0", adapters[0]), EvalJob("broken", str(tmp_path)), EvalJob("a1", adapters[1])]
    results = evaluate_jobs(settings, jobs, max_workers=2, progress=False)
    assert [r["name"] for r in results] == ["base", "a0", "broken", "a1"]
    assert results[2]["error"] and all(r["error"] is None for i, r in enumerate(results) if i != 2)
    assert len({r["pid"] for r in results}) == 2 and os.getpid() not in {r["pid"] for r in results}
    local = Evaluator(settings, device="cpu")
    for r, job in zip(results, jobs):
        if job.name != "broken":
            assert r["scores"] == local.evaluate(job)["scores"], job.name


@pytest.mark.slow
def test_a_set_stop_event_cancels_unfinished_jobs_and_kills_the_actors(tiny_model_dir, adapters):
    """What the sweep's tail does on Ctrl-C (eval.tail_eval.TailEval.cancel): with the stop event set,
    evaluate_jobs scores nothing (every job marked cancelled) and none of its actors is left alive."""
    import threading
    import time

    from ray.util.state import list_actors

    stop = threading.Event()
    stop.set()
    jobs = [EvalJob("base"), *(EvalJob(f"a{i}", adapters[i % 2]) for i in range(4))]
    from pipeline.runtime import ensure_ray

    ensure_ray()
    results = evaluate_jobs(settings_for(tiny_model_dir), jobs, max_workers=2, progress=False, stop=stop)
    assert [r["error"] for r in results] == ["cancelled"] * 5
    deadline = time.time() + 30
    import ray

    gcs = ray.get_runtime_context().gcs_address  # this test's Ray, not any other on the machine
    while (alive := list_actors(address=gcs, filters=[("class_name", "=", "Evaluator"), ("state", "=", "ALIVE")])) \
            and time.time() < deadline:
        time.sleep(1)
    assert not alive


@pytest.mark.slow
def test_an_actor_with_no_job_left_frees_its_slot_while_the_others_still_run(tiny_model_dir, adapters):
    """2 short jobs and a long one on 2 actors: once the queue is empty an actor that finished is
    killed at once, so its slot is free for another pool (the stage beside its tail) while the long
    job still runs: one snapshot of Ray's state API shows one of the call's actors dead and another
    still alive. (Kept alive to the end, no Evaluator would die before the call returns.)"""
    import threading
    import time

    import ray
    from ray.util.state import list_actors

    from pipeline.runtime import ensure_ray

    ensure_ray()
    gcs = ray.get_runtime_context().gcs_address
    before = {a.actor_id for a in list_actors(address=gcs, filters=[("class_name", "=", "Evaluator")], limit=1000)}
    import dataclasses

    long = dataclasses.replace(settings_for(tiny_model_dir), limit=8 * N)
    jobs = [EvalJob("base"), EvalJob("a0", adapters[0]), EvalJob("a1", adapters[1], settings=long)]
    out: dict = {}
    run = threading.Thread(target=lambda: out.update(
        results=evaluate_jobs(settings_for(tiny_model_dir), jobs, max_workers=2, progress=False)))
    run.start()
    dead_beside_alive = False  # one of this call's actors seen dead while another still runs
    while run.is_alive() and not dead_beside_alive:
        mine = [a for a in list_actors(address=gcs, filters=[("class_name", "=", "Evaluator")], limit=1000)
                if a.actor_id not in before]
        states = {a.state for a in mine}
        dead_beside_alive = "DEAD" in states and "ALIVE" in states
        time.sleep(0.2)
    run.join()
    assert [r["error"] for r in out["results"]] == [None] * 3
    assert dead_beside_alive


def test_held_out_task_matches_the_training_loops_scoring(tiny_model_dir):
    """lm-eval's rlora_heldout_<task> predicts exactly what pipeline.model.scoring (the training loop's
    held-out eval) predicts, example by example."""
    from pipeline.data.tasks import task_splits
    from pipeline.model.scoring import continuation_logprobs

    ev = Evaluator(EvalSettings(str(tiny_model_dir), ("rlora_heldout_piqa", "rlora_heldout_siqa"), limit=N,
                                num_fewshot=0, batch_size=8))
    res = ev.run(None, log_samples=True)
    model, tok = ev.base, ev.tok
    for task in ("piqa", "siqa"):
        held = task_splits(task)[1][:N]
        lls = continuation_logprobs(model, tok, [(e.prompt, c) for e in held for c in e.choices])
        ours, k = [], 0
        for e in held:
            ours.append(max(range(len(e.choices)), key=lambda i: lls[k + i][0]))
            k += len(e.choices)
        samples = sorted(res["samples"][f"rlora_heldout_{task}"], key=lambda x: x["doc_id"])
        theirs = [max(range(len(x["filtered_resps"])), key=lambda i: x["filtered_resps"][i][0]) for x in samples]
        assert theirs == ours, task
        acc = sum(p == e.gold for p, e in zip(ours, held)) / len(held)
        assert res["results"][f"rlora_heldout_{task}"]["acc,none"] == pytest.approx(acc)
        assert flatten_scores(res["results"])[f"heldout/{task}"] == pytest.approx(acc)


def test_stock_names_pass_through_and_unknown_ones_fail_in_one_line():
    assert resolve_tasks(["bbh", "mmlu", "bbh_zeroshot", "mmlu_continuation"], "stock") == [
        "bbh", "mmlu", "bbh_zeroshot", "mmlu_continuation"]
    with pytest.raises(ValueError, match="'no_such_task' is not an lm-eval task"):
        resolve_tasks(["bbh", "no_such_task"], "stock")
    with pytest.raises(ValueError, match="no offline version"):
        resolve_tasks(["hellaswag"], "local")


def test_the_project_index_builds_every_offline_task_as_the_full_index_does():
    """Eval workers index only the project's task files (not lm-eval's ~15,000 stock configs): every
    offline task and group builds from that index with the same configuration as from the full one,
    and a job that names a stock task gets the full index."""
    from eval.harness import task_manager, task_manager_for
    from pipeline.data.eval_names import local_names

    lean, full = task_manager(), task_manager(stock=True)
    assert len(full.all_tasks) > 20 * len(lean.all_tasks)
    for name in sorted(set(local_names().values())):
        a, b = lean.load([name]), full.load([name])
        assert sorted(a["tasks"]) == sorted(b["tasks"]), name
        assert all(a["tasks"][k].config.to_dict() == b["tasks"][k].config.to_dict() for k in b["tasks"]), name
    assert task_manager_for(["rlora_mmlu", "rlora_heldout_sst2"]) is lean
    assert task_manager_for(["rlora_mmlu", "arc_easy"]) is full


def test_local_names_of_every_family():
    assert resolve_tasks(["bbh", "bbh_zeroshot", "heldout_five_task", "mmlu", "mmlu_continuation"], "local") == [
        "rlora_bbh", "rlora_bbh_zeroshot", "rlora_heldout_five_task", "rlora_mmlu", "rlora_mmlu_continuation"]


@pytest.mark.parametrize("task, metric", [
    ("rlora_bbh", "bbh/avg"),
    ("rlora_bbh::rlora_bbh_navigate", "bbh/navigate"),
    ("rlora_bbh_fewshot_navigate", "bbh_fewshot/navigate"),
    ("rlora_bbh_zeroshot", "bbh_zeroshot/avg"),
    ("rlora_heldout_five_task", "heldout/five_task"),
    ("rlora_heldout_five_task::rlora_heldout_sst2", "heldout/sst2"),
    ("rlora_mmlu", "mmlu/avg"),
    ("rlora_mmlu_stem", "mmlu/stem"),
    ("rlora_mmlu::rlora_mmlu_social_sciences", "mmlu/social_sciences"),
    ("rlora_mmlu_anatomy", "mmlu/anatomy"),
    ("rlora_mmlu_continuation_anatomy", "mmlu_continuation/anatomy"),
    # stock lm-eval names land on the same metric names
    ("bbh::bbh_cot_fewshot_navigate", "bbh/navigate"),
    ("mmlu_continuation", "mmlu_continuation/avg"),
    ("mmlu_continuation_anatomy", "mmlu_continuation/anatomy"),
    ("mmlu_anatomy", "mmlu/anatomy"),
    ("hellaswag", None),
])
def test_metric_names(task, metric):
    assert metric_name(task) == metric


@pytest.mark.parametrize("args, msg", [
    (["--adapter", "/no/such/dir", "--tasks", "mmlu"], "--adapter: '/no/such/dir' is neither"),
    (["--adapter", "sweeps", "--tasks", "mmlu"], "--adapter: sweeps has no adapter_config.json (nor a full model's"),
    (["--adapter", "none", "--tasks", "mmlu,hellaswag"], "--tasks: 'hellaswag' has no offline version"),
    (["--sweep", "0" * 32], "--sweep: " + "0" * 32 + " is not a sweep parent run"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, msg, capsys, monkeypatch):
    from pathlib import Path

    from eval.run import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    capsys.readouterr()
    assert main([*args, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err  # (MLflow's own INFO lines when it creates the store come first)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err
