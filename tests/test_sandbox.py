"""The Python sandbox for tool-integrated reasoning: notebook-style outputs, state across blocks, and its limits
(timeout kills the process group, memory, CPU, output size), a removed working directory, no secrets."""
import os
import time

import pytest

from llmhelpers.inference.sandbox import Sandbox


@pytest.fixture
def box():
    with Sandbox(timeout=3, cpu_seconds=2) as sandbox:
        yield sandbox


def test_outputs_look_like_a_notebook_cell():
    with Sandbox(timeout=30, cpu_seconds=10) as box:  # importing sympy took over 3 s once on a loaded machine
        _outputs_look_like_a_notebook_cell(box)


def _outputs_look_like_a_notebook_cell(box):
    assert box.run("6 * 7").output == "42"
    assert box.run("x = 5").output == ""
    assert box.run("print('x is', x)\nx + 1").output == "x is 5\n6"
    assert box.run("print('only printed')\nNone").output == "only printed"
    assert box.run("import sympy as sp\ns = sp.symbols('s')\nsp.solve(s**2 - 2, s)").output == "[-sqrt(2), sqrt(2)]"
    assert box.run("sp.Rational(3, 6)").output == "1/2"
    multi = box.run("[list(range(30)), list(range(30))]").output
    assert multi.startswith("[[0,\n  1,") and multi.count("\n") > 30  # pretty-printed over several lines
    assert box.run("import os\nos.write(1, b'low-level\\n'); 7").output == "low-level\n7"


def test_exceptions_give_type_and_message(box):
    r = box.run("1 / 0")
    assert not r.ok and r.output == "ZeroDivisionError: division by zero"
    assert box.run("undefined_name").output == "NameError: name 'undefined_name' is not defined"
    assert box.run("1 +").output.startswith("SyntaxError:")


def test_state_persists_across_blocks(box):
    box.run("import numpy as np\ndef f(n):\n    return n * n\nvalues = np.arange(4)")
    assert box.run("f(values).tolist()").output == "[0, 1, 4, 9]"


@pytest.mark.slow
def test_an_endless_loop_times_out_and_leaves_no_process(box):
    started = time.monotonic()
    pid = box.interpreter_pid  # the group every process of the code stays in
    r = box.run("import subprocess, time\nsubprocess.Popen(['sleep', '60'])\nwhile True: time.sleep(0.1)")
    assert r.timed_out and not r.ok and time.monotonic() - started < box.timeout + 2
    time.sleep(0.2)
    assert live_processes_in_group(pid) == []  # the whole group, the sleep it started included, is gone
    assert box.run("1 + 1").output == "2"  # a fresh interpreter (the old state is lost)


def proc_stat(pid: int) -> tuple[str, list[str]] | None:
    """(command name, the fields after it: state, ppid, pgid, sid, ...) from /proc/<pid>/stat; None once gone.
    Read here, not through the sandbox's own helpers, so the tests check the kill independently."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()


def live_pids() -> list[tuple[int, list[str]]]:
    """(pid, stat fields) of every process that is not a zombie."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1][0] != "Z":
                found.append((int(entry), stat[1]))
    return found


def live_processes_in_group(pgid: int) -> list[int]:
    """Processes of the group that still run (a killed child whose parent died may linger as a zombie until the
    machine's init reaps it; it runs nothing)."""
    return [pid for pid, fields in live_pids() if int(fields[2]) == pgid]


@pytest.mark.slow
def test_cpu_time_is_limited_even_when_the_wall_clock_is_not():
    with Sandbox(timeout=30, cpu_seconds=1) as box:
        started = time.monotonic()
        r = box.run("while True: pass")
        assert not r.ok and r.timed_out and time.monotonic() - started < 10


def test_a_50_gb_allocation_fails_cleanly(box):
    r = box.run("import numpy as np\na = np.ones(50 * 2**30 // 8)")
    assert not r.ok and r.output.startswith("MemoryError")
    assert box.run("2 + 2").output == "4"  # the sandbox lives on


