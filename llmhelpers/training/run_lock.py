"""One writer per run folder: an flock-held lock file naming its holder (host, pid, process start), so a second
notebook or command on the same run is refused with who holds it, and a dead holder's lock is taken over."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


class RunLockedError(RuntimeError):
    """Another live process is writing this run folder."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells a reused pid apart); None where /proc is missing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    """A lock file held while a process writes a run folder: an exclusive `flock` on it (the kernel drops it when
    the process dies, so a crash leaves nothing to clean), with the holder's pid, host and start time inside.

    A second process fails at once with who holds it. A lock file left by a dead process on this host is taken
    over and the takeover reported; one naming a live process (an older version's lock, which had no flock) or
    another host is respected. Taking the flock comes first, so two processes can never both take over a dead
    holder's lock. Re-entrant within one process (the notebook kernel, the CLI).
    """

    NAME = "run.lock"
    _held: dict[str, list] = {}  # resolved path -> [depth, fd]

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.took_over: dict | None = None

    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict):
        who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder
               else "another process")
        raise RunLockedError(
            f"another process is writing this run: {self.path} is held by {who}. Wait for it, stop it, or use "
            "another output_dir. If that process is gone (another machine, a crash), delete the lock file.")

    def acquire(self) -> "RunLock":
        import fcntl

        key = str(self.path.resolve())
        if key in RunLock._held:
            RunLock._held[key][0] += 1
            return self
        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                self._refuse(holder)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between our open and our flock: try the new file
                os.close(fd)
                continue
            break
        holder = self._read(fd)
        here = holder.get("host") == socket.gethostname()
        if holder and not (here and holder.get("pid") == os.getpid()):
            if not here or not isinstance(holder.get("pid"), int) or _alive(holder["pid"], holder.get("start")):
                os.close(fd)
                self._refuse(holder)
            self.took_over = holder
            print(f"took over {self.path}: its process {holder['pid']} (since {holder.get('since')}) is gone")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._mine()).encode(), 0)
        os.fsync(fd)
        RunLock._held[key] = [1, fd, self.created_dir]
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        held = RunLock._held.get(key)
        if held is None:
            return
        held[0] -= 1
        if held[0] <= 0:
            del RunLock._held[key]
            self.path.unlink(missing_ok=True)  # while still holding the flock: a waiter re-checks the inode
            os.close(held[1])
            if held[2]:  # a run that failed before writing anything leaves no empty folder behind
                try:
                    self.path.parent.rmdir()
                except OSError:  # not empty (or gone): nothing to tidy
                    pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

