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
  an allowlist of harmless variables (no tokens or credentials such as HF_TOKEN), and /dev/null as its stdin. The
  interpreter is a child subreaper: processes the code starts stay in its tree even after `setsid` or a double
  fork, and a timeout or `close()` kills that whole tree.
- **Limits.** Per run: a wall-clock timeout on every read of the reply (the tree is killed; the sandbox restarts
  empty on the next run), a CPU-time limit (an exception in the code: the state is kept), and an output cap. Per
  process: an address-space limit and a cap on the size of any file it writes (its captured output included).

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
from dataclasses import dataclass

# Only these survive into the sandbox's environment: nothing that could carry a token or credential.
ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "VIRTUAL_ENV")
MAX_REPLY_BYTES = 64 * 2**20  # a reply longer than this is not the worker's (its outputs are capped far below)


@dataclass
class RunResult:
    output: str  # the text that goes inside the ```output fence
    ok: bool  # False when the code raised or timed out
    timed_out: bool = False
    truncated: bool = False


def safe_text(text: str) -> str:
    """`text` with lone surrogates escaped: what a tokenizer and a UTF-8 file accept."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Sandbox:
    def __init__(self, timeout: float = 10.0, cpu_seconds: int = 10, memory_bytes: int = 4 * 2**30,
                 max_output_chars: int = 4000, max_file_bytes: int = 64 * 2**20):
        self.timeout, self.cpu_seconds, self.memory_bytes = timeout, cpu_seconds, memory_bytes
        self.max_output_chars, self.max_file_bytes = max_output_chars, max_file_bytes
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None
        self._pending = b""  # bytes read past the last reply line

    # --- process lifecycle ---
    def _start(self) -> None:
        self.workdir = self.workdir or tempfile.mkdtemp(prefix="llm-sandbox-")
        env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
        env.update(HOME=self.workdir, TMPDIR=self.workdir, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
                   # one thread per interpreter: many run side by side, and BLAS thread pools sized to every core
                   # would oversubscribe the CPU and reserve address space against the memory limit
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        memory, file_size = self.memory_bytes, self.max_file_bytes

        def confine():  # runs in the child before Python starts; only lowers limits (no privilege needed)
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))  # an output flood cannot fill the disk

        self._pending = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WORKER, str(self.cpu_seconds), str(self.max_output_chars),
             *sys.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=self.workdir, env=env,
            start_new_session=True, preexec_fn=confine, bufsize=0)

    def _kill(self) -> None:
        """Kill the interpreter and every process it started (its tree: it is their subreaper), then reap it."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        kill_tree(proc.pid)
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
        line = self._read_line(deadline)
        if line is None:
            self._kill()
            return RunResult(f"TimeoutError: the code ran longer than {self.timeout:g} s and was stopped",
                             ok=False, timed_out=True)
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
            if reply["tag"] != tag:
                raise ValueError("wrong tag")
            return RunResult(safe_text(reply["output"]), bool(reply["ok"]), timed_out=bool(reply["timed_out"]),
                             truncated=bool(reply["truncated"]))
        except (ValueError, KeyError, TypeError):  # the code wrote into the reply pipe: nothing it says is trusted
            self._kill()
            return RunResult("Error: the interpreter's reply was garbled (the code wrote to its control pipe); "
                             "its state is lost", ok=False)

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
            if len(self._pending) > MAX_REPLY_BYTES:
                return b"{}\n"  # garbled: rejected by the caller
        line, _, self._pending = self._pending.partition(b"\n")
        return line


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
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


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it. The root is stopped first so that it starts nothing new, and, being
    a subreaper, it inherits the orphans of each killed generation: repeating until none is left gets them all."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    quiet, killed = 0, set()
    for _ in range(1000):
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
        for p in tree:
            try:
                os.kill(p, signal.SIGKILL)
                killed.add(p)
            except ProcessLookupError:
                pass
    try:
        os.killpg(pid, signal.SIGKILL)  # anything of its group that left the tree another way
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _wait_dead(killed)


def _wait_dead(pids: set[int], limit: float = 2.0) -> None:
    """Return once every pid is gone or a zombie: SIGKILL is only delivered, and on a loaded machine a process can take
    a while to exit; the caller's "everything is stopped" should hold when kill_tree returns."""
    deadline = time.monotonic() + limit
    while pids and time.monotonic() < deadline:
        for p in list(pids):
            try:
                state = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "gone"
            if state in ("Z", "X", "gone"):
                pids.discard(p)
        if pids:
            time.sleep(0.005)