def test_the_interpreter_starts_under_its_limits_without_a_preexec_fn(monkeypatch):
    """The memory, core and file-size limits are the worker's own first act, so the parent's Popen needs no preexec_fn
    (with one, Python forks the whole parent holding its lock: a GPU process's decode loop stalled per sandbox)."""
    import subprocess

    from llmhelpers.inference import sandbox

    calls = []
    real = subprocess.Popen
    monkeypatch.setattr(sandbox.subprocess, "Popen", lambda *a, **k: calls.append(k) or real(*a, **k))
    with Sandbox(timeout=10, memory_bytes=3 * 2**30, max_file_bytes=5 * 2**20) as box:
        r = box.run("import resource as r\n[r.getrlimit(x) for x in (r.RLIMIT_AS, r.RLIMIT_FSIZE, r.RLIMIT_CORE)]")
    assert r.output == str([(3 * 2**30,) * 2, (5 * 2**20,) * 2, (0, 0)])
    assert calls and all(k.get("preexec_fn") is None for k in calls)


def test_ten_megabytes_of_printing_are_truncated(box):
    r = box.run("print('a' * 10_000_000)")
    assert r.truncated and len(r.output) < box.max_output_chars + 100 and r.output.endswith("characters]")


def test_working_directory_is_removed_and_secrets_are_absent(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_secret")
    with Sandbox() as box:
        out = box.run("import os\nsorted(os.environ), os.getcwd()").output
        workdir = box.workdir
        assert "HF_TOKEN" not in out and "AWS_SECRET" not in out and workdir in out
        assert box.run("open('scratch.txt', 'w').write('x')").ok
        assert box.run("os.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS']").output == "('1', '1')"
    assert not os.path.exists(workdir)


def test_code_that_writes_into_the_control_pipe_gets_an_error_not_a_crash(box):
    r = box.run("import os\nfor fd in range(3, 10):\n    try:\n        os.write(fd, b'not json\\n')\n    except OSError:\n        pass")
    assert not r.ok and "garbled" in r.output
    assert box.run("1 + 1").output == "2"  # a fresh interpreter takes over


# --- findings of the adversarial run (issue #18): each failed before the fix ----------------------------------------
UNPRIVILEGED_SCRIPT = r'''
import json, resource, sys
from llmhelpers.inference.sandbox import Sandbox
soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
resource.setrlimit(resource.RLIMIT_CPU, (100, 100))
try:
    resource.setrlimit(resource.RLIMIT_CPU, (100, 101))
    sys.exit("this process may raise its hard limits: the test would prove nothing")
except ValueError:
    pass
with Sandbox(timeout=20, cpu_seconds=4) as box:
    outputs = [box.run(code).output for code in sys.argv[1:]]
print(json.dumps(outputs))
'''


def run_unprivileged(*blocks: str) -> list[str]:
    """Blocks run in one sandbox by a process without CAP_SYS_RESOURCE, as an ordinary user or Docker's default root
    is: it may lower its limits, never raise them. As root, the capability is dropped from the bounding set before
    exec, so the new process never has it."""
    import ctypes
    import json
    import subprocess
    import sys

    def drop():
        if os.geteuid() == 0:
            PR_CAPBSET_DROP, CAP_SYS_RESOURCE = 24, 24
            ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0)

    proc = subprocess.run([sys.executable, "-c", UNPRIVILEGED_SCRIPT, *blocks], capture_output=True, text=True,
                          timeout=120, preexec_fn=drop)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_state_survives_blocks_that_really_spend_cpu_as_an_unprivileged_user():
    outputs = run_unprivileged(
        "import sympy as sp\nx = sp.symbols('x')\nroots = sp.solve(x**2 - 5*x + 6, x)",
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n'spent'",
        "while time.process_time() - t < 3: pass\n'spent more'",
        "sum(roots)")
    assert outputs == ["", "'spent'", "'spent more'", "5"]


