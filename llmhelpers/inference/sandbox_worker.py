"""The sandbox's worker: the processes `llmhelpers.inference.sandbox.Sandbox` starts, run as a script
(`python -I -S sandbox_worker.py CPU_SECONDS OUTPUT_CHARS MAX_PROCESSES MEMORY_BYTES FILE_BYTES SYS_PATH...`);
standard library only.

It runs as two processes. The *keeper* (the process `Sandbox` starts) is a child subreaper and does nothing but reap:
processes the code starts stay below it even after a double fork or the interpreter's own death, and when the
interpreter dies the keeper kills what is left and exits with the interpreter's status. The *interpreter* (its child,
in a session of its own) installs a seccomp filter that keeps the code from leaving its process group (setsid,
setpgid) or the tree (clone with CLONE_PARENT, clone3) or touching the keeper (any signal, ptrace, another process's
memory, kill(-1)), then serves a tiny REPL: JSON lines in on a private copy of stdin (stdin itself becomes /dev/null),
one tagged JSON line out per block on a private copy of stdout. The code's stdout/stderr (Python and
file-descriptor level) go, in order, to a capture file whose size RLIMIT_FSIZE caps.

Nothing the interpreter replies is trusted beyond its tag: the parent caps what it reads and shows, and watches the
CPU time and the working directory itself (sandbox.py).
"""
import ast
import ctypes
import json
import os
import platform
import resource
import signal
import struct
import sys
import time
import types

PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 36, 38, 22, 2

# Per architecture: the audit arch value and the syscall numbers the filter names.
SYSCALLS = {
    "x86_64": (0xC000003E, dict(clone=56, clone3=435, setsid=112, setpgid=109, ptrace=101, kill=62, tkill=200,
                                tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_open=434,
                                pidfd_send_signal=424, process_vm_readv=310, process_vm_writev=311)),
    "aarch64": (0xC00000B7, dict(clone=220, clone3=435, setsid=157, setpgid=154, ptrace=117, kill=129, tkill=130,
                                 tgkill=131, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, pidfd_open=434,
                                 pidfd_send_signal=424, process_vm_readv=270, process_vm_writev=271)),
}


# --- the keeper ----------------------------------------------------------------------------------------------------
def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


def keep(interpreter: int) -> None:
    """Reap everything below; once the interpreter is gone, kill its group and whatever else is left, then exit with
    the interpreter's status (a signal death as the same signal)."""
    keeper, status = os.getpid(), None
    while True:
        try:
            pid, st = os.waitpid(-1, 0 if status is None else os.WNOHANG)
        except ChildProcessError:  # nothing is left below the keeper
            break
        if pid == interpreter:
            status = st
        if status is not None:  # the interpreter is gone: what it left behind goes too
            try:
                os.killpg(interpreter, signal.SIGKILL)
            except OSError:
                pass
            for p in children_of(keeper):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            if pid == 0:
                time.sleep(0.01)
    if status is not None and os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(keeper, os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else 1)


# --- the seccomp filter --------------------------------------------------------------------------------------------
def seccomp_program(machine: str, keeper: int) -> bytes | None:
    """The classic-BPF program (struct sock_filter[]) of the filter, or None on an architecture not in SYSCALLS."""
    if machine not in SYSCALLS:
        return None
    arch, nr = SYSCALLS[machine]
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050001, 0x00050026
    LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
    prog = []  # (code, jump-if-true label, 0, k) and labels; jumps are resolved below

    def load(offset):
        prog.append((LD, 0, 0, offset))

    def ret(value):
        prog.append((RET, 0, 0, value))

    def jump_if(op, k, label):  # to `label` when true, else on to the next instruction
        prog.append((op, label, 0, k))

    load(4)
    jump_if(JEQ, arch, "native")
    ret(ENOSYS)  # another ABI (i386, x32): nothing runs through it
    prog.append("native")
    load(0)
    if machine == "x86_64":
        jump_if(JGE, 0x40000000, "nosys")
    for name in ("clone3", "pidfd_send_signal"):
        jump_if(JEQ, nr[name], "nosys")  # glibc falls back to clone for clone3; pidfds could name the keeper
    # setsid/setpgid: every process of the code stays in the interpreter's group, which one killpg ends at once
    # (a fork racing the kill cannot leave a survivor, as it can between two reads of /proc)
    for name in ("setsid", "setpgid", "ptrace", "process_vm_readv", "process_vm_writev"):
        jump_if(JEQ, nr[name], "deny")
    jump_if(JEQ, nr["clone"], "clone")
    for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open"):
        jump_if(JEQ, nr[name], "target")
    ret(ALLOW)
    prog.append("clone")
    load(16)
    jump_if(JSET, 0x8000, "deny")  # CLONE_PARENT in the flags
    ret(ALLOW)
    prog.append("target")
    load(16)  # the low 32 bits of the first argument: a pid, a group (negative) or -1
    for pid in (keeper, (-keeper) & 0xFFFFFFFF, 0xFFFFFFFF):
        jump_if(JEQ, pid, "deny")
    load(24)  # tgkill's second argument is the thread: the keeper's only thread has its pid
    jump_if(JEQ, keeper, "deny")
    ret(ALLOW)
    prog.append("deny")
    ret(EPERM)
    prog.append("nosys")
    ret(ENOSYS)
    labels, code = {}, []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    return b"".join(struct.pack("HBBI", op, labels[jt] - i - 1 if op in (JEQ, JSET, JGE) else 0, 0, k)
                    for i, (op, jt, _, k) in enumerate(code))


