"""Running model-written Python the way a notebook kernel does, outside the notebook's and trainer's process.

MathCodeInstruct's solutions interleave Python and the interpreter's output (MathCoder's inference executes each
block and feeds the real output back). `Sandbox` is that interpreter:

    with Sandbox() as box:
        box.run("x = 6 * 7")
        box.run("print('x is', x)\\nx + 1").output   # 'x is 42\\n43'

- **Like a notebook cell.** State persists across `run` calls of one sandbox; the output is what the cell shows:
  what it printed (Python-level and file-descriptor level, in the order it was written), then the pretty-printed
  value of a final expression (IPython's pretty printer if installed, else `repr`); an exception gives
  `TypeName: message`. Output is always valid text: undecodable bytes and lone surrogates are escaped.
- **Isolation.** The code runs in a separate Python process started fresh for each sandbox, in its own session,
  with a temporary working directory (removed afterwards) as cwd, HOME and TMPDIR, an environment that holds only
  an allowlist of harmless variables (no tokens or credentials such as HF_TOKEN), and /dev/null as its stdin. Its
  parent, the *keeper*, is a child subreaper: processes the code starts stay in its tree (a double fork, the
  interpreter's death); a seccomp filter keeps them in the interpreter's process group (no `setsid`, `setpgid`) and
  tree (no `CLONE_PARENT`) and away from the keeper (no signal, `ptrace`, memory access); a timeout or `close()`
  kills the group at once and then whatever else is below the keeper.
- **Limits, enforced here whatever the code does to its own process.** Per run: a wall-clock timeout on every read
  of the reply (the tree is killed; the sandbox restarts empty on the next run), a CPU-time limit (an exception in
  the code that keeps the state; should the code lift it, this process's own reading of the interpreter's CPU time
  kills the tree), the output (cut here to `max_output_chars` whatever the reply says, and a reply longer than that
  can be is not read past), and the working directory's files and bytes (checked every second and after each
  block). Per process: address space, the size of any file it writes, and (for a user other than root) the number
  of processes.

Not isolated (FINETUNING_GUIDE.md says it too): the filesystem (the code runs as your user and can read and write
what you can, `~/.cache/huggingface/token` and `/proc/<pid>/environ` of your other processes included), the
network, and other processes of your user. For untrusted code add an OS-level sandbox (a container or VM without
network, bubblewrap/nsjail, a separate user).
"""
from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

WORKER = str(Path(__file__).with_name("sandbox_worker.py"))  # the keeper and the interpreter, run as a script
# Only these survive into the sandbox's environment: nothing that could carry a token or credential.
ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "VIRTUAL_ENV")
START_TIMEOUT = 60.0  # seconds for a new interpreter to say it is ready; not counted in any block's timeout
POLL_SECONDS = 0.25  # how often a running block's CPU time is read
DISK_CHECK_SECONDS = 1.0  # how often a running block's working directory is measured
CPU_GRACE_SECONDS = 2.0  # the interpreter's own limit fires first (it keeps the state); this one kills
KEEPER_EXIT_SECONDS = 5.0  # after the group is killed, the keeper reaps it and exits; past this the tree is walked
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class RunResult:
    output: str  # the text that goes inside the ```output fence
    ok: bool  # False when the code raised or timed out (as the interpreter reports it, except for limits)
    timed_out: bool = False
    truncated: bool = False


