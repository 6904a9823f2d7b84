"""The Python sandbox for tool-integrated reasoning: notebook-style outputs, state across blocks, and its limits
(timeout kills the process group, memory, CPU, output size), a removed working directory, no secrets."""
import os
import time

import pytest

from llmhelpers.tools import Sandbox


@pytest.fixture
def box():
    with Sandbox(timeout=3, cpu_seconds=2) as sandbox:
        yield sandbox


def test_outputs_look_like_a_notebook_cell(box):
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


def test_an_endless_loop_times_out_and_leaves_no_process(box):
    started = time.monotonic()
    pid = box.proc.pid
    r = box.run("import subprocess\nsubprocess.Popen(['sleep', '60'])\nwhile True: pass")
    assert r.timed_out and not r.ok and time.monotonic() - started < box.timeout + 2
    time.sleep(0.2)
    assert live_processes_in_group(pid) == []  # the whole group, the sleep it started included, is gone
    assert box.run("1 + 1").output == "2"  # a fresh interpreter (the old state is lost)


def live_processes_in_group(pgid: int) -> list[int]:
    """Processes of the group that still run (a killed child whose parent died may linger as a zombie until the
    machine's init reaps it; it runs nothing)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry))
    return found


def test_cpu_time_is_limited_even_when_the_wall_clock_is_not():
    with Sandbox(timeout=30, cpu_seconds=1) as box:
        started = time.monotonic()
        r = box.run("while True: pass")
        assert not r.ok and r.timed_out and time.monotonic() - started < 10


def test_a_50_gb_allocation_fails_cleanly(box):
    r = box.run("import numpy as np\na = np.ones(50 * 2**30 // 8)")
    assert not r.ok and r.output.startswith("MemoryError")
    assert box.run("2 + 2").output == "4"  # the sandbox lives on


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
