"""The sweep's console lines (`ds_smoes.sweep.progress`): hand-made trial events -> the exact lines,
and the ETA over concurrent trials worked out by hand.  No Ray here: the real sweep's console is
checked in test_sweep_ray.py."""
import pytest

from ds_smoes.sweep.progress import SweepProgress, duration, eta_seconds, hhmm, one_line


@pytest.mark.parametrize("durations, running, pending, concurrency, expected", [
    ([], [30.0], 3, 1, None),                 # nothing finished yet: no estimate
    ([100.0], [], 0, 1, 0.0),                 # nothing left
    ([100.0], [], 3, 1, 300.0),               # 3 trials one after the other
    ([100.0], [40.0], 2, 1, 60.0 + 200.0),    # the running one has 60 s left, then 2 more
    ([100.0, 200.0], [], 4, 2, 300.0),        # mean 150 s: 4 trials on 2 slots = 2 rounds
    ([100.0], [40.0, 90.0], 1, 2, 110.0),     # slots free at 60 and 10: the pending one runs 10..110
    ([100.0], [150.0], 0, 1, 0.0),            # over the mean: taken as ending now
    ([60.0], [], 5, 2, 180.0),                # 3 rounds of 60 s (the last round half full)
])
def test_eta_schedules_the_remaining_trials_on_the_free_slots(durations, running, pending, concurrency, expected):
    assert eta_seconds(durations, running, pending, concurrency) == expected


def test_time_formats():
    assert [hhmm(s) for s in (None, 0, 1, 60, 61, 3599, 3600, 22 * 60 + 5)] == \
        ["--:--", "00:00", "00:01", "00:01", "00:02", "01:00", "01:00", "00:23"]
    assert [duration(s) for s in (9.4, 60, 109, 3725)] == ["9s", "1m00s", "1m49s", "1h02m"]
    assert one_line("\n  TrialFailed: boom\n  more") == "TrialFailed: boom"
    worker_error = ("t02:x=1: training failed: WorkerGroupError: Training failed due to worker errors:\n"
                    "[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n  File \"a.py\", line 1, in f\n"
                    "    g()\nds_smoes.core.errors.ConfigError: 640 conversations do not fill one batch\n")
    assert one_line(worker_error) == ("t02:x=1: training failed: WorkerGroupError: Training failed due to worker "
                                      "errors: ConfigError: 640 conversations do not fill one batch")
    assert one_line("x" * 300, limit=10) == "xxxxxxx..."


def test_a_sweep_of_three_trials_two_at_a_time():
    p = SweepProgress(total=3, concurrency=2)
    a, b, c = "t00:gate=topk", "t01:gate=hard", "t02:gate=smar"
    lines = []
    lines += p.started(0, a, now=0.0)
    lines += p.started(1, b, now=5.0)
    lines += p.reported(0, a, {"epoch": 1, "step": 10, "train/loss": 2.34567, "train/msi": 0.4, "resumed_from_step": 0},
                        now=50.0)
    # a worker group restarted from its epoch-1 checkpoint: the first report of the new attempt says so
    lines += p.reported(1, b, {"epoch": 2, "step": 20, "train/loss": 1.5, "resumed_from_step": 10}, now=90.0)
    lines += p.reported(1, b, {"epoch": 3, "step": 30, "train/loss": 1.25, "resumed_from_step": 10}, now=95.0)
    # the final result is not an epoch line: `finished` prints its figures
    lines += p.reported(0, a, {"finished": True, "acc_multimodal": 0.5, "epoch": 2, "step": 20}, now=99.0)
    lines += p.finished(0, a, {"acc_multimodal": 0.5, "acc_language": 0.25, "msi": 0.75, "tokens_per_s": 6131.4},
                        now=100.0)
    lines += p.started(2, c, now=101.0)
    lines += p.failed(2, c, f"TrialFailed: {c}: training failed: TrainingFailedError: worker died\nTraceback ...",
                      now=113.0)
    lines += p.finished(1, b, {}, now=245.0)
    assert lines == [
        "[trial 1/3] t00:gate=topk  started  (done 0/3, ETA --:--)",
        "[trial 2/3] t01:gate=hard  started  (done 0/3, ETA --:--)",
        "[trial 1/3] t00:gate=topk  epoch 1, step 10: loss 2.3457, MSI 0.400  (done 0/3, ETA --:--)",
        "[trial 2/3] t01:gate=hard  workers restarted from the step-10 checkpoint  (done 0/3, ETA --:--)",
        "[trial 2/3] t01:gate=hard  epoch 2, step 20: loss 1.5000  (done 0/3, ETA --:--)",
        "[trial 2/3] t01:gate=hard  epoch 3, step 30: loss 1.2500  (done 0/3, ETA --:--)",
        # mean 100 s; t01 has run 95 s (5 s left), t02 waits for the free slot: 100 s -> 2 minutes
        "[trial 1/3] t00:gate=topk  finished in 1m40s: multimodal 0.500, language 0.250, MSI 0.750, tok/s 6,131"
        "  (done 1/3, ETA 00:02)",
        # t01 has run 96 s (4 s left), t02 just started (100 s left)
        "[trial 3/3] t02:gate=smar  started  (done 1/3, ETA 00:02)",
        # a failure is not a duration for the ETA; its reason is its first line, without the trial's name
        "[trial 3/3] t02:gate=smar  failed after 12s: training failed: TrainingFailedError: worker died"
        "  (done 2/3, ETA 00:00)",
        "[trial 2/3] t01:gate=hard  finished in 4m00s  (done 3/3, ETA 00:00)",
    ]
    assert p.durations == [100.0, 240.0]


def test_a_resumed_sweep_skips_what_ended_and_says_where_a_trial_goes_on():
    p = SweepProgress(total=2, concurrency=1, clock=lambda: 7.0)
    assert p.skipped(0, "t00:seed=0", "finished") == \
        ["[trial 1/2] t00:seed=0  skipped: finished in an earlier session  (done 1/2, ETA --:--)"]
    assert p.started(1, "t01:seed=1", resumed=True) == ["[trial 2/2] t01:seed=1  resumed  (done 1/2, ETA --:--)"]
    # its first report names the checkpoint it went on from (Tune's last result may be older than that)
    assert p.reported(1, "t01:seed=1", {"epoch": 6, "step": 60, "resumed_from_step": 50}) == [
        "[trial 2/2] t01:seed=1  goes on from the step-50 checkpoint  (done 1/2, ETA --:--)",
        "[trial 2/2] t01:seed=1  epoch 6, step 60  (done 1/2, ETA --:--)"]
    # a restart after that is a restart
    assert p.reported(1, "t01:seed=1", {"epoch": 7, "step": 70, "resumed_from_step": 60})[0] == \
        "[trial 2/2] t01:seed=1  workers restarted from the step-60 checkpoint  (done 1/2, ETA --:--)"
    assert p.finished(1, "t01:seed=1", {"acc_multimodal": 0.25}, now=67.0) == \
        ["[trial 2/2] t01:seed=1  finished in 1m00s: multimodal 0.250  (done 2/2, ETA 00:00)"]
