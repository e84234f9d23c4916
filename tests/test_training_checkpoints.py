"""Which checkpoint a new run resumes from: unfinished runs' (killed before any manifest too), verified, with fallbacks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from stages.base.contracts import CPT
from stages.core.execution import StageRun
from stages.store import commit_manifest, open_store, start_manifest
from stages.training.checkpoints import LATEST, publish_checkpoint, restore_latest

KEY = "a" * 64
OTHER_KEY = "b" * 64


def deepspeed_wrote(checkpoint_dir: Path, step: int) -> dict[str, bytes]:
    """The files DeepSpeed writes for one tag (their content names the step)."""
    files = {
        "mp_rank_00_model_states.pt": f"model at step {step}".encode() * 10,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": f"optimizer at step {step}".encode() * 10,
    }
    for name, data in files.items():
        (checkpoint_dir / f"step-{step}").mkdir(parents=True, exist_ok=True)
        (checkpoint_dir / f"step-{step}" / name).write_bytes(data)
    (checkpoint_dir / LATEST).write_text(f"step-{step}")
    return files


def trained(store, run_id: str, work: Path, steps: list[int], key: str = KEY) -> StageRun:
    """A run that wrote and published checkpoints at `steps` and then died without a manifest (SIGKILL)."""
    stage = StageRun(store, CPT, run_id, key)
    for step in steps:
        deepspeed_wrote(work, step)
        publish_checkpoint(stage, work, step)
    return stage


def restored_files(checkpoint_dir: Path) -> dict[str, bytes]:
    tag = (checkpoint_dir / LATEST).read_text()
    return {path.name: path.read_bytes() for path in (checkpoint_dir / tag).iterdir() if path.name != "complete.json"}


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def test_checkpoints_of_a_run_killed_before_any_manifest_are_restored(store, tmp_path):
    expected = deepspeed_wrote(tmp_path / "scratch", 6)
    trained(store, "killed", tmp_path / "killed-work", [3, 6])
    trained(store, "other-options", tmp_path / "other-work", [9], key=OTHER_KEY)
    assert restore_latest(store, CPT, KEY, tmp_path / "new-machine") == {"run_id": "killed", "step": 6}
    assert restored_files(tmp_path / "new-machine") == expected


def test_a_succeeded_runs_checkpoints_are_not_resumed_and_a_failed_ones_are(store, tmp_path):
    done, stopped = (start_manifest(CPT, "0", run_id, {"max_steps": 12}, []) for run_id in ("done", "stopped"))
    key = done.cache_key
    trained(store, "done", tmp_path / "done", [9], key=key)
    trained(store, "stopped", tmp_path / "stopped", [3], key=key)
    commit_manifest(store, done.finish([]))
    commit_manifest(store, stopped.finish([], status="failed"))
    assert restore_latest(store, CPT, key, tmp_path / "new") == {"run_id": "stopped", "step": 3}


def test_a_truncated_local_checkpoint_is_replaced_by_the_verified_stored_copy(store, tmp_path, caplog):
    work = tmp_path / "work"
    trained(store, "stopped", work, [3, 6])
    expected = restored_files(work)
    state = work / "step-6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    os.truncate(state, 7)
    with caplog.at_level(logging.WARNING):
        assert restore_latest(store, CPT, KEY, work) == {"run_id": "stopped", "step": 6}
    assert restored_files(work) == expected
    assert "skipping the local checkpoint" in caplog.text and "step-6" in caplog.text
    assert restore_latest(store, CPT, KEY, work) is None  # now this machine's own, verified
    assert (work / LATEST).read_text() == "step-6"


def test_a_corrupted_stored_checkpoint_falls_back_to_an_earlier_complete_one(store, tmp_path, caplog):
    trained(store, "stopped", tmp_path / "work", [3, 6])
    stored = tmp_path / "store" / "runs" / "stopped" / CPT / "checkpoints" / "step-6" / "mp_rank_00_model_states.pt"
    stored.write_bytes(b"flipped" + stored.read_bytes()[7:])
    with caplog.at_level(logging.WARNING):
        assert restore_latest(store, CPT, KEY, tmp_path / "new-machine") == {"run_id": "stopped", "step": 3}
    assert "skipping the stored checkpoint" in caplog.text and "step-6" in caplog.text
    assert not (tmp_path / "new-machine" / "step-6").exists()


def test_nothing_usable_starts_afresh(store, tmp_path, caplog):
    work = tmp_path / "work"
    deepspeed_wrote(work, 3)  # written, never published (killed in between): no marker, not trusted
    trained(store, "stopped", tmp_path / "elsewhere", [6])
    (tmp_path / "store" / "runs" / "stopped" / CPT / "checkpoints" / "step-6" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert restore_latest(store, CPT, KEY, work) is None
    assert not (work / LATEST).exists()


def test_a_checkpoint_missing_another_rank_s_optimizer_shard_is_refused(tmp_path):
    """Ranks on two machines without a shared work folder: rank 0's folder holds its own shard alone."""
    from stages.training.checkpoints import CheckpointIncompleteError, require_every_rank

    folder = tmp_path / "step-2"
    folder.mkdir()
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"m")
    (folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o")
    require_every_rank(folder, 1)
    with pytest.raises(CheckpointIncompleteError, match=r"ranks \[0\] of 2: .*the same shared --work-dir"):
        require_every_rank(folder, 2)
    (folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o")
    require_every_rank(folder, 2)
    zero_0 = tmp_path / "zero-0"  # no optimizer shards (ZeRO 0 keeps the optimizer in the model states): nothing to check
    zero_0.mkdir()
    (zero_0 / "mp_rank_00_model_states.pt").write_bytes(b"m")
    require_every_rank(zero_0, 2)
