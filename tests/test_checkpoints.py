"""Atomic checkpoints: complete or absent, torn and corrupt ones skipped, the last K kept."""

import json
from pathlib import Path

import pytest

from rlhf_lib import checkpoints


def _write(payload):
    def write(tmp):
        (tmp / "state.json").write_text(json.dumps(payload))
    return write


def _load(path):
    return json.loads((path / "state.json").read_text())


def test_save_is_complete_and_prunes(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoints.save(tmp_path, step, _write({"step": step}), keep=2)
    assert [Path(p).name for _, p in checkpoints.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_failed_write_leaves_nothing(tmp_path):
    def boom(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoints.save(tmp_path, 1, boom)
    assert list(tmp_path.iterdir()) == []


def test_torn_and_corrupt_checkpoints_are_skipped(tmp_path):
    checkpoints.save(tmp_path, 1, _write({"step": 1}))
    checkpoints.save(tmp_path, 2, _write({"step": 2}))
    (tmp_path / "step-000002" / "state.json").write_text("{trunc")  # corrupt file, marker intact
    (tmp_path / "step-000003").mkdir()  # torn: no marker
    (tmp_path / "step-000003" / "state.json").write_text(json.dumps({"step": 3}))
    out = tmp_path.parent / (tmp_path.name + "-stage")
    (out).mkdir()
    (out / "checkpoints").symlink_to(tmp_path)  # the stage's own checkpoint directory
    with pytest.warns(UserWarning, match="skipping"):
        path, state = checkpoints.resume_point("ppo", [], out, _load)
    assert path.name == "step-000001" and state == {"step": 1}


def test_marker_must_name_its_step(tmp_path):
    checkpoints.save(tmp_path, 5, _write({}))
    (tmp_path / "step-000005").rename(tmp_path / "step-000009")  # a renamed/copied-over directory
    with pytest.warns(UserWarning):
        assert checkpoints.list_checkpoints(tmp_path) == []


def test_both_layouts_are_found_newest_first_across_roots(tmp_path):
    """Ours (`step-N` + marker) and the HF Trainer's (`checkpoint-N` + trainer_state.json), over several roots."""
    checkpoints.save(tmp_path / "a", 4, _write({}))
    hf = tmp_path / "b" / "checkpoint-6"
    hf.mkdir(parents=True)
    (hf / "trainer_state.json").write_text("{}")
    (tmp_path / "b" / "checkpoint-9").mkdir()  # HF never finished writing it
    with pytest.warns(UserWarning, match="checkpoint-9"):
        found = checkpoints.newest_first([tmp_path / "a", tmp_path / "b", tmp_path / "missing"])
    assert [(s, Path(p).name) for s, p in found] == [(6, "checkpoint-6"), (4, "step-000004")]


def test_pruning_stops_once_a_later_attempt_has_started(tmp_path, capsys):
    """Attempt 0 keeps writing after attempt 1 began: it must not delete what attempt 1 may be reading."""
    root = tmp_path / "ppo" / "attempt-0" / "checkpoints"
    for step in (1, 2, 3):
        checkpoints.save(root, step, _write({}), keep=2)
    assert [s for s, _ in checkpoints.list_checkpoints(root)] == [2, 3]
    (tmp_path / "ppo" / "attempt-1").mkdir()
    (tmp_path / "ppo" / "attempt-1" / checkpoints.STARTED).write_text("host")
    assert checkpoints.later_attempt_started(root)
    for step in (4, 5):
        checkpoints.save(root, step, _write({}), keep=2)
    assert [s for s, _ in checkpoints.list_checkpoints(root)] == [2, 3, 4, 5]
    assert "a later attempt of this task has started" in capsys.readouterr().out
    assert not checkpoints.later_attempt_started(tmp_path / "ppo" / "attempt-1" / "checkpoints")
