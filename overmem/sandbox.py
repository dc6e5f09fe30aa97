"""Running model-written programs: each in its own limited process, never in ours (`run_programs`).

A program runs as `python -I -B program.py` in a fresh temporary folder that is removed
afterwards, and passes when it runs to its end (a line appended to it writes a random marker)
and exits with code 0; it runs with
- a wall-clock limit, after which its whole process group is killed (`start_new_session` +
  `killpg`), and the pids cgroup or the pid namespace with it where there is one;
- resource limits: address space (`RLIMIT_AS`), CPU seconds, file size, open files, processes
  (`RLIMIT_NPROC`), no core files;
- a stripped environment (PATH, LANG, HOME and TMPDIR pointing into its folder; nothing else, so
  no tokens or keys), stdin closed, stdout and stderr to files (their ends are kept).

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

The limits and the program's view are set by a small launcher (`_LAUNCHER`, our code) that runs
between fork and the program: the caller's process may have threads (torch, tqdm), where
`preexec_fn` is unsafe.
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

# Programs of a root caller run as uid/gid SANDBOX_UID + 256 * (pid mod 2^20) + k, k the worker
# slot (0..workers-1) of the calling process: unprivileged ids that no account uses, one per
# concurrent program, also across processes (the ranks of a torchrun each run their own batch), so
# that RLIMIT_NPROC (which counts all processes of a user) bounds each program apart, and all
# processes of a finished program can be killed by its uid.
SANDBOX_UID = 999_000_000
MAX_WORKERS = 256
SANDBOX_DIR = "/sandbox"  # where the program's folder appears inside bwrap
PROGRAM_FILE = "program.py"
Tool = Literal["bwrap", "unshare", "none"]
TOOLS: tuple[Tool, ...] = ("bwrap", "unshare", "none")

# Between fork and the program: join the pids cgroup, set the resource limits, exec the rest
# (setpriv / unshare / bwrap / the interpreter). "0" written to cgroup.procs means "this process"
# in cgroup v1 and v2 alike.
_LAUNCHER = """\
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
if cfg["cgroup"]:
    with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
        f.write("0")
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
os.execv(sys.argv[2], sys.argv[2:])
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


def _command(isolation: Isolation, folder: str, uid: int, limits: Limits) -> list[str]:
    """The command after the launcher: [setpriv] [unshare | bwrap] python -I -B program.py."""
    drop = _as_uid(uid) if isolation.drop_user else []
    program = [isolation.interpreter, "-I", "-B", PROGRAM_FILE]
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
    path = root / f"overmem-{os.getpid()}-{next(_CGROUP_IDS)}"
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
                probe = _run_batch(["print('ok')"], Limits(timeout_s=20), candidate, workers=1)[0]
                if probe.passed and probe.stdout.strip() == "ok":
                    _SELECTED[key] = candidate
                    return candidate
                tried.append(f"{candidate.describe()} with {interpreter}: {probe.reason}")
    raise SandboxUnavailable("no sandbox could run a program here: " + "; ".join(tried) +
                             "; install bubblewrap (apt-get install bubblewrap) or see docs/sandbox.md")


# ---- running -----------------------------------------------------------------------------------


@dataclass
class _Running:
    index: int
    slot: int
    process: subprocess.Popen
    folder: str
    cgroup: Path | None
    started: float
    marker: str  # written by a line appended to the program: it ran to its end
    timed_out: bool = False


def run_programs(
    programs: Sequence[str], *, limits: Limits = Limits(), isolation: Isolation | None = None,
    workers: int | None = None,
) -> list[Outcome]:
    """Run each program in its own sandbox, at most `workers` at a time (default: the CPU count,
    at most 8); outcomes in the order of `programs`. A program that hangs, crashes or attacks
    the machine gives a failed outcome with its reason; the others still run."""
    isolation = isolation or select_isolation()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers: {workers} is not between 1 and {MAX_WORKERS}")
    return _run_batch(programs, limits, isolation, workers)


