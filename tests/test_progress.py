"""Progress lines with an ETA, bounded in rate (rlhf_lib/progress.py), and the live card drawn from a stage's
progress file (rlhf_lib/live.py). The live card on a real run: tests/test_flow.py."""

import json

from rlhf_lib import live, methods, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_progress_line_has_the_rate_the_eta_and_the_newest_metrics(tmp_path):
    clock, lines = Clock(), []
    p = progress.Progress("sft", 300, out=tmp_path, clock=clock, printer=lambda text, **kw: lines.append(text))
    clock.now = 60.0
    p.update(120, loss=1.2345, note="text is not shown")
    assert lines == ["[sft] step 120/300 (40%) · 2 steps/s · 1m00s elapsed · ETA 1m30s · loss 1.234"]
    entries, offset = progress.read(tmp_path / progress.PROGRESS_FILE)
    assert [e["event"] for e in entries] == ["start", "update"] and entries[1]["eta_s"] == 90.0
    assert progress.read(tmp_path / progress.PROGRESS_FILE, offset) == ([], offset)


def test_the_progress_file_goes_where_the_stage_writes_even_before_that_exists(tmp_path):
    """A stage run alone (tests, bench scripts) starts training before anything else made its output directory."""
    progress.Progress("ppo", 10, out=tmp_path / "not-yet" / "ppo", printer=lambda *a, **k: None).update(1)
    assert (tmp_path / "not-yet" / "ppo" / progress.PROGRESS_FILE).exists()


def test_a_process_other_than_the_main_one_neither_prints_nor_records(tmp_path):
    lines = []
    for main in (False, True):
        p = progress.Progress("ppo", 10, out=tmp_path / str(main), main=main, printer=lambda t, **k: lines.append(t))
        p.update(10)
    assert len(lines) == 1 and not (tmp_path / "False").exists() and (tmp_path / "True" / "progress.jsonl").exists()


def test_a_resumed_stage_counts_its_pace_from_where_it_resumed():
    clock = Clock()
    p = progress.Progress("ppo", 100, start=50, record=False, clock=clock, printer=lambda *a, **k: None)
    clock.now = 10.0
    assert p.eta_s(60) == 40.0  # 10 steps in 10 s since the resume, 40 to go


def test_a_ten_hour_stage_prints_a_readable_number_of_lines():
    clock, lines = Clock(), []
    p = progress.Progress("ppo", 36000, record=False, clock=clock, printer=lambda text, **kw: lines.append(text))
    for step in range(1, 36001):  # one step a second
        clock.now = float(step)
        p.update(step)
    assert 50 <= len(lines) <= 120 and lines[-1].startswith("[ppo] step 36000/36000 (100%)")


def test_work_of_unknown_size_shows_no_eta():
    lines = []
    p = progress.Progress("data sft/train", None, unit="row", record=False, printer=lambda t, **k: lines.append(t))
    p.update(1024)
    assert lines[0].startswith("[data sft/train] row 1024 · ") and "ETA" not in lines[0]


def test_a_half_written_line_waits_for_the_next_read(tmp_path):
    path = tmp_path / progress.PROGRESS_FILE
    path.write_text(json.dumps({"event": "update", "done": 1}) + "\n" + '{"event": "upd')
    entries, offset = progress.read(path)
    assert entries == [{"event": "update", "done": 1}]
    with open(path, "a") as fh:
        fh.write('ate", "done": 2}\n')
    assert progress.read(path, offset)[0] == [{"event": "update", "done": 2}]


class FakeCard(list):
    refreshed = 0

    def refresh(self, *args, **kwargs):
        self.refreshed += 1


def test_the_live_card_shows_the_step_the_eta_the_curves_the_samples_and_the_resume_point():
    card = FakeCard()
    view = live.LiveCard(card, "ppo")
    view.feed([{"event": "start", "total": 80, "unit": "step", "start": 0},
               {"event": "update", "done": 60, "eta_s": 20.0, "score_mean": 5.1, "kl": 3.4},
               {"event": "note", "samples": [{"prompt": "Question: hi", "response": "hello", "score": 1.5}]},
               {"event": "note", "checkpoint": "/x/checkpoints/step-000060", "step": 60}])
    view.draw()
    rendered = {c.__class__.__name__ + str(i): c.render() for i, c in enumerate(card)}
    text = json.dumps(rendered)
    assert "ppo: step 60 of 80 (75%), ETA 20s" in text and "score_mean 5.1" in text
    assert "hello" in text and "step-000060" in text
    assert {"step": 60, "metric": "kl", "value": 3.4} in view.spec()["data"]["values"]


def test_the_card_is_redrawn_at_a_bounded_rate():
    assert live.due(now=12, began=0, last=0, every_s=10) and not live.due(now=9, began=0, last=0, every_s=10)
    assert not live.due(now=600, began=0, last=550, every_s=10)  # at 10 minutes: every 100 s
    assert live.due(now=600, began=0, last=499, every_s=10)


def test_only_the_steps_a_run_trains_in_carry_a_live_card():
    """A skipped method's step has nothing to watch, and each card costs its step two `card create` subprocesses
    when it ends (Metaflow's final render and refresh): the default run carded five skipped methods' steps."""
    assert live.steps(["ppo"]) == {"sft", "reward", "ppo_train", "ppo_gang_train"}
    assert live.steps(["dpo", "kto"]) == {"sft", "reward", "dpo", "kto"}
    assert live.steps(methods.names()) >= {"dpo", "rest", "grpo", "rloo", "kto", "ppo_train"}
