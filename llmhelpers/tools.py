"""Running model-written Python the way a notebook kernel does, outside the notebook's and trainer's process.

MathCodeInstruct's solutions interleave Python and the interpreter's output (MathCoder's inference executes each
block and feeds the real output back). `Sandbox` is that interpreter:

    with Sandbox() as box:
        box.run("x = 6 * 7")
        box.run("print('x is', x)\\nx + 1").output   # 'x is 42\\n43'

- **Like a notebook cell.** State persists across `run` calls of one sandbox; the output is what the cell shows:
  what it printed (Python-level and file-descriptor level), then the pretty-printed value of a final expression
  (IPython's pretty printer if installed, else `repr`); an exception gives `TypeName: message`.
- **Isolation.** The code runs in a separate Python process started fresh for each sandbox, in its own process
  group, with a temporary working directory (removed afterwards) as cwd, HOME and TMPDIR, and an environment that
  holds only an allowlist of harmless variables (no tokens or credentials such as HF_TOKEN).
- **Limits.** Per run: a wall-clock timeout (the whole process group is killed; the sandbox restarts empty on the
  next run), a CPU-time limit, and an output cap; per process: an address-space limit.

Not isolated (FINETUNING_GUIDE.md says it too): the filesystem (the code runs as your user and can read and write
what you can), the network, and other processes of your user. For untrusted code add an OS-level sandbox
(a container or VM without network, bubblewrap/nsjail, a separate user).
"""
from __future__ import annotations

import json
import os
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


@dataclass
class RunResult:
    output: str  # the text that goes inside the ```output fence
    ok: bool  # False when the code raised or timed out
    timed_out: bool = False
    truncated: bool = False


class Sandbox:
    def __init__(self, timeout: float = 10.0, cpu_seconds: int = 10, memory_bytes: int = 4 * 2**30,
                 max_output_chars: int = 4000):
        self.timeout, self.cpu_seconds, self.memory_bytes = timeout, cpu_seconds, memory_bytes
        self.max_output_chars = max_output_chars
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None

    # --- process lifecycle ---
    def _start(self) -> None:
        self.workdir = self.workdir or tempfile.mkdtemp(prefix="llm-sandbox-")
        env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
        env.update(HOME=self.workdir, TMPDIR=self.workdir, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
                   # one thread per interpreter: many run side by side, and BLAS thread pools sized to every core
                   # would oversubscribe the CPU and reserve address space against the memory limit
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        limits = (self.memory_bytes, self.cpu_seconds)

        def confine():  # runs in the child before Python starts
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limits[0], limits[0]))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WORKER, str(self.cpu_seconds), str(self.max_output_chars),
             *sys.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=self.workdir, env=env,
            start_new_session=True, preexec_fn=confine, text=True)

    def _kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: children the code started too
            except ProcessLookupError:
                pass
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                pipe.close()
            self.proc = None

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
        if self.proc is None or self.proc.poll() is not None:
            self._kill()
            self._start()
        self.proc.stdin.write(json.dumps({"code": code}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            self._kill()
            return RunResult(f"TimeoutError: the code ran longer than {self.timeout:g} s and was stopped",
                             ok=False, timed_out=True)
        line = self.proc.stdout.readline()
        if not line:  # the process died: the CPU limit (SIGXCPU/SIGKILL), or the code exited it
            code_ = self.proc.wait()
            self._kill()
            reason = "the CPU-time limit" if code_ in (-signal.SIGXCPU, -signal.SIGKILL) else f"exit code {code_}"
            return RunResult(f"SystemExit: the interpreter stopped ({reason}); its state is lost", ok=False,
                             timed_out=code_ in (-signal.SIGXCPU, -signal.SIGKILL))
        try:
            reply = json.loads(line)
            return RunResult(reply["output"], reply["ok"], truncated=reply["truncated"])
        except (ValueError, KeyError, TypeError):  # the code wrote into the reply pipe: nothing it says is trusted
            self._kill()
            return RunResult("Error: the interpreter's reply was garbled (the code wrote to its control pipe); "
                             "its state is lost", ok=False)


# The worker: a tiny REPL reading JSON lines on stdin and answering one JSON line per block on a private copy
# of stdout; the code's own stdout/stderr (Python and file-descriptor level) go to a capture file.
_WORKER = r'''
import ast, io, json, os, resource, sys, traceback
cpu, cap = int(sys.argv[1]), int(sys.argv[2])
sys.path[:] = [p for p in sys.argv[3:] if p] or sys.path
reply = os.fdopen(os.dup(1), "w")
capture = open("._output", "w+")
os.dup2(capture.fileno(), 1); os.dup2(capture.fileno(), 2)
try:
    from IPython.lib.pretty import pretty
except Exception:
    pretty = repr
scope = {"__name__": "__main__"}
for line in sys.stdin:
    code = json.loads(line)["code"]
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime)
    resource.setrlimit(resource.RLIMIT_CPU, (spent + cpu, spent + cpu + 1))
    capture.seek(0); capture.truncate()
    buffer = io.StringIO()
    sys.stdout = sys.stderr = buffer
    ok, shown = True, ""
    try:
        tree = ast.parse(code, mode="exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), scope)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), scope)
            if value is not None:
                shown = pretty(value)
    except BaseException as err:
        ok = False
        shown = f"{type(err).__name__}: {err}"
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    capture.flush(); capture.seek(0)
    text = capture.read(cap + 1) + buffer.getvalue()[:cap + 1]
    if shown:
        text = (text + ("" if not text or text.endswith("\n") else "\n")) + shown
    text = text.rstrip("\n")
    truncated = len(text) > cap
    if truncated:
        text = text[:cap] + f"\n... [output truncated at {cap} characters]"
    reply.write(json.dumps({"output": text, "ok": ok, "truncated": truncated}) + "\n"); reply.flush()
'''