def safe_text(text: str) -> str:
    """`text` with lone surrogates escaped: what a tokenizer and a UTF-8 file accept."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def truncation_note(limit: int, unit: str = "characters") -> str:
    return f"\n... [output truncated at {limit} {unit}]"


class SandboxStartError(RuntimeError):
    pass


class Sandbox:
    def __init__(self, timeout: float = 10.0, cpu_seconds: int = 10, memory_bytes: int = 4 * 2**30,
                 max_output_chars: int = 4000, max_file_bytes: int = 64 * 2**20, max_processes: int = 128,
                 max_workdir_files: int = 10_000, max_workdir_bytes: int = 2**30):
        self.timeout, self.cpu_seconds, self.memory_bytes = timeout, cpu_seconds, memory_bytes
        self.max_output_chars, self.max_file_bytes, self.max_processes = max_output_chars, max_file_bytes, max_processes
        self.max_workdir_files, self.max_workdir_bytes = max_workdir_files, max_workdir_bytes
        # the longest reply the worker can honestly send: every character JSON-escaped as a surrogate pair
        self.max_reply_bytes = 12 * (max_output_chars + len(truncation_note(max_output_chars))) + 1024
        self.proc: subprocess.Popen | None = None  # the keeper
        self.interpreter_pid: int | None = None
        self.confined = False  # whether the seccomp filter is in place (Linux on x86_64 or aarch64)
        self.workdir: str | None = None
        self._pending = b""  # bytes read past the last reply line
        self._previous_tag = ""

    # --- process lifecycle ---
    def _start(self) -> None:
        self.workdir = self.workdir or tempfile.mkdtemp(prefix="llm-sandbox-")
        env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
        env.update(HOME=self.workdir, TMPDIR=self.workdir, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
                   # one thread per interpreter: many run side by side, and BLAS thread pools sized to every core
                   # would oversubscribe the CPU and reserve address space against the memory limit
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._pending, self._previous_tag = b"", ""
        # no preexec_fn: the worker sets its memory, core and file-size limits itself before anything else runs, so
        # Python can vfork (a preexec_fn forks this whole process, page tables and all, holding its lock)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", WORKER, str(self.cpu_seconds), str(self.max_output_chars),
             str(self.max_processes), str(self.memory_bytes), str(self.max_file_bytes), *sys.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=self.workdir, env=env,
            start_new_session=True, bufsize=0)
        # the interpreter says it is ready before any code runs: start-up never counts against a block's timeout
        line = self._read_line(time.monotonic() + START_TIMEOUT)
        try:
            hello = json.loads(line or b"null")
            self.interpreter_pid, self.confined = int(hello["ready"]), bool(hello["confined"])
        except (ValueError, KeyError, TypeError):
            status = self.proc.poll()
            self._kill()
            raise SandboxStartError(f"the sandbox's interpreter did not start within {START_TIMEOUT:g} s" if line is None
                                    else f"the sandbox's interpreter failed at start-up (exit code {status})")
        if not self.confined:
            warnings.warn("the sandbox's seccomp filter is not available here (Linux on x86_64 or aarch64 only): "
                          "code can start processes outside the sandbox's tree", RuntimeWarning, stacklevel=3)

    def _kill(self) -> None:
        """Kill every process of the code, and the keeper (it exits on its own once they are reaped).

        With the seccomp filter in place every process of the code is in the interpreter's process group, so one
        killpg ends them all at once (a fork racing it cannot leave a survivor), and the keeper, which exits only
        when nothing is left below it, says when it is done: no /proc walk here, no sleep. Without the filter, or
        should the keeper not exit, the tree is walked (kill_tree)."""
        if self.proc is None:
            return
        proc, group, self.proc, self.interpreter_pid = self.proc, self.interpreter_pid, None, None
        done = False
        if self.confined and group is not None and proc.poll() is None:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            done = _exited(proc, KEEPER_EXIT_SECONDS)
        if not done:
            # the group is named only while the keeper lives: it reaps the interpreter only to end the group itself
            kill_tree(proc.pid, group if proc.poll() is None else None)
            try:
                proc.wait(timeout=2)  # the keeper reaps what was killed, then exits
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def close(self) -> None:
        self._kill()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "Sandbox":
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- running code ---
    def run(self, code: str) -> RunResult:
        tag = secrets.token_hex(8)  # the reply must carry it: a line the code forged on the reply pipe does not
        request = (json.dumps({"code": code, "tag": tag}) + "\n").encode()
        for attempt in (0, 1):
            if self.proc is None or self.proc.poll() is not None:
                self._kill()
                self._start()
            try:
                self.proc.stdin.write(request)
                break
            except (BrokenPipeError, OSError):  # the code closed or broke the control pipe: start afresh
                self._kill()
        else:
            return RunResult("Error: the interpreter could not be started", ok=False)
        deadline = time.monotonic() + self.timeout
        line = self._read_reply(deadline)
        while isinstance(line, bytes) and self._previous_tag and self._previous_tag.encode() in line[:64]:
            line = self._read_reply(deadline)  # the real reply of a block whose code forged one: stale, skipped
        self._previous_tag = tag
        if isinstance(line, RunResult):
            return line
        if not line:  # the pipe closed: the process died (a limit, or the code exited it) or the code closed it
            try:
                code_ = self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:  # still alive without its pipe (e.g. waiting for its threads)
                code_ = None
            self._kill()
            reason = ("the CPU-time limit" if code_ in (-signal.SIGXCPU, -signal.SIGKILL) else
                      "it closed its reply pipe" if code_ is None else f"exit code {code_}")
            return RunResult(f"SystemExit: the interpreter stopped ({reason}); its state is lost", ok=False,
                             timed_out=code_ in (-signal.SIGXCPU, -signal.SIGKILL))
        try:
            reply = json.loads(line)
            if reply["tag"] != tag or not isinstance(reply["output"], str):
                raise ValueError("wrong tag")
            output, truncated = safe_text(reply["output"]), bool(reply["truncated"])
        except (ValueError, KeyError, TypeError):  # the code wrote into the reply pipe: nothing it says is trusted
            self._kill()
            return RunResult("Error: the interpreter's reply was garbled (the code wrote to its control pipe); "
                             "its state is lost", ok=False)
        limit = self.max_output_chars + len(truncation_note(self.max_output_chars))
        if len(output) > limit:  # the reply is the code's to forge: the cap is this process's
            output, truncated = output[:self.max_output_chars] + truncation_note(self.max_output_chars), True
        over = self._disk_over()
        if over:
            return self._restart_empty(over)
        return RunResult(output, bool(reply["ok"]), timed_out=bool(reply["timed_out"]), truncated=truncated)

    def _read_reply(self, deadline: float) -> bytes | RunResult:
        """The block's reply line, read while this process watches the limits the code could lift in its own
        process: the wall clock, the interpreter's CPU time, the working directory's size."""
        cpu_start, checked = self._cpu_seconds(), time.monotonic()
        while True:
            now = time.monotonic()
            line = self._read_line(min(deadline, now + POLL_SECONDS))
            if line is not None:
                return line
            if time.monotonic() >= deadline:
                self._kill()
                return RunResult(f"TimeoutError: the code ran longer than {self.timeout:g} s and was stopped",
                                 ok=False, timed_out=True)
            if self._cpu_seconds() - cpu_start > self.cpu_seconds + CPU_GRACE_SECONDS:
                self._kill()
                return RunResult(f"CPUTimeLimit: the code used more than {self.cpu_seconds} s of CPU time and was "
                                 "stopped; its state is lost", ok=False, timed_out=True)
            if time.monotonic() - checked >= DISK_CHECK_SECONDS:
                checked = time.monotonic()
                over = self._disk_over()
                if over:
                    return self._restart_empty(over)

    def _cpu_seconds(self) -> float:
        """CPU time (user + system) the interpreter has used, from /proc: the code cannot change this reading."""
        fields = stat_fields(self.interpreter_pid)
        return (int(fields[11]) + int(fields[12])) / _TICKS if fields else 0.0

    def _disk_over(self) -> str | None:
        """What the working directory holds past its limits, or None (the walk stops as soon as one is passed)."""
        files = size = 0
        todo = [self.workdir]
        while todo:
            try:
                entries = list(os.scandir(todo.pop()))
            except OSError:
                continue
            for entry in entries:
                files += 1
                try:
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
                    size += entry.stat(follow_symlinks=False).st_blocks * 512
                except OSError:
                    pass
                if files > self.max_workdir_files:
                    return f"more than {self.max_workdir_files:,} files"
                if size > self.max_workdir_bytes:
                    return f"more than {self.max_workdir_bytes / 2**20:,.0f} MiB"
        return None

    def _restart_empty(self, what: str) -> RunResult:
        self._kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.makedirs(self.workdir, exist_ok=True)
        return RunResult(f"OSError: the code wrote {what} into its working directory; the folder was emptied and "
                         "the interpreter's state is lost", ok=False)

    def _read_line(self, deadline: float) -> bytes | None:
        """One reply line, read under the deadline (a partial line and silence cannot block past it); None on
        timeout, b"" when the process closed the pipe."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self._pending += chunk
            if len(self._pending) > self.max_reply_bytes:
                return b"{}\n"  # longer than any honest reply: garbled, rejected by the caller
        line, _, self._pending = self._pending.partition(b"\n")
        return line