# The worker: a tiny REPL reading JSON lines on a private copy of its stdin (stdin itself becomes /dev/null) and
# answering one JSON line per block, tagged, on a private copy of stdout. The code's own stdout/stderr (Python and
# file-descriptor level) go, in order, to a capture file whose size RLIMIT_FSIZE caps.
_WORKER = r'''
import ast, json, os, resource, signal, sys, types
cpu, cap = int(sys.argv[1]), int(sys.argv[2])
sys.path[:] = [p for p in sys.argv[3:] if p] or sys.path
control = os.fdopen(os.dup(0), "rb")
reply_fd = os.dup(1)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
capture = open("._output", "w+b")
os.dup2(capture.fileno(), 1); os.dup2(capture.fileno(), 2)
try:  # PR_SET_CHILD_SUBREAPER: orphans of the code's processes stay below this one, where a kill finds them
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
except Exception:
    pass
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the file-size cap a write fails (EFBIG) instead of killing

class CPUTimeLimit(BaseException):  # not an Exception: a bare `except Exception` in the code does not swallow it
    pass

running = False
def on_xcpu(signum, frame):
    if running:
        raise CPUTimeLimit(f"the code used more than {cpu} s of CPU time and was stopped")
signal.signal(signal.SIGXCPU, on_xcpu)
_, hard = resource.getrlimit(resource.RLIMIT_CPU)  # never raised (an unprivileged process may not); only the soft

class Bytes:  # sys.stdout.buffer
    def __init__(self, fd): self.fd = fd
    def write(self, b):
        data = bytes(b)
        n = len(data)
        while data:
            try:
                data = data[os.write(self.fd, data):]
            except OSError:
                break
        return n
    def flush(self): pass

class Stream:  # print() and sys.stdout.write() straight to fd 1/2, in order with what subprocesses write there
    encoding, errors = "utf-8", "backslashreplace"
    def __init__(self, fd): self.fd, self.buffer = fd, Bytes(fd)
    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        for i in range(0, len(s), 1 << 20):
            data = s[i:i + (1 << 20)].encode("utf-8", "backslashreplace")
            while data:
                try:
                    data = data[os.write(self.fd, data):]
                except OSError:  # past the size cap (EFBIG) or a closed descriptor: the rest is not shown anyway
                    return len(s)
        return len(s)
    def writelines(self, lines):
        for line in lines: self.write(line)
    def flush(self): pass
    def fileno(self): return self.fd
    def isatty(self): return False
    def writable(self): return True
    def readable(self): return False

def send(message):
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(reply_fd, data):]

def text_of(err):
    try:
        return f"{type(err).__name__}: {err}"
    except BaseException:
        return type(err).__name__

try:
    from IPython.lib.pretty import pretty
except Exception:
    pretty = repr
main = types.ModuleType("__main__")  # the code's globals: a real __main__, so its functions pickle
main.__builtins__ = __builtins__
sys.modules["__main__"] = main
scope = main.__dict__
me = os.getpid()
out, err_out, stdin = Stream(1), Stream(2), open(os.devnull)
while True:
    line = control.readline()
    if not line:
        break
    request = json.loads(line)
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime) + 1
    soft = spent + cpu if hard == resource.RLIM_INFINITY else min(spent + cpu, hard)
    capture.seek(0); capture.truncate()
    sys.stdout, sys.stderr, sys.stdin = out, err_out, stdin
    ok, shown, timed_out = True, "", False
    try:
        running = True
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        tree = ast.parse(request["code"], mode="exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), scope)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), scope)
            if value is not None:
                shown = pretty(value)
    except CPUTimeLimit as err:
        ok, timed_out, shown = False, True, text_of(err)
    except BaseException as err:
        ok, shown = False, text_of(err)
    finally:
        running = False
    if os.getpid() != me:  # a fork of the code returned into this loop: it must not answer or read requests
        os._exit(0)
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        capture.seek(0)
        text = capture.read(4 * cap + 4).decode("utf-8", "replace")[:cap + 1]
        if shown:
            text = (text + ("" if not text or text.endswith("\n") else "\n")) + shown
        text = text.rstrip("\n").encode("utf-8", "backslashreplace").decode("utf-8")
        truncated = len(text) > cap
        if truncated:
            text = text[:cap] + f"\n... [output truncated at {cap} characters]"
    except BaseException as err:  # e.g. a MemoryError of an enormous final value
        text, ok, truncated = text_of(err), False, False
    send({"tag": request["tag"], "output": text, "ok": ok, "timed_out": timed_out, "truncated": truncated})
'''
