"""The run dir belongs to one run, held by one process at a time.

Before a run reads or writes anything in `${cache_dir}/${exp_name}`, rank 0 takes the lock file
`.aligntrain.lock` there: an exclusive `flock` (released by the kernel when the holder dies, however
it dies) plus the holder's host, pid and command line, and a lease that the holder renews every
RENEW_SECONDS by touching the file. A second process stops at once with one line naming the dir and
the holder. A lock left behind is taken over with a warning: on this host when its pid no longer
holds it, from another host when its lease has expired (where flock is not shared between hosts, as
on some network filesystems, the lease is what keeps two hosts out of one dir).

The lock file stays when the run ends (emptied): it marks the dir as made by this trainer. A dir
that holds files but no lock file is someone else's, and is refused rather than written into,
unless its config.yaml is one this trainer wrote (a run dir from before the lock existed). A run
that stops before writing anything leaves no dir behind.
"""
import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Optional

from train.errors import RunDirError, RunDirInUse

log = logging.getLogger(__name__)

LOCK = ".aligntrain.lock"
RENEW_SECONDS = 30
LEASE_SECONDS = 120  # a holder on another host is alive while it renewed the lock this recently


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _older_run(run_dir: pathlib.Path) -> bool:
    """Whether `run_dir` holds a config.yaml this trainer wrote (before run dirs had a lock file)."""
    import yaml
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        return {"exp_name", "cache_dir", "loss", "model"} <= config.keys() and "trainer" in config["loss"]
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return False


def _inode(path: pathlib.Path) -> Optional[int]:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command')})")


class RunLock:
    """The lock on one run dir; `acquire` raises RunDirError if it is not this process's to take."""

    def __init__(self, run_dir: pathlib.Path):
        self.run_dir, self.path = run_dir, run_dir / LOCK
        self.fd: Optional[int] = None
        self._stop = threading.Event()

    def _holder(self) -> dict:
        try:
            return json.loads(os.pread(self.fd, 1 << 16, 0) or b"{}")
        except ValueError:  # written by hand, or cut short: still somebody's
            return {"pid": "?", "host": "?", "started": "?", "command": "?"}

    def _refuse(self, why: str):
        os.close(self.fd)
        self.fd = None
        raise RunDirInUse(f"run dir {self.run_dir} is in use by {why}; wait for it to end, or choose another "
                          f"exp_name (a dead holder's lock is taken over automatically)")

    def acquire(self) -> None:
        run_dir = self.run_dir  # validate() has refused a path through a file
        if run_dir.is_dir() and not self.path.exists() and any(run_dir.iterdir()) and not _older_run(run_dir):
            raise RunDirError(f"run dir {run_dir} holds files this trainer did not write (it has no {LOCK}): "
                              f"refusing to write into it; choose another exp_name or cache_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            holder = self._holder()
            self._refuse(describe(holder) if holder else "another process")
        except OSError:  # this filesystem has no flock: the holder record and lease alone decide
            flocked = False
        if flocked and os.fstat(self.fd).st_ino != _inode(self.path):  # removed by a run that wrote nothing
            os.close(self.fd)
            return self.acquire()
        holder = self._holder()
        if holder:
            self._take_over(holder, flocked)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode(), 0)
        os.fsync(self.fd)
        threading.Thread(target=self._renew, daemon=True, name="run-dir-lease").start()

    def _take_over(self, holder: dict, flocked: bool) -> None:
        """`holder` did not release the lock: refuse if it may still run, else warn and take over."""
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if not flocked and isinstance(pid, int) and _alive(pid):
                self._refuse(describe(holder))
            why = "no longer running"
        else:
            age = time.time() - os.fstat(self.fd).st_mtime
            if age < LEASE_SECONDS:
                self._refuse(f"{describe(holder)}, whose lease was renewed {age:.0f} s ago (it expires "
                             f"{LEASE_SECONDS} s after the last renewal)")
            why = f"its lease expired: last renewed {age:.0f} s ago"
        log.warning("run dir %s: taking over the lock left by %s: %s", self.run_dir, describe(holder), why)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("could not renew the lease on %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # empty: free, and still marks the dir as ours
        if os.listdir(self.run_dir) == [LOCK]:  # the run stopped before writing anything: leave nothing
            self.path.unlink()
            self.run_dir.rmdir()
        os.close(self.fd)  # drops the flock
        self.fd = None


@contextmanager
def held(run_dir: pathlib.Path, accelerator):
    """Hold the run dir's lock for the duration (rank 0 takes it; every rank stops if it can't)."""
    from train.distributed import broadcast
    lock = RunLock(run_dir) if accelerator.is_main_process else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirError as e:
            error = e
    error = broadcast(accelerator, error)  # every rank raises rank 0's error
    if error:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
