"""Running model-written programs: each in its own limited process, never in ours.

`run_tests` grades a program against its tests so that the program cannot forge the verdict: the
program runs in one sandboxed process (a "program server" that only answers calls of its entry
point) and the tests in another (the "checker", which runs only the dataset's own code). Every call
the tests make crosses a pipe as plain data (numbers, strings, lists, dicts ... encoded as JSON,
`_CODEC`), and the checker compares what came back with its own builtins. So a program that exits
early, reads a secret, patches builtins or returns an object that claims to equal anything changes
nothing the checker computes: the verdict is the checker's exit report, written in a folder and a
process the program cannot reach (another pid namespace under bwrap, another uid as root).
`run_programs` runs standalone programs (the sandbox's own probe and attack tests): there
"passed" means exit code 0 after the last line ran, which a hostile program can fake; grading
never relies on it.

Each process runs as `python -I -B SCRIPT` in a fresh temporary folder that is removed afterwards
(named with the grader's pid, so that a later run removes what a killed one left), with
- a wall-clock limit, after which its whole process group is killed (`start_new_session` +
  `killpg`), and the pids cgroup or the pid namespace with it where there is one;
- resource limits: address space (`RLIMIT_AS`), CPU seconds, file size, open files, processes
  (`RLIMIT_NPROC`), no core files;
- a stripped environment (PATH, LANG, HOME and TMPDIR pointing into its folder; nothing else, so
  no tokens or keys), stdin closed, stdout and stderr to files (their ends are kept);
- a supervisor (`_LAUNCHER`, our code) between the grader and the program that the kernel tells
  when the grader dies, however it dies (`PR_SET_PDEATHSIG`, SIGKILL included): it then kills the
  program with every process it made and removes its folder and cgroup. What even the supervisor
  could not clean (both killed at once) is cleaned by the next grader on this machine
  (`clean_leftovers`).

How much more isolation there is depends on the machine, and is detected when the first program
runs (`select_isolation`; the description goes into the results):
- `bwrap` (bubblewrap, when installed and user namespaces are allowed): new user, pid, network,
  IPC and UTS namespaces; a root file system holding only /usr (and the interpreter's own folder),
  read-only; a fresh /tmp; the program's folder the only writable place.
- `unshare` (util-linux, when the caller may make namespaces): new network and pid namespaces.
- `none`: the process and its limits only.
In each, a caller that is root drops to an unprivileged uid of the program's own (`setpriv`,
`SANDBOX_UID`), which is what makes `RLIMIT_NPROC` count at all (the kernel does not apply it to
root), and the program's processes are put in a cgroup of their own with `pids.max` when the
pids controller is writable.
docs/sandbox.md says what protects against what in each mode.

The limits and the program's view are set by the supervisor between fork and the program: the
caller's process may have threads (torch, tqdm), where `preexec_fn` is unsafe.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

# Processes of a root caller run as uid/gid SANDBOX_UID + 512 * (pid mod 2^20) + 2 * k (+ 1 for the
# checker of `run_tests`), k the worker slot (0..workers-1) of the calling process: unprivileged ids
# that no account uses, one per concurrent process, also across processes (the ranks of a torchrun
# each run their own batch), so that RLIMIT_NPROC (which counts all processes of a user) bounds each
# program apart, a program cannot read its checker's folder nor signal it, and all processes of a
# finished program can be killed by its uid. The largest id is below 2^31.
SANDBOX_UID = 999_000_000
MAX_WORKERS = 256
_UIDS_PER_GRADER = 2 * MAX_WORKERS
_PID_MOD = 2**20
SANDBOX_DIR = "/sandbox"  # where the program's folder appears inside bwrap
PROGRAM_FILE = "program.py"
FOLDER_PREFIX = "overmem-sandbox-"  # + the grader's pid + "-" + random: tempfile.gettempdir()/...
CGROUP_PREFIX = "overmem-"  # + the grader's pid + "-" + a counter, under the pids cgroup root
Tool = Literal["bwrap", "unshare", "none"]
TOOLS: tuple[Tool, ...] = ("bwrap", "unshare", "none")

# The supervisor: the process the grader starts for each program. The kernel signals it when the
# grader dies (PR_SET_PDEATHSIG = 1, SIGTERM), even by SIGKILL; it then kills the program (its
# process group, its cgroup and, as root, every process of its uid) and removes its folder and
# cgroup. Its child joins the pids cgroup ("0" written to cgroup.procs means "this process" in
# cgroup v1 and v2 alike), sets the resource limits and execs the rest (setpriv / unshare / bwrap /
# the interpreter); the supervisor exits as the child did. Standard library only (`python -I -S`).
_LAUNCHER = """\
import ctypes, json, os, resource, shutil, signal, sys
cfg = json.loads(sys.argv[1])
grader = os.getppid()
libc = ctypes.CDLL(None)
libc.prctl(1, signal.SIGTERM)
child = 0