def confine(libc, keeper: int) -> bool:
    """Install the filter (inherited by everything the code starts, never removable); False where unsupported."""
    program = seccomp_program(platform.machine(), keeper)
    if program is None:
        return False
    buffer = ctypes.create_string_buffer(program)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # required for an unprivileged filter
        return False
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


# --- the interpreter's REPL ----------------------------------------------------------------------------------------
class CPUTimeLimit(BaseException):  # not an Exception: a bare `except Exception` in the code does not swallow it
    pass


class Bytes:
    """sys.stdout.buffer."""

    def __init__(self, fd):
        self.fd = fd

    def write(self, b):
        data = bytes(b)
        n = len(data)
        while data:
            try:
                data = data[os.write(self.fd, data):]
            except OSError:
                break
        return n

    def flush(self):
        pass


class Stream:
    """print() and sys.stdout.write() straight to fd 1/2, in order with what subprocesses write there."""
    encoding, errors = "utf-8", "backslashreplace"

    def __init__(self, fd):
        self.fd, self.buffer = fd, Bytes(fd)

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
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def fileno(self):
        return self.fd

    def isatty(self):
        return False

    def writable(self):
        return True

    def readable(self):
        return False


def pretty_printer():
    """IPython's pretty printer (what a notebook cell shows), else repr."""
    try:
        from IPython.lib.pretty import pretty
    except Exception:
        return repr
    return pretty


def text_of(err) -> str:
    try:
        return f"{type(err).__name__}: {err}"
    except BaseException:
        return type(err).__name__


def serve(cpu: int, cap: int, confined: bool) -> None:
    """The REPL: one request line in, one tagged reply line out, until the control pipe closes."""
    control = os.fdopen(os.dup(0), "rb")
    reply_fd = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    capture = open("._output", "w+b")
    os.dup2(capture.fileno(), 1)
    os.dup2(capture.fileno(), 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the file-size cap a write fails (EFBIG) instead of killing

    def send(message):
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(reply_fd, data):]

    running = False

    def on_xcpu(signum, frame):
        if running:
            raise CPUTimeLimit(f"the code used more than {cpu} s of CPU time and was stopped")

    signal.signal(signal.SIGXCPU, on_xcpu)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)  # never raised (an unprivileged process may not); only the soft
    pretty = None  # IPython's printer, imported at the first value shown: ~90 ms that most sandboxes never need
    main = types.ModuleType("__main__")  # the code's globals: a real __main__, so its functions pickle
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    scope = main.__dict__
    me = os.getpid()
    out, err_out, stdin = Stream(1), Stream(2), open(os.devnull)
    send({"ready": me, "confined": confined})  # before any code runs: the parent can trust this line
    while True:
        line = control.readline()
        if not line:
            break
        request = json.loads(line)
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = int(used.ru_utime + used.ru_stime) + 1
        soft = spent + cpu if hard == resource.RLIM_INFINITY else min(spent + cpu, hard)
        capture.seek(0)
        capture.truncate()
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
                    pretty = pretty or pretty_printer()
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
                text = text[:cap] + f"\n... [output truncated at {cap} characters]"  # = sandbox.truncation_note
        except BaseException as err:  # e.g. a MemoryError of an enormous final value
            text, ok, truncated = text_of(err), False, False
        send({"tag": request["tag"], "output": text, "ok": ok, "timed_out": timed_out, "truncated": truncated})


def main(argv: list[str]) -> None:
    cpu, cap, max_processes, memory, file_size = map(int, argv[:5])
    # the limits first, before anything else runs (they only lower; no privilege needed). Set here, not by the parent
    # between fork and exec: a preexec_fn makes Python fork the whole parent with its lock held, which stalled a GPU
    # process's decode loop for milliseconds per sandbox (issue #32: 42 s of host time over 2,000 answers)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))  # per file; the folder: sandbox._disk_over
    sys.path[:] = [p for p in argv[5:] if p] or sys.path
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the code's processes come to the keeper
    if os.geteuid() != 0:  # RLIMIT_NPROC counts every process of the user, and never applies to root
        mine = sum(1 for p in os.listdir("/proc") if p.isdigit() and os.stat(f"/proc/{p}").st_uid == os.getuid())
        _, most = resource.getrlimit(resource.RLIMIT_NPROC)
        allowed = mine + max_processes if most == resource.RLIM_INFINITY else min(mine + max_processes, most)
        resource.setrlimit(resource.RLIMIT_NPROC, (allowed, allowed))
    keeper = os.getpid()
    interpreter = os.fork()
    if interpreter:
        os.close(0)
        os.close(1)  # the pipes are the interpreter's: when it and its processes die, they close
        keep(interpreter)
    os.setsid()  # a group and session of its own: kill(0, ...) of the code never reaches the keeper
    serve(cpu, cap, confine(libc, keeper))


if __name__ == "__main__":
    main(sys.argv[1:])
