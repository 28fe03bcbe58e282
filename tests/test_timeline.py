"""Where a run's and a sweep's time goes: phases from stamps, slot-time categories."""

import pytest

from benchmarks.sweep_overhead import slot_breakdown
from pipeline.timeline import EVENTS, PHASES, STARTUP, metrics, phases, startup_summary


def stamps(gaps):
    """Events at increasing times: gap i = seconds between event i and i + 1."""
    t, out = 1000.0, {}
    for event, gap in zip(EVENTS, [0.0, *gaps]):
        t += gap
        out[event] = t
    return out


def test_phases_are_the_gaps_between_consecutive_events_in_run_order():
    gaps = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    got = phases({f"time/at/{k}": v for k, v in stamps(gaps).items()})  # as the worker reports them
    assert list(got) == list(PHASES) and list(got.values()) == gaps
    m = metrics(stamps(gaps))
    assert m["time/phase/worker_init_s"] == 3.0 and m["time/phase/upload_s"] == 11.0
    assert m["time/startup_s"] == sum(gaps[:len(STARTUP)]) == 36.0  # driver .. eval_at_start


def test_a_missing_stamp_drops_its_two_phases_and_the_startup_total():
    s = stamps([1.0] * 11)
    del s["data"]  # e.g. a run restored from a finished Train run: no fresh worker stamps
    got = phases(s)
    assert "data" not in got and "tracking" not in got and got["loop"] == 1.0
    assert "time/startup_s" not in metrics(s)


def test_slot_breakdown_accounts_for_every_slot_second():
    # 2 slots, sweep 0..100 s; trials 10..40 and 12..50 (two at once), then 45..90 alone
    trials = [{"span": (10.0, 40.0), "phases": {"driver": 5.0, "loop": 25.0}},
              {"span": (12.0, 50.0), "phases": {"driver": 8.0, "loop": 30.0}},
              {"span": (45.0, 90.0), "phases": {"driver": 5.0, "loop": 35.0}}]  # 5 s unaccounted
    cats = slot_breakdown((0.0, 100.0), trials, slots=2)
    assert cats["sweep set-up (before the first trial)"] == 20.0
    assert cats["trial: driver"] == 18.0 and cats["trial: loop"] == 90.0 and cats["trial: unaccounted"] == 5.0
    assert cats["between/idle slots"] == 2 * 80.0 - (30 + 38 + 45)
    assert cats["summary (after the last trial)"] == 20.0
    assert sum(cats.values()) == pytest.approx(200.0)


def test_startup_summary_separates_the_first_trial_to_start_from_the_later_ones():
    # listed out of start order, as Tune returns results
    got = startup_summary([(30.0, 4.0), (10.0, 9.0), (20.0, 5.0), (40.0, 3.0)])
    assert got["sweep/trial_startup_first_s"] == 9.0
    assert got["sweep/trial_startup_later_median_s"] == 4.0  # of 5, 4, 3
    assert got["sweep/trial_startup_median_s"] == 4.5
    # a trial without its start stamp: the order is unknown, only the overall median is given
    assert startup_summary([(None, 4.0), (10.0, 9.0)]) == {"sweep/trial_startup_median_s": 6.5}
    assert startup_summary([(10.0, None)]) == {}