def kill_all():
    for _ in range(50):
        pids = []
        if cfg["cgroup"]:
            try:
                pids += [int(p) for p in open(os.path.join(cfg["cgroup"], "cgroup.procs")).read().split()]
            except OSError:
                pass
        if cfg["uid"] is not None:
            for entry in os.listdir("/proc"):
                try:
                    if entry.isdigit() and os.stat("/proc/" + entry).st_uid == cfg["uid"]:
                        pids.append(int(entry))
                except OSError:
                    pass
        if child:
            pids.append(child)
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if child:
            try:
                os.waitpid(child, os.WNOHANG)
            except OSError:
                pass
        libc.usleep(10000)

def reap(*_):
    kill_all()
    shutil.rmtree(cfg["folder"], ignore_errors=True)
    if cfg["cgroup"]:
        for _ in range(100):
            try:
                os.rmdir(cfg["cgroup"])
                break
            except FileNotFoundError:
                break
            except OSError:
                libc.usleep(20000)
    os.killpg(os.getpgrp(), signal.SIGKILL)

signal.signal(signal.SIGTERM, reap)
if os.getppid() != grader:
    reap()
child = os.fork()
if child == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    libc.prctl(1, signal.SIGKILL)
    try:
        if cfg["cgroup"]:
            with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
                f.write("0")
        for name, value in cfg["limits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        os.execv(sys.argv[2], sys.argv[2:])
    except BaseException as err:
        os.write(2, ("sandbox: cannot start the program: %s\\n" % err).encode())
        os._exit(127)
for fd in cfg["fds"]:
    os.close(fd)
status = os.waitpid(child, 0)[1]
code = os.waitstatus_to_exitcode(status)
if code >= 0:
    os._exit(code)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
signal.signal(-code, signal.SIG_DFL)
os.kill(os.getpid(), -code)
os._exit(128 - code)
"""

# Plain data between a program and its checker: JSON with tags for what JSON lacks (tuples, sets,
# dicts with any keys, bytes, complex, and floats as repr so that nan, inf and -0.0 survive). The
# checker decodes into plain Python values only, so no object of the program's ever reaches it.
_CODEC = r"""
import json as _json

def encode(v):
    t = type(v)
    if v is None or t is bool or t is str or t is int:
        return v
    if t is float:
        return {"f": repr(v)}
    if t is list:
        return [encode(x) for x in v]
    if t is tuple:
        return {"t": [encode(x) for x in v]}
    if t is dict:
        return {"d": [[encode(k), encode(x)] for k, x in v.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "fs": [encode(x) for x in v]}
    if t is bytes:
        return {"b": v.hex()}
    if t is complex:
        return {"c": [repr(v.real), repr(v.imag)]}
    raise TypeError("a value of type %s cannot be passed between a program and its tests" % t.__name__)

def decode(v):
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, list):
        return [decode(x) for x in v]
    if not (isinstance(v, dict) and len(v) == 1):
        raise ValueError("malformed value")
    (tag, x), = v.items()
    if tag == "f":
        return float(x)
    if tag == "t":
        return tuple(decode(i) for i in x)
    if tag == "d":
        return {decode(k): decode(i) for k, i in x}
    if tag == "s":
        return {decode(i) for i in x}
    if tag == "fs":
        return frozenset(decode(i) for i in x)
    if tag == "b":
        return bytes.fromhex(x)
    if tag == "c":
        return complex(float(x[0]), float(x[1]))
    raise ValueError("malformed value")
"""

# The program server (untrusted process): loads program.py, then answers each call of the entry
# point read from the request pipe with its result or the exception it raised. `__name__` is not
# "__main__", as in HumanEval's own harness: a generation's example usage does not run.
_SERVER = _CODEC + r"""
import os, sys
requests = os.fdopen(int(sys.argv[1]), "rb")
replies = os.fdopen(int(sys.argv[2]), "wb")
entry_point = sys.argv[3]
with open("program.py", encoding="utf-8") as f:
    source = f.read()
namespace = {"__name__": "program", "__file__": "program.py"}
exec(compile(source, "program.py", "exec"), namespace)
for line in requests:
    try:
        call = _json.loads(line)
        function = namespace[entry_point]
        reply = {"ok": encode(function(*decode(call["args"]), **decode(call["kwargs"])))}
    except KeyError:
        reply = {"raise": ["NameError", "the program does not define %s" % entry_point]}
    except BaseException as err:
        try:
            message = str(err)[:500]
        except BaseException:
            message = ""
        reply = {"raise": [type(err).__name__, message]}
    replies.write(_json.dumps(reply).encode() + b"\n")
    replies.flush()
"""

# The checker (trusted code only: the dataset's prompt and tests): runs `check(candidate)` where
# each call of `candidate` goes to the program server, and writes its verdict as the last line of
# its stdout. The entry point's name is `candidate` too (HumanEval/33's test calls it by name). MAX_REPLY bounds one reply's size (a program answering with gigabytes).
_CHECKER = _CODEC + r"""
import builtins, os, sys, traceback
MAX_REPLY = 64 * 1024 * 1024
requests = os.fdopen(int(sys.argv[1]), "wb")
replies = os.fdopen(int(sys.argv[2]), "rb")

class ProgramEnded(Exception):
    pass

class CandidateRaised(Exception):
    pass

def candidate(*args, **kwargs):
    try:
        requests.write(_json.dumps({"args": encode(list(args)), "kwargs": encode(kwargs)}).encode() + b"\n")
        requests.flush()
    except BrokenPipeError:
        raise ProgramEnded() from None
    line = replies.readline(MAX_REPLY)
    if not line:
        raise ProgramEnded()
    if not line.endswith(b"\n"):
        raise CandidateRaised("ValueError", "a reply of more than %d bytes" % MAX_REPLY)
    reply = _json.loads(line)
    if not isinstance(reply, dict):
        raise CandidateRaised("ValueError", "a malformed reply")
    if "ok" in reply:
        return decode(reply["ok"])
    name, message = reply["raise"]
    known = getattr(builtins, str(name), None)
    if isinstance(known, type) and issubclass(known, Exception) and known is not AssertionError:
        err = known(message)
        err.from_candidate = (name, message)
        raise err
    raise CandidateRaised(str(name), str(message))

def verdict(status, reason=None):
    sys.stdout.write("\n" + _json.dumps({"status": status, "reason": reason}) + "\n")
    sys.stdout.flush()
    os._exit(0)

namespace = {"__name__": "tests"}
for name in ("prelude.py", "test.py"):
    with open(name, encoding="utf-8") as f:
        exec(compile(f.read(), name, "exec"), namespace)
    namespace[sys.argv[3]] = candidate
try:
    namespace["check"](candidate)
except ProgramEnded:
    verdict("program_ended")
except CandidateRaised as err:
    verdict("memory" if err.args[0] == "MemoryError" else "error", "%s: %s" % err.args)
except AssertionError as err:
    verdict("failed", traceback.format_exception_only(type(err), err)[-1].strip())
except BaseException as err:
    raised = getattr(err, "from_candidate", None)
    if raised:
        verdict("memory" if raised[0] == "MemoryError" else "error", "%s: %s" % raised)
    verdict("error", "the tests raised " + traceback.format_exception_only(type(err), err)[-1].strip())
verdict("passed")
"""


class SandboxUnavailable(RuntimeError):
    """No isolation mode could run a test program on this machine (exit code 1 on the command line)."""


@dataclass(frozen=True)
class Limits:
    """Per-program limits. `max_processes` bounds the program's processes (and threads) where
    the pids cgroup or an unprivileged uid makes it apply."""

    timeout_s: float = 10.0
    memory_mb: int = 2048
    max_processes: int = 64
    file_size_mb: int = 16
    open_files: int = 256
    output_chars: int = 2000  # the end of stdout and of stderr that is kept

    def rlimits(self, cpu_s: int) -> dict[str, int]:
        mb = 1024 * 1024
        return {"RLIMIT_AS": self.memory_mb * mb, "RLIMIT_CPU": cpu_s, "RLIMIT_FSIZE": self.file_size_mb * mb,
                "RLIMIT_NOFILE": self.open_files, "RLIMIT_NPROC": self.max_processes, "RLIMIT_CORE": 0}


@dataclass(frozen=True)
class Isolation:
    """How programs are isolated on this machine: the tool, the user they run as, whether a pids
    cgroup bounds their processes, and the interpreter (one the dropped user can run)."""

    tool: Tool
    drop_user: bool
    pids_cgroup: bool
    interpreter: str

    def describe(self) -> str:
        """One line for results files: "bwrap, unprivileged uid, pids cgroup"."""
        parts = [self.tool, "unprivileged uid" if self.drop_user else f"uid {os.geteuid()}"]
        if self.pids_cgroup:
            parts.append("pids cgroup")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "description": self.describe()}


@dataclass(frozen=True)
class Outcome:
    """What became of one program.

    `status`: "passed" (ran to its end, exit code 0: a line appended to the program writes a random
    marker, so a program that exits early with code 0 does not pass), "failed" (an AssertionError:
    a test did not hold), "error"
    (another exception or a non-zero exit), "timeout", "memory" (MemoryError under the address
    space limit) or "killed" (a signal we did not send). `reason` is one line (None if passed).
    """

    status: str
    reason: str | None
    seconds: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---- isolation ---------------------------------------------------------------------------------


def _is_root() -> bool:
    return os.geteuid() == 0


def _interpreters(drop_user: bool) -> list[str]:
    """Interpreters to try: ours first; when dropping the user, also the system's (ours may live
    in a folder others cannot enter, e.g. under /root)."""
    found = [sys.executable]
    if drop_user:
        found += [p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.isfile(p)]
    return list(dict.fromkeys(found))


def _interpreter_folders(interpreter: str) -> list[str]:
    """Folders bwrap must show for `interpreter` to run: none under /usr; else its prefixes."""
    real = os.path.realpath(interpreter)
    if real.startswith("/usr/"):
        return []
    if interpreter != sys.executable:
        return [os.path.dirname(os.path.dirname(real))]
    folders = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    return sorted(f for f in folders if not f.startswith("/usr/"))


_BWRAP_HELP: list[str] = []


def _bwrap_has(option: str) -> bool:
    """Whether this bwrap knows `option` (`--size` and `--disable-userns` are recent ones)."""
    if not _BWRAP_HELP:
        done = subprocess.run([shutil.which("bwrap") or "bwrap", "--help"], capture_output=True, text=True, check=False)
        _BWRAP_HELP.append(done.stdout + done.stderr)
    return option in _BWRAP_HELP[0]


def _bwrap_args(isolation: Isolation, folder: str, limits: Limits) -> list[str]:
    args = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
    if _bwrap_has("--disable-userns"):  # no namespaces of its own inside: less kernel to attack
        args += ["--unshare-user", "--disable-userns"]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for extra in _interpreter_folders(isolation.interpreter):
        args += ["--ro-bind", extra, extra]
    # /tmp is in memory, which RLIMIT_AS does not count: bounded like one file.
    tmp_size = ["--size", str(limits.file_size_mb * 1024 * 1024)] if _bwrap_has("--size") else []
    args += ["--proc", "/proc", "--dev", "/dev", *tmp_size, "--tmpfs", "/tmp", "--bind", folder, SANDBOX_DIR,
             "--chdir", SANDBOX_DIR, "--clearenv"]
    for key, value in _environment(SANDBOX_DIR).items():
        args += ["--setenv", key, value]
    return args


def _environment(folder: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder}


def _as_uid(uid: int) -> list[str]:
    return [shutil.which("setpriv") or "setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
            "--no-new-privs"]


def _command(isolation: Isolation, folder: str, uid: int, limits: Limits, script: Sequence[str]) -> list[str]:
    """The command after the launcher: [setpriv] [unshare | bwrap] python -I -B SCRIPT ARGS."""
    drop = _as_uid(uid) if isolation.drop_user else []
    program = [isolation.interpreter, "-I", "-B", *script]
    if isolation.tool == "bwrap":
        return drop + _bwrap_args(isolation, folder, limits) + program
    if isolation.tool == "unshare":  # namespaces need root: unshare first, then drop the user
        return [shutil.which("unshare") or "unshare", "--net", "--pid", "--kill-child"] + drop + program
    return drop + program


def _pids_cgroup_root() -> Path | None:
    """A writable cgroup folder with the pids controller (v1 `pids/`, or v2 where the root
    enables it), else None."""
    base = Path("/sys/fs/cgroup")
    v1 = base / "pids"
    if (v1 / "cgroup.procs").is_file() and os.access(v1, os.W_OK):
        return v1
    try:
        if "pids" in (base / "cgroup.subtree_control").read_text().split() and os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    return None


_CGROUP_IDS = itertools.count()


def _make_cgroup(max_processes: int) -> Path | None:
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = root / f"{CGROUP_PREFIX}{os.getpid()}-{next(_CGROUP_IDS)}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(max_processes))
    except OSError:
        _remove_cgroup(path)
        return None
    return path


def _kill_cgroup(path: Path) -> None:
    for _ in range(50):  # processes forking while we kill them: read again until empty
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _remove_cgroup(path: Path) -> None:
    if not path.exists():
        return
    _kill_cgroup(path)
    for _ in range(100):  # rmdir fails while the killed processes are still being reaped
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.02)


_SELECTED: dict[tuple[str, bool | None], Isolation] = {}


def select_isolation(tool: Tool | Literal["auto"] = "auto", drop_user: bool | None = None) -> Isolation:
    """The strongest isolation that works here (each candidate is tried on a one-line program).

    `tool` forces one tool ("auto": bwrap, else unshare, else none); `drop_user` forces running
    as an unprivileged uid or not (default: drop when root). Raises `SandboxUnavailable` when no
    choice can run a program here. The choice is remembered for the life of the process.
    """
    key = (tool, drop_user)
    if key in _SELECTED:
        return _SELECTED[key]
    if not _SELECTED:
        clean_leftovers()
    tools = TOOLS if tool == "auto" else (tool,)
    drops = [drop_user] if drop_user is not None else ([True, False] if _is_root() else [False])
    probe_cgroup = _make_cgroup(Limits().max_processes)  # writable is not enough: make one
    pids_cgroup = probe_cgroup is not None
    if probe_cgroup is not None:
        _remove_cgroup(probe_cgroup)
    tried = []
    for name in tools:
        if name != "none" and shutil.which(name) is None:
            tried.append(f"{name}: not installed")
            continue
        for drop in drops:
            if drop and (not _is_root() or shutil.which("setpriv") is None):
                tried.append(f"{name} with another uid: needs root and setpriv")
                continue
            for interpreter in _interpreters(drop):
                candidate = Isolation(name, drop, pids_cgroup, interpreter)
                # A program and its checker: the pipes between them must cross the isolation too.
                probe = _run_batch([_PROBE], Limits(timeout_s=20), candidate, workers=1)[0]
                if probe.passed and probe.stdout.strip() == "ok":
                    _SELECTED[key] = candidate
                    return candidate
                tried.append(f"{candidate.describe()} with {interpreter}: {probe.reason}")
    raise SandboxUnavailable("no sandbox could run a program here: " + "; ".join(tried) +
                             "; install bubblewrap (apt-get install bubblewrap) or see docs/sandbox.md")


# ---- running -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestedProgram:
    """A program to grade: the untrusted `program` (which must define `entry_point`), and the
    trusted `test` (it defines `check(candidate)`, which asserts on calls of `candidate`) with the
    trusted `prelude` it runs after (the task's prompt: the helpers its tests use). Values crossing
    between the two are plain data: None, bool, int, float, str, bytes, complex, and lists,
    tuples, dicts, sets and frozensets of them."""

    program: str
    test: str
    entry_point: str
    prelude: str = ""


# The probe of each isolation mode: a program and its checker, answering over the pipes.
_PROBE = TestedProgram("def f(x):\n    print('ok')\n    return x + 1\n", "def check(c):\n    assert c(1) == 2\n", "f")


@dataclass
class _Process:
    process: subprocess.Popen
    folder: str
    cgroup: Path | None
    uid: int


@dataclass
class _Running:
    index: int
    slot: int
    main: _Process  # the program of `run_programs`, the checker of `run_tests`
    server: _Process | None  # the program of `run_tests`
    started: float
    marker: str | None  # run_programs: written by a line appended to the program (it ran to its end)
    timed_out: bool = False

    @property
    def processes(self) -> list[_Process]:
        return [self.main] + ([self.server] if self.server else [])


def run_programs(
    programs: Sequence[str], *, limits: Limits = Limits(), isolation: Isolation | None = None,
    workers: int | None = None,
) -> list[Outcome]:
    """Run each program in its own sandbox, at most `workers` at a time (default: the CPU count,
    at most 8); outcomes in the order of `programs`. A program that hangs, crashes or attacks
    the machine gives a failed outcome with its reason; the others still run. "passed" is exit
    code 0 after the program's last line: a program can fake it; grade with `run_tests`."""
    return _run_batch(list(programs), limits, isolation or select_isolation(), _workers(workers))


def run_tests(
    programs: Sequence[TestedProgram], *, limits: Limits = Limits(), isolation: Isolation | None = None,
    workers: int | None = None,
) -> list[Outcome]:
    """Grade each program against its tests, the program and the tests in two sandboxes of their
    own (module docstring), at most `workers` pairs at a time; outcomes in order. "passed" is the
    checker's verdict that `check(candidate)` returned: nothing the program does can write it.
    The time limit covers the pair; stdout and stderr in the outcome are the program's."""
    return _run_batch(list(programs), limits, isolation or select_isolation(), _workers(workers))


def _workers(workers: int | None) -> int:
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers: {workers} is not between 1 and {MAX_WORKERS}")
    return workers


def _run_batch(programs: Sequence[str | TestedProgram], limits: Limits, isolation: Isolation,
               workers: int) -> list[Outcome]:
    outcomes: list[Outcome | None] = [None] * len(programs)
    pending = list(enumerate(programs))[::-1]
    free_slots = list(range(workers))[::-1]
    running: list[_Running] = []
    try:
        while pending or running:
            while pending and free_slots:
                index, program = pending.pop()
                running.append(_start(index, program, limits, isolation, free_slots.pop()))
            time.sleep(0.005)
            for job in list(running):
                if job.main.process.poll() is None and time.monotonic() - job.started > limits.timeout_s:
                    job.timed_out = True
                    _kill(job)
                if job.main.process.poll() is not None:
                    outcomes[job.index] = _finish(job, limits, isolation)
                    running.remove(job)
                    free_slots.append(job.slot)
    finally:
        for job in running:  # interrupted (Ctrl-C, SIGTERM): leave nothing behind
            _kill(job)
            _cleanup(job, isolation)
    return [o for o in outcomes if o is not None]


def _slot_uid(slot: int) -> int:
    """The uid (and gid) of the program in `slot` of this process (see SANDBOX_UID); its checker's
    is the next one."""
    return SANDBOX_UID + _UIDS_PER_GRADER * (os.getpid() % _PID_MOD) + 2 * slot


def _start(index: int, program: str | TestedProgram, limits: Limits, isolation: Isolation, slot: int) -> _Running:
    uid = _slot_uid(slot)
    if isinstance(program, str):
        marker = secrets.token_hex(16)
        source = f"{program}\n\n__import__('sys').stdout.write('\\n{marker}\\n')\n"
        main = _start_process({PROGRAM_FILE: source}, [PROGRAM_FILE], uid, limits, isolation, ())
        return _Running(index, slot, main, None, time.monotonic(), marker)
    requests_read, requests_write = os.pipe()
    replies_read, replies_write = os.pipe()
    try:
        server = _start_process({PROGRAM_FILE: program.program, "server.py": _SERVER},
                                ["server.py", str(requests_read), str(replies_write), program.entry_point],
                                uid, limits, isolation, (requests_read, replies_write))
        try:
            checker = _start_process({"checker.py": _CHECKER, "prelude.py": program.prelude, "test.py": program.test},
                                     ["checker.py", str(requests_write), str(replies_read), program.entry_point], uid + 1, limits,
                                     isolation, (requests_write, replies_read))
        except BaseException:
            job = _Running(index, slot, server, None, time.monotonic(), None)
            _kill(job)
            _cleanup(job, isolation)
            raise
    finally:  # the two processes hold the pipes now: our copies would keep them from seeing an end
        for fd in (requests_read, requests_write, replies_read, replies_write):
            os.close(fd)
    return _Running(index, slot, checker, server, time.monotonic(), None)


def _start_process(files: dict[str, str], script: Sequence[str], uid: int, limits: Limits, isolation: Isolation,
                   fds: Sequence[int]) -> _Process:
    """One sandboxed process: a fresh folder holding `files`, the supervisor, the command."""
    folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    if isolation.drop_user:
        for name in [".", *files]:
            os.chown(os.path.join(folder, name), uid, uid)
    cgroup = _make_cgroup(limits.max_processes) if isolation.pids_cgroup else None
    # CPU seconds: a backstop for the wall-clock limit, in case our poll loop is stopped.
    rlimits = limits.rlimits(cpu_s=int(limits.timeout_s) + 2)
    if not isolation.drop_user:  # RLIMIT_NPROC counts all our threads: allow that many more
        rlimits["RLIMIT_NPROC"] += _tasks_of(os.getuid())
    settings = {"cgroup": str(cgroup) if cgroup else None, "limits": rlimits, "folder": folder,
                "uid": uid if isolation.drop_user else None, "fds": list(fds)}
    command = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(settings),
               *_command(isolation, folder, uid, limits, script)]
    out = open(os.path.join(folder, ".stdout"), "wb")
    err = open(os.path.join(folder, ".stderr"), "wb")
    try:
        process = subprocess.Popen(command, cwd=folder, env=_environment(folder), stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err, start_new_session=True, close_fds=True, pass_fds=fds)
    except OSError:  # our interpreter cannot be started: leave no folder or cgroup behind
        if cgroup is not None:
            _remove_cgroup(cgroup)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        out.close()
        err.close()
    return _Process(process, folder, cgroup, uid)