@pytest.mark.slow
def test_hitting_the_cpu_limit_stops_the_block_and_keeps_the_state():
    with Sandbox(timeout=30, cpu_seconds=1) as box:
        box.run("kept = 41")
        r = box.run("while True: pass")
        assert not r.ok and r.timed_out and r.output.startswith("CPUTimeLimit: the code used more than 1 s")
        assert box.run("kept + 1").output == "42"
        r = box.run("try:\n    while True: pass\nexcept Exception:\n    'swallowed'")  # not an Exception
        assert r.timed_out and "CPUTimeLimit" in r.output


def test_a_lone_surrogate_or_undecodable_bytes_give_text_and_keep_the_interpreter(box):
    r = box.run("kept = 1\nprint(chr(0xdc80))")
    assert r.ok and r.output == "\\udc80"
    r.output.encode("utf-8")  # valid text for a tokenizer
    assert box.run("chr(0xdc80)").output == "'\\udc80'"
    r = box.run("import os\nos.write(1, b'\\xff\\xfe ok\\n')\nNone")
    assert r.ok and r.output == "\ufffd\ufffd ok"
    assert box.run("kept").output == "1"


def processes_with(marker: str) -> list[int]:
    found = []
    for pid, _ in live_pids():
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(pid)
    return found


def describe(pids: list[int]) -> str:
    """ppid, process group, session and state of each leftover and of its parents: where an escape ended up."""
    lines = []
    for pid in pids:
        chain, p = [], pid
        while p > 1 and len(chain) < 8:
            stat = proc_stat(p)
            if stat is None:
                chain.append(f"{p}: gone")
                break
            name, (state, ppid, pgid, sid) = stat[0], stat[1][:4]
            chain.append(f"{p} ({name}) state {state} pgid {pgid} sid {sid}")
            p = int(ppid)
        lines.append(" <- ".join(chain))
    return "; ".join(lines)


def test_the_keeper_is_the_subreaper_of_what_the_code_starts(box):
    """What catches a double-forked escape: its orphans are handed to the keeper, where the kill finds them."""
    code = ("import os, time\nr, w = os.pipe()\nif os.fork() == 0:\n    if os.fork() == 0:\n        time.sleep(0.3)\n"
            "        os.write(w, str(os.getppid()).encode())\n        os._exit(0)\n    os._exit(0)\n"
            "int(os.read(r, 32))")
    assert box.run(code).output == str(box.proc.pid)


def test_leaving_the_interpreters_process_group_is_refused(box):
    for code in ("os.setsid()", "os.setpgid(0, 0)", "subprocess.Popen(['sleep', '1'], start_new_session=True)"):
        assert box.run(f"import os, subprocess\n{code}").output.startswith("PermissionError"), code
    assert box.run("subprocess.run(['setsid', 'true']).returncode").output.endswith("1")  # setsid(1) fails


