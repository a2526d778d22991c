"""The run dir is one run's: a lock per dir, only the trainer's own leftovers removed, one history.
(Two real processes racing for one dir: tests/test_checkpoints.py; dirs refused at start-up:
tests/test_config.py.)"""
import errno
import json
import os
import socket
import subprocess
import time

import pytest

from conftest import build_trainer, events, train_in_process
from train import rundir
from train.errors import RunDirError, RunError
from train.logs import RunLogger
from train.rundir import LOCK, RunLock


def holder(directory) -> dict:
    text = (directory / LOCK).read_text()
    return json.loads(text) if text else {}


def leave_lock(directory, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": "earlier",
                                              "command": "launch.py"} | fields))


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_held_lock_refuses_a_second_holder_until_released(tmp_path, caplog):
    first = RunLock(tmp_path / "run")
    first.acquire()
    assert holder(tmp_path / "run") | {"started": None} == {
        "host": socket.gethostname(), "pid": os.getpid(), "started": None, "command": holder(tmp_path / "run")["command"]}
    with pytest.raises(RunDirError, match=f"run dir {tmp_path / 'run'} is in use by pid {os.getpid()} on host "):
        RunLock(tmp_path / "run").acquire()  # flock is per open file: the same process is refused too
    (tmp_path / "run" / "config.yaml").write_text("written")
    first.release()
    assert holder(tmp_path / "run") == {}
    second = RunLock(tmp_path / "run")
    with caplog.at_level("WARNING"):
        second.acquire()
    second.release()
    assert not caplog.records  # a released lock is simply taken


def test_a_dead_holders_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = dead_pid()
    leave_lock(tmp_path, pid=pid)
    with caplog.at_level("WARNING"):
        lock = RunLock(tmp_path)
        lock.acquire()
    assert f"taking over the lock left by pid {pid} on host {socket.gethostname()}" in caplog.text
    assert "no longer running" in caplog.text and holder(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_holds_until_its_lease_expires(tmp_path, caplog):
    leave_lock(tmp_path, host="node-17", pid=4242)
    with pytest.raises(RunDirError, match="in use by pid 4242 on host node-17 .*renewed 0 s ago"):
        RunLock(tmp_path).acquire()
    expired = time.time() - rundir.LEASE_SECONDS - 5
    os.utime(tmp_path / LOCK, (expired, expired))
    with caplog.at_level("WARNING"):
        lock = RunLock(tmp_path)
        lock.acquire()
    assert "taking over the lock left by pid 4242 on host node-17" in caplog.text and "lease expired" in caplog.text
    lock.release()


def test_without_flock_a_live_holder_on_this_host_is_refused(tmp_path, monkeypatch):
    """Some network filesystems have no flock: the holder's pid then decides on this host."""
    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    leave_lock(tmp_path, pid=os.getppid())  # alive
    with pytest.raises(RunDirError, match=f"in use by pid {os.getppid()}"):
        RunLock(tmp_path).acquire()
    leave_lock(tmp_path, pid=dead_pid())
    lock = RunLock(tmp_path)
    lock.acquire()
    assert holder(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_the_holder_renews_its_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "RENEW_SECONDS", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK, (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK).stat().st_mtime < 10
    lock.release()


def test_start_up_removes_only_the_trainers_own_leftovers(tmp_path):
    """`.unfinished/` (interrupted saves and deletions) goes; a user's own `.tmp-*` / `.old-*` dirs stay."""
    run_dir = tmp_path / "run"
    leave_lock(run_dir, pid=dead_pid())
    for mine in (".tmp-mywork", ".old-notes", ".tmp-step-3"):
        (run_dir / mine).mkdir()
        (run_dir / mine / "keep.txt").write_text("mine")
    (run_dir / ".unfinished" / "step-3").mkdir(parents=True)
    (run_dir / ".unfinished" / "step-3" / "model.safetensors").write_text("partial")
    build_trainer(tmp_path, "exp_name=run")
    assert not (run_dir / ".unfinished").exists()
    assert all((run_dir / mine / "keep.txt").read_text() == "mine" for mine in (".tmp-mywork", ".old-notes",
                                                                                 ".tmp-step-3"))


def test_a_fresh_start_sets_an_earlier_attempts_history_aside(tmp_path):
    """Ctrl-C at step 3 before any checkpoint, then a rerun: metrics.jsonl holds only the rerun; the
    earlier lines, a half-written last one included (repaired), move to metrics.abandoned.jsonl."""
    run_dir = tmp_path / "run"
    leave_lock(run_dir, pid=dead_pid())
    earlier = [json.dumps({"step": s, "loss/train": 9.0}) + "\n" for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(earlier) + '{"step": 4, "loss/tr')
    train_in_process(tmp_path, "exp_name=run")
    steps = [e["step"] for e in events(run_dir) if "loss/train" in e]
    assert steps == [1, 2, 3, 4] and all(e.get("loss/train") != 9.0 for e in events(run_dir))
    assert (run_dir / "metrics.abandoned.jsonl").read_text() == "".join(earlier) + '{"step": 4, "loss/tr\n'


def test_a_failed_metrics_write_leaves_no_partial_line(tmp_path, monkeypatch):
    config = {"exp_name": "run", "wandb": {"project": "p", "entity": None, "mode": "disabled"}}
    logger = RunLogger(tmp_path, config, total_steps=10, enabled=True)
    logger.log({"step": 1, "loss/train": 1.0})
    write = os.write

    def disk_full(fd, data):
        write(fd, data[:5])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(RunError, match="could not write .*metrics.jsonl: No space left on device"):
        logger.log({"step": 2, "loss/train": 0.5})
    monkeypatch.undo()
    assert [e["step"] for e in events(tmp_path)] == [1]
    logger.close()


def test_a_run_dir_from_before_locks_is_continued_and_anything_else_refused(tmp_path):
    """A dir whose config.yaml this trainer wrote (no lock file yet: an older version's run) is taken;
    a dir with someone else's config.yaml is not."""
    train_in_process(tmp_path, "exp_name=old", "n_examples=16")
    (tmp_path / "old" / LOCK).unlink()
    lock = RunLock(tmp_path / "old")
    lock.acquire()
    lock.release()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.yaml").write_text("model: resnet\nlr: 0.1\n")
    with pytest.raises(RunDirError, match="holds files this trainer did not write"):
        RunLock(tmp_path / "theirs").acquire()


def test_a_run_that_writes_nothing_leaves_no_dir(tmp_path):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "run").exists()