def _tasks_of(uid: int) -> int:
    """How many tasks (threads) `uid` has: what RLIMIT_NPROC counts (the owner of /proc/PID is the
    process's user; each of its threads is an entry of /proc/PID/task)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # the process ended meanwhile
                pass
    return count


def _kill_process(proc: _Process) -> None:
    try:
        os.killpg(proc.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.cgroup is not None:
        _kill_cgroup(proc.cgroup)
    proc.process.wait()


def _kill(job: _Running) -> None:
    for proc in job.processes:
        _kill_process(proc)


def _tail(path: str, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * chars))
            return f.read().decode("utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def _finish(job: _Running, limits: Limits, isolation: Isolation) -> Outcome:
    seconds = round(time.monotonic() - job.started, 3)
    server_running = False
    if job.server is not None and not job.timed_out:
        try:  # the checker saw the program's end just before the program's supervisor did
            job.server.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            server_running = True
    # Whatever the programs left running in their groups (a daemon of their own) goes with them.
    for proc in job.processes:
        try:
            os.killpg(proc.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    program = job.server or job.main
    stdout = _tail(os.path.join(program.folder, ".stdout"), limits.output_chars)
    stderr = _tail(os.path.join(program.folder, ".stderr"), limits.output_chars)
    if job.server is None:
        ended = f"\n{job.marker}\n" in stdout
        stdout = stdout.replace(f"\n{job.marker}\n", "")
        status, reason = _classify(program.process.returncode, stderr, job.timed_out, ended, limits)
    else:
        report = _tail(os.path.join(job.main.folder, ".stdout"), 4000).rstrip("\n").rpartition("\n")[2]
        status, reason = _verdict(report, _tail(os.path.join(job.main.folder, ".stderr"), 2000), job, stderr,
                                  server_running, limits)
    _cleanup(job, isolation)
    return Outcome(status, reason, seconds, stdout, stderr)


def _verdict(report: str, checker_stderr: str, job: _Running, program_stderr: str, server_running: bool,
             limits: Limits) -> tuple[str, str | None]:
    """The status of a graded program from its checker's last line (a JSON verdict)."""
    if job.timed_out:
        return "timeout", f"timeout: still running after {limits.timeout_s:g} s"
    try:
        verdict = json.loads(report)
        status, reason = verdict["status"], verdict["reason"]
    except (ValueError, KeyError, TypeError):  # the checker itself failed: no verdict, no pass
        lines = [line.strip() for line in checker_stderr.splitlines() if line.strip()]
        if any("MemoryError" in line for line in lines[-3:]):
            return "memory", f"memory: the tests ran over the {limits.memory_mb} MB limit"
        return "error", ("the tests could not finish: " + (lines[-1] if lines else "no verdict"))[:300]
    if status != "program_ended":
        return status, None if reason is None else str(reason)[:300]
    if server_running:
        return "error", "the program stopped answering its tests"
    returncode = job.server.process.returncode
    if returncode == 0:  # sys.exit(0), os._exit(0), unittest.main(): before the tests called it
        return "error", "the program exited before its tests ran (exit code 0)"
    return _classify(returncode, program_stderr, False, True, limits)