ESCAPES = {
    "double fork": "import os, subprocess\nif os.fork() == 0:\n    subprocess.Popen(['sleep', '{m}'])\n    os._exit(0)",
    "double fork, setsid tried": "import os, subprocess\nif os.fork() == 0:\n    try:\n        os.setsid()\n"
                                 "    except OSError:\n        pass\n    subprocess.Popen(['sleep', '{m}'])\n    os._exit(0)",
    "new session tried": "import subprocess\ntry:\n    subprocess.Popen(['sleep', '{m}'], start_new_session=True)\n"
                         "except OSError:\n    subprocess.Popen(['sleep', '{m}'])",
}


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["group", "tree walk"])
@pytest.mark.parametrize("how", sorted(ESCAPES))
def test_processes_that_leave_the_session_are_killed_by_a_timeout_and_by_close(how, kill):
    """`group`: the interpreter's process group killed at once (the filter keeps every process in it); `tree walk`:
    the fallback where the filter is missing (kill_tree), forced here."""
    import random

    for end in ("timeout", "close"):
        marker = f"{random.randint(10**6, 10**7)}.{random.randint(1, 999)}"  # a sleep length no one else uses
        with Sandbox(timeout=3, cpu_seconds=3) as box:
            box.confined = kill == "group"
            box.run(ESCAPES[how].format(m=marker))
            time.sleep(0.3)
            assert processes_with(marker), "the escape did not start (the test would prove nothing)"
            if end == "timeout":
                assert box.run("import time\ntime.sleep(30)").timed_out
                time.sleep(0.3)
                left = processes_with(marker)
                assert left == [], f"{how}: a process outlived the timeout: {describe(left)}"
                box.run("1")  # a fresh interpreter, which says whether it is confined
                box.confined = kill == "group"
                box.run(ESCAPES[how].format(m=marker))
        time.sleep(0.3)
        left = processes_with(marker)
        assert left == [], f"{how}: a process outlived close(): {describe(left)}"


def test_a_partial_line_on_the_reply_pipe_cannot_hold_run_past_its_timeout():
    code = ("import os, stat, time\nfor fd in range(3, 12):\n    try:\n"
            "        if stat.S_ISFIFO(os.fstat(fd).st_mode): os.write(fd, b'{\"output\": ')\n"
            "    except OSError: pass\ntime.sleep(60)")
    with Sandbox(timeout=2, cpu_seconds=2) as box:
        started = time.monotonic()
        r = box.run(code)
        assert r.timed_out and time.monotonic() - started < 5
        assert box.run("1 + 1").output == "2"


@pytest.mark.parametrize("flood", ["import os\nwhile True: os.write(1, b'x' * 65536)",
                                   "import subprocess\nsubprocess.run(['yes'])\n'after'"])
def test_an_output_flood_is_capped_on_disk(flood):
    cap = 2**20
    with Sandbox(timeout=3, cpu_seconds=3, max_file_bytes=cap) as box:
        box.run("kept = 7")
        r = box.run(flood)
        size = sum(os.path.getsize(os.path.join(box.workdir, f)) for f in os.listdir(box.workdir))
        assert size <= cap and len(r.output) < box.max_output_chars + 100
        assert box.run("kept").output == "7"  # the interpreter survived the flood


def test_a_gigabyte_print_is_truncated_and_the_interpreter_lives():
    with Sandbox(timeout=30, cpu_seconds=20) as box:  # building and writing 1 GB took over 3 s on a loaded 2-core CI
        box.run("kept = 3")
        r = box.run("print('a' * 1_000_000_000)")
        assert r.truncated and r.output.startswith("aaaa") and not r.timed_out
        assert box.run("kept").output == "3"


def test_input_does_not_read_the_control_pipe(box):
    assert box.run("input()").output == "EOFError: EOF when reading a line"
    assert box.run("import sys\nsys.stdin.read()").output == "''"
    assert box.run("1 + 1").output == "2"


def test_a_forged_reply_or_a_returning_fork_never_shifts_later_outputs(box):
    forged = ('import os, stat, json\nfor fd in range(3, 12):\n    try:\n        if stat.S_ISFIFO(os.fstat(fd).st_mode):'
              '\n            os.write(fd, json.dumps({"output": "forged", "ok": True, "truncated": False}).encode() + b"\\n")'
              '\n    except OSError: pass\n"real"')
    assert box.run(forged).output != "forged"
    assert [box.run(c).output for c in ("1", "2", "3")] == ["1", "2", "3"]
    assert box.run("import os\npid = os.fork()\n'child' if pid == 0 else 'parent'").output == "'parent'"
    assert [box.run(c).output for c in ("4", "5", "6")] == ["4", "5", "6"]


