"""The eval stage's head start in the sweep's tail (eval.overlap): which trials are sure to be in the
final top-k (real MLflow store), when the tail starts (Tune's callback with real stub trials), and a
pending placement group holding it back. A real sweep whose stage starts while its last trial runs is
the smoke sweep of test_sweep.py (``test_the_eval_stage_starts_in_the_sweeps_tail...``)."""

import pytest


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
    from eval.tail_eval import certain_trials

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


def test_the_base_model_starts_in_the_tail_only_where_a_trial_has_long_enough_left():
    """The base model's held-out scoring takes a freed slot in the tail only if a trial still running
    is expected (median time of the ended trials, less its own so far) to go on >= 10 s; a callback
    pickled without the tail's fields (an earlier version's, on --resume) still works."""
    import pickle
    import time

    from ray.tune.experiment import Trial

    from pipeline.sweep.tail import TailStart

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


class CountingTail:
    """Stands in for the eval stage's tail: counts how often the callback asks it to start."""

    def __init__(self):
        self.calls = 0

    def update(self):
        self.calls += 1
        return []


def test_the_tail_begins_at_a_trial_end_after_the_last_trial_started_never_at_that_start():
    """At the last trial's start its Train worker group has yet to claim its slot: an eval actor
    started then could take it (make sweep once timed out the worker group ten times). Real Tune
    trials (stub mode) go through the callback; the tail records when it is asked to start."""
    from ray.tune.experiment import Trial

    from pipeline.sweep.tail import TailStart

    trials = [Trial("t", stub=True) for _ in range(3)]
    tail = CountingTail()
    cb = TailStart(expected_trials=3, tail=tail)
    trials[0].status = trials[1].status = "RUNNING"
    cb.on_trial_start(0, trials[:2], trials[1])  # 2 of 3 trials exist: the sweep is not in its tail
    cb.on_trial_start(0, trials, trials[1])  # all 3 exist, the third waits for a slot: not either
    cb.on_trial_complete(0, trials, trials[0])  # a trial ends while the third still waits (PENDING)
    assert tail.calls == 0
    cb.on_trial_start(0, trials, trials[2])  # the last trial starts: still nothing
    assert tail.calls == 0
    trials[2].status = "RUNNING"
    cb.on_trial_complete(0, trials, trials[1])
    cb.on_trial_error(0, trials, trials[2])
    assert tail.calls == 2
    import pickle

    assert pickle.loads(pickle.dumps(cb)).tail is None  # Tune stores callbacks: the tail stays out


@pytest.mark.parametrize("slot_at_start", [True, False], ids=["in_trial", "ray_train"])
def test_trials_that_end_together_start_the_tail_once_the_last_trial_is_under_way(slot_at_start):
    """Two trials of equal length end together and the last trial takes one of their slots: no trial
    ends after it started but its own, so the tail begins at Tune's next loop step once it holds its
    slot (from its start when trained in its trial's process; through Ray Train, once it has reported,
    its worker group having claimed the slot), not at its end, and only once."""
    from ray.tune.experiment import Trial

    from pipeline.sweep.tail import TailStart

    trials = [Trial("t", stub=True) for _ in range(3)]
    tail = CountingTail()
    cb = TailStart(expected_trials=3, tail=tail, slot_at_start=slot_at_start)
    for t in trials[:2]:
        cb.on_trial_start(0, trials[:2], t)
        t.status = "RUNNING"
    for t in trials[:2]:  # both end before the last trial starts
        t.status = "TERMINATED"
        cb.on_trial_complete(0, trials, t)
    cb.on_trial_start(0, trials, trials[2])
    assert tail.calls == 0  # never at the last trial's start
    trials[2].status = "RUNNING"
    cb.on_step_end(1, trials)
    if not slot_at_start:
        assert tail.calls == 0  # its worker group may not hold its slot yet
        trials[2].update_last_result({"training_iteration": 1, "step": 3})
        cb.on_step_end(2, trials)
    cb.on_step_end(3, trials)
    assert tail.calls == 1


def test_a_pending_placement_group_holds_the_tail_back_until_it_is_placed(tmp_path):
    """While a placement group waits for resources (a trial's worker group claiming its slot) the
    tail starts nothing; once none is pending, Tune's next loop step starts what the trial end had
    to hold back, once. A real 1-CPU Ray instance with a 2-CPU group that cannot be placed; real (stub)
    Tune trials through the callback."""
    import ray
    from ray.tune.experiment import Trial
    from ray.util import placement_group, remove_placement_group

    from pipeline.sweep.tail import TailStart, pending_placement_groups

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ready = placement_group([{"CPU": 1}])
        ray.get(ready.ready(), timeout=60)
        assert not pending_placement_groups()
        remove_placement_group(ready)
        pending = placement_group([{"CPU": 2}])
        assert not pending.wait(timeout_seconds=1)
        assert pending_placement_groups()

        trials = [Trial("t", stub=True) for _ in range(2)]
        tail = CountingTail()
        cb = TailStart(expected_trials=2, tail=tail, slot_at_start=True)
        for t in trials:
            cb.on_trial_start(0, trials, t)
            t.status = "RUNNING"
        cb.on_trial_complete(0, trials, trials[0])  # the sweep is in its tail, but a group is pending
        cb.on_step_end(1, trials)
        assert tail.calls == 0
        remove_placement_group(pending)
        assert not pending_placement_groups()
        cb.on_step_end(2, trials)  # no longer pending: the held-back update happens now ...
        cb.on_step_end(3, trials)  # ... and only once
        assert tail.calls == 1
    finally:
        ray.shutdown()