def _exited(proc: subprocess.Popen, limit: float) -> bool:
    """Whether `proc` exits within `limit` seconds (then reaped): a pidfd waits for it without polling; where pidfds
    are missing, Popen's own wait."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (an old kernel or Python), or already reaped
        try:
            proc.wait(timeout=limit)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        if not select.select([fd], [], [], limit)[0]:
            return False
    finally:
        os.close(fd)
    proc.wait()
    return True


def stat_fields(pid) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ... utime, stime at 11, 12); None
    once the process is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        fields = stat_fields(entry) if entry.isdigit() else None
        if fields:
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> list[int]:
    """Live (not zombie) processes below `pid`."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for p, (parent, _) in table.items():
        children.setdefault(parent, []).append(p)
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if table[p][1] != "Z":
            found.append(p)
        todo.extend(children.get(p, []))
    return found


def kill_tree(pid: int, group: int | None = None, limit: float = 10.0) -> None:
    """SIGKILL everything below `pid` (the keeper), then let it go on: it reaps them, and exits once the interpreter is
    gone (a killed process left unreaped would stay a zombie under an init that does not reap, as in many
    containers). The root is stopped first, so that it reaps nothing meanwhile and every orphan of a killed
    generation stays below it. `group` (the interpreter's process group, which the seccomp filter keeps every
    process of the code in) is killed at once; then each pass stops, then kills, what it finds below the root, for
    anything outside the group (no filter on this platform); repeating until the tree stays empty gets them all."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    if group is not None:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    quiet, killed = 0, set()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        tree = descendants(pid)
        if not tree:
            # a process killed mid-fork or mid-exit hands its child to the root a moment later: the tree counts as
            # empty only when it stays empty
            quiet += 1
            if quiet == 3:
                break
            time.sleep(0.01)
            continue
        quiet = 0
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for p in tree:
                try:
                    os.kill(p, sig)
                    killed.add(p)
                except ProcessLookupError:
                    pass
    _wait_dead(killed)
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _wait_dead(pids: set[int], limit: float = 2.0) -> None:
    """Return once every pid is gone or a zombie: SIGKILL is only delivered, and on a loaded machine a process can take
    a while to exit; the caller's "everything is stopped" should hold when kill_tree returns."""
    deadline = time.monotonic() + limit
    while pids and time.monotonic() < deadline:
        for p in list(pids):
            fields = stat_fields(p)
            if fields is None or fields[0] in ("Z", "X"):
                pids.discard(p)
        if pids:
            time.sleep(0.005)
