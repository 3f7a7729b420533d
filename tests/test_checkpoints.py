"""Atomic checkpoints: complete or absent, torn and corrupt ones skipped, the last K kept."""

import json

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
    assert [p.name for p in checkpoints.list_complete(tmp_path)] == ["step-000003", "step-000004"]
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
    with pytest.warns(UserWarning, match="skipping"):
        path, state = checkpoints.latest_valid(tmp_path, _load)
    assert path.name == "step-000001" and state == {"step": 1}


def test_marker_must_name_its_step(tmp_path):
    checkpoints.save(tmp_path, 5, _write({}))
    (tmp_path / "step-000005").rename(tmp_path / "step-000009")  # a renamed/copied-over directory
    with pytest.warns(UserWarning):
        assert checkpoints.list_complete(tmp_path) == []