def _cleanup(job: _Running, isolation: Isolation) -> None:
    for proc in job.processes:
        if proc.cgroup is not None:
            _remove_cgroup(proc.cgroup)
        elif isolation.drop_user and isolation.tool != "bwrap":
            # No cgroup and no pid namespace that bwrap tears down: a process that left the group
            # (setsid) is found by its uid, which only this program used. `kill -1` signals every
            # process the caller may signal: those of the uid.
            subprocess.run([*_as_uid(proc.uid), "kill", "-9", "-1"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(proc.folder, ignore_errors=True)


def _classify(returncode: int, stderr: str, timed_out: bool, ended: bool, limits: Limits) -> tuple[str, str | None]:
    if timed_out:
        return "timeout", f"timeout: still running after {limits.timeout_s:g} s"
    if returncode == 0:
        if not ended:  # `sys.exit(0)` or `unittest.main()` in the code: the tests never ran
            return "error", "exited before the end of the program (exit code 0)"
        return "passed", None
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "MemoryError" in stderr:
        return "memory", f"memory: over the {limits.memory_mb} MB limit ({last[:200]})"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        if -returncode == signal.SIGXCPU:
            return "timeout", f"timeout: CPU limit of {int(limits.timeout_s) + 2} s"
        if -returncode == signal.SIGXFSZ:
            return "error", f"file size over the {limits.file_size_mb} MB limit"
        return "killed", f"killed by {name}" + (f" ({last[:200]})" if last else "")
    if last.startswith("AssertionError"):
        return "failed", last[:300]
    return "error", (last or f"exit code {returncode}")[:300]


# ---- what killed graders left ------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str, prefix: str) -> int | None:
    """The grader pid in a folder or cgroup name `PREFIX<pid>-...`, None for other names."""
    pid, dash, _ = name[len(prefix):].partition("-")
    return int(pid) if name.startswith(prefix) and dash and pid.isdigit() else None


def clean_leftovers() -> int:
    """Remove what graders that died on this machine left behind (their supervisors killed with
    them): program folders and pids cgroups named with a pid that no longer runs, and, as root,
    processes of sandbox uids whose grader no longer runs. Returns how many were removed."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        owner = _owner(folder.name, FOLDER_PREFIX)
        if owner is not None and not _alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    root = _pids_cgroup_root()
    if root is not None:
        for cgroup in root.glob(CGROUP_PREFIX + "*"):
            owner = _owner(cgroup.name, CGROUP_PREFIX)
            if owner is not None and cgroup.is_dir() and not _alive(owner):
                _remove_cgroup(cgroup)
                removed += 1
    if _is_root():
        live = {int(e.name) % _PID_MOD for e in os.scandir("/proc") if e.name.isdigit()}
        for entry in os.scandir("/proc"):
            try:
                uid = entry.stat().st_uid if entry.name.isdigit() else -1
            except OSError:
                continue
            offset = uid - SANDBOX_UID
            if 0 <= offset < _UIDS_PER_GRADER * _PID_MOD and offset // _UIDS_PER_GRADER not in live:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                    removed += 1
                except OSError:
                    pass
    return removed