def _run_batch(programs: Sequence[str], limits: Limits, isolation: Isolation, workers: int) -> list[Outcome]:
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
                if job.process.poll() is None and time.monotonic() - job.started > limits.timeout_s:
                    job.timed_out = True
                    _kill(job)
                if job.process.poll() is not None:
                    outcomes[job.index] = _finish(job, limits, isolation)
                    running.remove(job)
                    free_slots.append(job.slot)
    finally:
        for job in running:  # interrupted (Ctrl-C): leave nothing behind
            _kill(job)
            _cleanup(job, isolation)
    return [o for o in outcomes if o is not None]


def _slot_uid(slot: int) -> int:
    """The uid (and gid) of the program in `slot` of this process (see SANDBOX_UID)."""
    return SANDBOX_UID + MAX_WORKERS * (os.getpid() % 2**20) + slot


def _start(index: int, program: str, limits: Limits, isolation: Isolation, slot: int) -> _Running:
    folder = tempfile.mkdtemp(prefix="overmem-sandbox-")
    path = os.path.join(folder, PROGRAM_FILE)
    marker = secrets.token_hex(16)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{program}\n\n__import__('sys').stdout.write('\\n{marker}\\n')\n")
    uid = _slot_uid(slot)
    if isolation.drop_user:
        for p in (folder, path):
            os.chown(p, uid, uid)
    cgroup = _make_cgroup(limits.max_processes) if isolation.pids_cgroup else None
    # CPU seconds: a backstop for the wall-clock limit, in case our poll loop is stopped.
    rlimits = limits.rlimits(cpu_s=int(limits.timeout_s) + 2)
    if not isolation.drop_user:  # RLIMIT_NPROC counts all our threads: allow that many more
        rlimits["RLIMIT_NPROC"] += _tasks_of(os.getuid())
    settings = {"cgroup": str(cgroup) if cgroup else None, "limits": rlimits}
    command = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(settings),
               *_command(isolation, folder, uid, limits)]
    out = open(os.path.join(folder, ".stdout"), "wb")
    err = open(os.path.join(folder, ".stderr"), "wb")
    try:
        process = subprocess.Popen(command, cwd=folder, env=_environment(folder), stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err, start_new_session=True, close_fds=True)
    except OSError:  # our interpreter cannot be started: leave no folder or cgroup behind
        if cgroup is not None:
            _remove_cgroup(cgroup)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        out.close()
        err.close()
    return _Running(index, slot, process, folder, cgroup, time.monotonic(), marker)


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


def _kill(job: _Running) -> None:
    try:
        os.killpg(job.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if job.cgroup is not None:
        _kill_cgroup(job.cgroup)
    job.process.wait()


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
    # Whatever the program left running in its group (a daemon of its own) goes with it.
    try:
        os.killpg(job.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    stdout = _tail(os.path.join(job.folder, ".stdout"), limits.output_chars)
    stderr = _tail(os.path.join(job.folder, ".stderr"), limits.output_chars)
    _cleanup(job, isolation)
    ended = f"\n{job.marker}\n" in stdout
    stdout = stdout.replace(f"\n{job.marker}\n", "")
    status, reason = _classify(job.process.returncode, stderr, job.timed_out, ended, limits)
    return Outcome(status, reason, seconds, stdout, stderr)


def _cleanup(job: _Running, isolation: Isolation) -> None:
    if job.cgroup is not None:
        _remove_cgroup(job.cgroup)
    elif isolation.drop_user and isolation.tool != "bwrap":
        # No cgroup and no pid namespace that bwrap tears down: a process that left the group
        # (setsid) is found by its uid, which only this program used. `kill -1` signals every
        # process the caller may signal: those of the uid.
        subprocess.run([*_as_uid(_slot_uid(job.slot)), "kill", "-9", "-1"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    shutil.rmtree(job.folder, ignore_errors=True)


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