def test_closing_stdin_or_every_descriptor_with_a_live_thread_breaks_nothing():
    with Sandbox(timeout=3, cpu_seconds=3) as box:
        box.run("import os, threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nos.close(0)")
        assert box.run("'still here'").output == "'still here'"
        box.run("os.closerange(0, 64)")
        assert box.run("1 + 1").output == "2"
        workdir = box.workdir
    assert not os.path.exists(workdir)


def test_print_and_subprocess_output_keep_their_order_and_functions_pickle(box):
    out = box.run("import subprocess, sys\nprint('a')\nsubprocess.run(['echo', 'b'])\nprint('c')\n"
                  "sys.stdout.buffer.write(b'd\\n')\nNone").output
    assert out == "a\nb\nc\nd"
    r = box.run("from multiprocessing import Pool\ndef sq(n):\n    return n * n\nwith Pool(2) as p:\n"
                "    r = p.map(sq, range(4))\nr")
    assert r.output == "[0, 1, 4, 9]"


# --- findings of the adversarial round of issue #29: each failed before the fix ------------------------------------
def _clone_parent_escape(marker: str) -> str:
    """Code that makes a process with clone(CLONE_PARENT) twice (its parent would be the sandbox's parent's parent:
    outside every tree) which then leaves the session and execs a sleep; the raw syscall, as ctypes gives it."""
    import platform

    nr = {"x86_64": 56, "aarch64": 220}[platform.machine()]
    return (f"import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"def clone_parent():\n    return libc.syscall({nr}, 0x8000 | 17, 0, 0, 0, 0)\n"
            f"pid = clone_parent()\n"
            f"if pid == 0:\n    if clone_parent() == 0:\n        os.setsid()\n        os.execvp('sleep', ['sleep', '{marker}'])\n"
            f"    os._exit(0)\n"
            f"(pid, ctypes.get_errno())")


def test_clone_parent_cannot_leave_the_tree():
    import random

    marker = f"{random.randint(10**6, 10**7)}.{random.randint(1, 999)}"
    with Sandbox(timeout=5, cpu_seconds=5) as box:
        assert box.confined
        r = box.run(_clone_parent_escape(marker))
        assert r.output == "(-1, 1)"  # refused: EPERM
        assert box.run("import subprocess\nsubprocess.run(['true']).returncode").output == "0"  # forking still works
    time.sleep(0.3)
    assert processes_with(marker) == [], describe(processes_with(marker))


