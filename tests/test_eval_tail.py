"""The eval stage's head start in the sweep's tail (eval.overlap): which trials are sure to be in the
final top-k (real MLflow store), and a real sweep whose stage starts while its last trial runs."""

import json
from pathlib import Path

import pytest

from tests.test_sweep import cli, mlflow_runs, sweep_yaml


def _store(tmp_path, trials):
    """A parent run and one child per (trial id, status, objective, tune.status tag or None)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp).info.run_id
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text("{}")
    for tid, status, acc, tune_status in trials:
        tags = {"mlflow.parentRunId": parent, "rlora.trial_id": tid, **({"tune.status": tune_status} if tune_status else {})}
        rid = client.create_run(exp, tags=tags).info.run_id
        if acc is not None:
            client.log_metric(rid, "eval/mean_acc", acc)
        client.log_artifact(rid, str(cfg), "adapter")
        if status != "RUNNING":
            client.set_terminated(rid, status)
    return client, client.get_run(parent)


def _certain(client, parent, top_k, expected, mode="max"):
    from eval.tail import certain_trials

    return [r.data.tags["rlora.trial_id"] for r in certain_trials(client, parent, "eval/mean_acc", mode, top_k, expected)]


def test_a_finished_trial_is_started_only_once_no_unsettled_trial_can_push_it_out_of_the_top_k(tmp_path):
    client, parent = _store(tmp_path, [
        ("a", "FINISHED", 0.70, None), ("b", "FINISHED", 0.60, None), ("c", "FINISHED", 0.65, "STOPPED"),
        ("d", "FAILED", None, None), ("e", "RUNNING", 0.99, None)])
    # 6 trials expected, 4 settled (a, b, c, d): e and one not yet created may still beat a and b
    assert _certain(client, parent, top_k=2, expected=6) == []
    assert _certain(client, parent, top_k=3, expected=6) == ["a"]
    assert _certain(client, parent, top_k=4, expected=6) == ["a", "b"]  # c was stopped early: never selected
    assert _certain(client, parent, top_k=3, expected=5) == ["a", "b"]  # only e unsettled
    assert _certain(client, parent, top_k=1, expected=5, mode="min") == []
    assert _certain(client, parent, top_k=2, expected=5, mode="min") == ["b"]


@pytest.mark.slow
def test_the_eval_stage_starts_in_the_sweeps_tail_and_scores_each_model_once(tmp_path, tiny_model_dir):
    # 3 configurations on 2 slots: the third starts when the first ends, and from then on the base
    # model and every finished trial (top_k covers all three) can be scored on the slot it freed
    ev = {"top_k": 3, "tasks": ["mmlu"], "limit": 1, "registry_name": "t-tail"}
    path = sweep_yaml(tmp_path, tiny_model_dir, search={"adapter.num_heads": {"grid": [2, 3, 4]}},
                      tune={"num_samples": 1, "search_alg": "grid", "max_concurrent_trials": 2}, eval_=ev)
    proc = cli([str(path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval stage, in the sweep's tail: scoring base" in proc.stdout
    client, parents, children = mlflow_runs(tmp_path)
    parent = parents[0]
    summary = json.loads((Path(parent.data.tags["sweep_dir"]) / "eval" / "eval_stage.json").read_text())
    assert "base" in summary["tail"] and len(summary["tail"]) >= 2, summary["tail"]  # base and >= 1 trial
    assert not summary["failed"] and len(summary["rows"]) == 4
    last_trial_end = max(c.info.end_time for c in children)  # ms
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_name = {r.data.tags.get("rlora.trial_id", "base" if r.data.tags.get("rlora.eval_role") == "base" else None): r
               for r in runs}
    early = set()
    for name in summary["tail"]:
        rid = by_name[name].info.run_id
        assert len(client.get_metric_history(rid, "mmlu/avg")) == 1  # the stage after the sweep did not score it again
        wall = client.get_metric_history(rid, "eval/wall_s")[0]
        if wall.timestamp - 1000 * wall.value < last_trial_end:  # its scoring began while a trial still ran
            early.add(name)
    # the base model and the first finished trial were started when the last trial started, and ran
    # on the slot the second trial freed; the last trial itself can only be scored after it ended
    assert "base" in early and len(early) >= 2, (early, summary["tail"])
    for name in {"base", *(c.data.tags["rlora.trial_id"] for c in children)} - set(summary["tail"]):
        assert len(client.get_metric_history(by_name[name].info.run_id, "mmlu/avg")) == 1
    assert len(client.search_model_versions("name='t-tail'")) == 3


def test_the_base_model_starts_in_the_tail_only_where_a_trial_has_long_enough_left():
    """The base model's held-out scoring takes a freed slot in the tail only if a trial still running
    is expected (median time of the ended trials, less its own so far) to go on >= 10 s; a callback
    pickled without the tail's fields (an earlier version's, on --resume) still works."""
    import pickle
    import time

    from ray.tune.experiment import Trial

    from pipeline.tail import TailStart

    class Base:
        starts = 0

        def start(self):
            Base.starts += 1

    def sweep_tail(last_started_s_ago: float) -> int:
        Base.starts = 0
        trials = [Trial("t", stub=True) for _ in range(3)]
        cb = TailStart(expected_trials=3, tail=None, base=Base())
        for t in trials:
            t.status = "RUNNING"
            cb.on_trial_start(0, trials, t)
        now = time.time()
        cb.began.update({trials[0].trial_id: now - 60, trials[1].trial_id: now - 59,
                         trials[2].trial_id: now - last_started_s_ago})
        cb.on_trial_complete(0, trials, trials[0])  # took ~60 s: trial 1 has ~1 s left, trial 2 60 - x
        return Base.starts

    assert sweep_tail(last_started_s_ago=5) == 1  # ~55 s left: scored in the tail
    assert sweep_tail(last_started_s_ago=55) == 0  # ~5 s left: in the driver after the trials, on every CPU
    cb = TailStart(expected_trials=3, tail=None, base=Base())
    assert pickle.loads(pickle.dumps(cb)).base is None
    old = TailStart.__new__(TailStart)
    old.__setstate__({"expected_trials": 3, "tail": None, "started": True})
    trial = Trial("t", stub=True)
    old.on_trial_start(0, [trial], trial)
    old.on_trial_complete(0, [trial], trial)
    assert old.took and old.base is None


def test_the_tail_begins_at_a_trial_end_after_the_last_trial_started_never_at_that_start():
    """At the last trial's start its Train worker group has yet to claim its slot: an eval actor
    started then could take it (make sweep once timed out the worker group ten times). Real Tune
    trials (stub mode) go through the callback; the tail records when it is asked to start."""
    from ray.tune.experiment import Trial

    from pipeline.tail import TailStart

    class Recorder:
        calls = 0

        def update(self):
            Recorder.calls += 1
            return []

    trials = [Trial("t", stub=True) for _ in range(3)]
    cb = TailStart(expected_trials=3, tail=Recorder())
    trials[0].status = trials[1].status = "RUNNING"
    cb.on_trial_start(0, trials[:2], trials[1])  # 2 of 3 trials exist: the sweep is not in its tail
    cb.on_trial_start(0, trials, trials[1])  # all 3 exist, the third waits for a slot: not either
    cb.on_trial_complete(0, trials, trials[0])  # a trial ends while the third still waits (PENDING)
    assert Recorder.calls == 0
    cb.on_trial_start(0, trials, trials[2])  # the last trial starts: still nothing
    assert Recorder.calls == 0
    trials[2].status = "RUNNING"
    cb.on_trial_complete(0, trials, trials[1])
    cb.on_trial_error(0, trials, trials[2])
    assert Recorder.calls == 2
    import pickle

    assert pickle.loads(pickle.dumps(cb)).tail is None  # Tune stores callbacks: the tail stays out


def test_a_pending_placement_group_holds_the_tail_back(tmp_path):
    """While a placement group waits for resources (a trial's worker group claiming its slot) the
    tail starts nothing; a real 1-CPU Ray instance with a 2-CPU group that cannot be placed."""
    import ray
    from ray.util import placement_group, remove_placement_group

    from pipeline.tail import pending_placement_groups

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ready = placement_group([{"CPU": 1}])
        ray.get(ready.ready(), timeout=60)
        assert not pending_placement_groups()
        remove_placement_group(ready)
        pending = placement_group([{"CPU": 2}])
        assert not pending.wait(timeout_seconds=1)
        assert pending_placement_groups()
        remove_placement_group(pending)
        assert not pending_placement_groups()
    finally:
        ray.shutdown()