def test_the_code_cannot_signal_or_trace_the_keeper_or_signal_every_process(box):
    keeper = box.proc.pid
    assert box.run("import os\nos.getppid()").output == str(keeper)
    for call in ("os.kill(os.getppid(), 9)", "os.kill(-os.getppid(), 9)", "os.kill(-1, 0)",
                 "os.kill(os.getppid(), signal.SIGSTOP)", "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)"):
        r = box.run(f"import os, signal\n{call}")
        assert r.output.startswith(("PermissionError", "OSError: [Errno 38]")), (call, r.output)
    r = box.run("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                "libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno()")  # PTRACE_ATTACH
    assert r.output == "(-1, 1)"
    assert box.proc.poll() is None and box.run("'alive'").output == "'alive'"


def test_processes_of_an_interpreter_that_dies_abruptly_are_killed():
    import random

    marker = f"{random.randint(10**6, 10**7)}.{random.randint(1, 999)}"
    with Sandbox(timeout=5, cpu_seconds=5) as box:
        r = box.run(f"import os, subprocess\nsubprocess.Popen(['setsid', 'sleep', '{marker}'])\n"
                    "import time; time.sleep(0.3)\nos._exit(3)")
        assert not r.ok and "exit code 3" in r.output
        time.sleep(0.3)
        assert processes_with(marker) == [], describe(processes_with(marker))  # the keeper killed what was left
        assert box.run("1 + 1").output == "2"


FORGE = ("import sys\nworker = sys._getframe(1).f_locals\n"  # the REPL's frame: its send() and the request
         "worker['send']({{'tag': worker['request']['tag'], 'output': 'x' * {n}, 'ok': True, 'timed_out': False, "
         "'truncated': False}})\n")


def test_a_forged_reply_is_capped_here_and_later_outputs_stay_in_place():
    with Sandbox(timeout=5, cpu_seconds=5, max_output_chars=2000) as box:
        started = time.monotonic()
        r = box.run(FORGE.format(n=8_000_000))  # 8 MB: longer than any honest reply, not read past the cap
        assert "garbled" in r.output and time.monotonic() - started < 3
        r = box.run(FORGE.format(n=20_000))  # within the byte cap, past the character cap
        assert r.truncated and len(r.output) <= 2000 + 60 and r.output.endswith("[output truncated at 2000 characters]")
        assert [box.run(c).output for c in ("1", "'x' * 3000 == 'x' * 3000", "3")] == ["1", "True", "3"]
        assert len(box.run("'y' * 5000").output) <= 2000 + 60  # an honest long output is cut at the cap too


def test_a_forged_reply_never_becomes_more_tokens_than_the_cap(tok_current):
    from llmhelpers.inference.tool_use import ToolRunner

    with ToolRunner(tok_current, timeout=5, max_output_chars=300) as tools:
        ids = tools.execute(1, "```python\n" + FORGE.format(n=3000) + "\n```\n```output\n")
        text = tok_current.decode(ids)
        assert len(ids) <= 300 + 30 and text.startswith("x" * 200) and "[output truncated at 300" in text
        emoji = tools.execute(2, "```python\nprint('\\U0001F600' * 300)\n```\n```output\n")  # 300 characters,
        assert len(emoji) <= 300 + 30  # about 4 byte tokens each: cut at the token cap
        assert tok_current.decode(emoji).endswith("[output truncated at 300 tokens]\n```")


@pytest.mark.slow
def test_cpu_time_is_enforced_here_when_the_code_lifts_its_own_limit():
    with Sandbox(timeout=30, cpu_seconds=1) as box:
        started = time.monotonic()
        r = box.run("import resource, signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
                    "resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
                    "while True: pass")
        assert r.timed_out and r.output.startswith("CPUTimeLimit") and time.monotonic() - started < 10
        assert box.run("1 + 1").output == "2"


def test_interpreter_start_up_does_not_count_against_the_first_blocks_timeout(monkeypatch, tmp_path):
    from llmhelpers.inference import sandbox

    slow = tmp_path / "slow_worker.py"  # a slow start: 1.5 s, then the real worker
    slow.write_text(f"import runpy, sys, time\ntime.sleep(1.5)\nrunpy.run_path({sandbox.WORKER!r}, run_name='__main__')\n")
    monkeypatch.setattr(sandbox, "WORKER", str(slow))
    box = Sandbox(timeout=1, cpu_seconds=1)
    try:
        assert box.run("1 / 0").output == "ZeroDivisionError: division by zero"
    finally:
        box.close()


@pytest.mark.slow
def test_sigcont_and_fork_chains_cannot_hold_a_timeout():
    chain = ("import os, signal, time\nme = os.getpid()\n"
             "def chain():\n    while True:\n        if os.fork() == 0:\n"
             "            try: os.kill(me, signal.SIGCONT)\n            except OSError: pass\n"
             "            continue\n        os._exit(0)\n"
             "if os.fork() == 0: chain()\nwhile True: time.sleep(0.01)")
    with Sandbox(timeout=2, cpu_seconds=2) as box:
        keeper, interpreter = box.proc.pid, box.interpreter_pid
        started = time.monotonic()
        r = box.run(chain)
        assert r.timed_out and time.monotonic() - started < 8
        time.sleep(0.5)
        assert [pid for pid, fields in live_pids() if int(fields[1]) == keeper] == []
        assert box.run("1 + 1").output == "2"
    time.sleep(0.5)
    assert live_processes_in_group(interpreter) == []  # nothing of the chain runs on, below init or elsewhere


def test_a_folder_flood_is_stopped_and_the_folder_emptied():
    with Sandbox(timeout=20, cpu_seconds=20, max_workdir_files=2000, max_workdir_bytes=16 * 2**20) as box:
        started = time.monotonic()
        r = box.run("import os\nos.makedirs('d')\nfor i in range(200_000): open(f'd/{i}', 'w').close()")
        assert not r.ok and "more than 2,000 files" in r.output and time.monotonic() - started < 10
        assert os.listdir(box.workdir) in ([], ["._output"])
        r = box.run("for i in range(8): open(f'f{i}', 'wb').write(b'x' * 4 * 2**20)\n'written'")
        assert not r.ok and "more than 16 MiB" in r.output
        assert box.run("1 + 1").output == "2"


NPROC_SCRIPT = r'''
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])  # a copy: only the standard library
sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
with sandbox.Sandbox(timeout=20, cpu_seconds=10, max_processes=32) as box:
    out = box.run("import os, time\nn = 0\ntry:\n    while n < 500:\n        if os.fork() == 0:\n"
                  "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
                  "    err = type(e).__name__\nn, err").output
print(json.dumps(out))
'''


@pytest.fixture
def shared_tmp():
    """A folder every user may enter (pytest's own tmp_path sits in a folder only its user may)."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="llm-nproc-")
    os.chmod(folder, 0o777)
    yield __import__("pathlib").Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_fork_loop_is_stopped_by_the_process_limit_for_an_ordinary_user(shared_tmp):
    """RLIMIT_NPROC never applies to root: as root the check runs as `nobody`, with a Python that user may run and
    a copy of the sandbox's two modules (they need only the standard library)."""
    import json
    import shutil
    import subprocess
    import sys

    from llmhelpers.inference import sandbox

    tmp_path = shared_tmp
    module = shutil.copy(sandbox.__file__, tmp_path / "sandbox.py")
    worker = shutil.copy(sandbox.WORKER, tmp_path / "sandbox_worker.py")  # found beside sandbox.py
    os.chmod(module, 0o644)
    os.chmod(worker, 0o644)

    def as_nobody():
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)

    for python in (sys.executable, shutil.which("python3", path="/usr/bin:/bin")):
        try:
            proc = subprocess.run([python, "-I", "-c", NPROC_SCRIPT, str(module)], capture_output=True, text=True,
                                  timeout=120, preexec_fn=as_nobody, cwd=tmp_path,
                                  env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path), "HOME": str(tmp_path)})
            break
        except (PermissionError, TypeError):
            continue
    else:
        pytest.skip("no Python that the user `nobody` may run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, err = eval(json.loads(proc.stdout))
    assert err == "BlockingIOError" and n < 40  # EAGAIN near 32 forks, far from 500


def test_the_seccomp_program_is_well_formed_and_names_the_keeper():
    import struct

    from llmhelpers.inference.sandbox_worker import SYSCALLS, seccomp_program

    assert seccomp_program("riscv64", 1234) is None  # unsupported: the sandbox warns that the filter is missing
    for machine in SYSCALLS:
        program = seccomp_program(machine, 1234)
        instructions = [struct.unpack("HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
        assert len(program) % 8 == 0 and len(instructions) < 64
        for i, (op, jt, jf, k) in enumerate(instructions):
            if op & 0x07 == 0x05:  # a conditional jump (BPF_JMP)
                assert i + 1 + jt < len(instructions) and jf == 0  # it lands inside the program
        assert instructions[-1][0] == 0x06 and instructions[-2][0] == 0x06  # it ends with returns
        keeper_checks = [k for op, _, _, k in instructions if op == 0x15 and k in (1234, (-1234) & 0xFFFFFFFF)]
        assert len(keeper_checks) == 3  # kill(keeper), kill(-keeper), tgkill(_, keeper)
