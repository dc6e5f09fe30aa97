"""The sandbox against hostile programs, in every isolation mode this machine has.

One batch per mode holds a good program, then the attacks, then a good program again: each
attack is contained and reported with its reason, and the programs after it still run. The fork
bomb is bounded (at most 500 forks, each child sleeping 30 s), so a failed containment cannot
take the machine down.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import tempfile
from pathlib import Path

import pytest

from overmem import sandbox
from overmem.sandbox import Limits, run_programs, run_tests, select_isolation
from tests.conftest import processes_named

LIMITS = Limits(timeout_s=4, memory_mb=512)


def _isolation(tool: str) -> sandbox.Isolation:
    try:
        return select_isolation(tool)
    except RuntimeError as err:
        pytest.skip(f"isolation {tool!r} is not available here: {err}")


def _protected(iso: sandbox.Isolation) -> bool:
    """Whether the file system is out of the program's reach: bwrap, or a user other than ours."""
    return iso.tool == "bwrap" or iso.drop_user


def _bomb(token: str) -> str:
    return f"""
import ctypes, os, time
libc = ctypes.CDLL(None)
n = 0
for _ in range(500):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        libc.prctl(15, b"{token}", 0, 0, 0)  # PR_SET_NAME: the test finds survivors by it
        time.sleep(30)
        os._exit(0)
    n += 1
print("forked", n, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(("tool", "cgroup"), [(tool, True) for tool in sandbox.TOOLS] + [("none", False)])
def test_hostile_programs_are_contained(tool, cgroup, tmp_path, monkeypatch):
    """`cgroup=False` runs the fallback without a pids cgroup even where one could be made."""
    iso = _isolation(tool)
    if not cgroup:
        iso = dataclasses.replace(iso, pids_cgroup=False)
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    outside = tmp_path / "outside.txt"
    home = tmp_path / "home"
    home.mkdir()
    home_secret = secrets.token_hex(8)
    (home / "secret.txt").write_text(home_secret)
    env_secret = secrets.token_hex(8)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OVERMEM_TEST_TOKEN", env_secret)
    token = "bomb" + secrets.token_hex(4)  # 12 characters: fits a process name (15)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    programs = {
        "good_first": "assert sum(range(4)) == 6",
        "loop": "while True:\n    pass",
        "fork_bomb": _bomb(token),
        "memory": "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))",
        "write_outside": f"open({str(outside)!r}, 'w').write('x')",
        "delete": f"import os\nos.remove({str(canary)!r})",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')",
        "read_home": f"print(open({str(home / 'secret.txt')!r}).read())",
        "read_env": "import os\nprint(os.environ['OVERMEM_TEST_TOKEN'])",
        "good_last": "def f(x):\n    return x * 2\nassert f(3) == 6",
    }
    before = _our_folders()
    outcomes = dict(zip(programs, run_programs(list(programs.values()), limits=LIMITS, isolation=iso, workers=4)))
    server_got = _accepted(server)
    server.close()

    assert outcomes["good_first"].passed and outcomes["good_last"].passed
    assert outcomes["loop"].status == "timeout" and "timeout" in outcomes["loop"].reason
    assert outcomes["memory"].status == "memory" and "512 MB" in outcomes["memory"].reason
    # The bomb sleeps after forking: it times out, and not one of its children is left.
    bomb = outcomes["fork_bomb"]
    assert bomb.status == "timeout"
    assert processes_named(token) == []
    if iso.pids_cgroup or iso.drop_user:  # a process limit applies: the bomb stopped early
        forked = int(bomb.stdout.split()[1])
        assert forked < LIMITS.max_processes <= 500
    # An environment secret never reaches the program.
    assert outcomes["read_env"].status == "error" and "KeyError" in outcomes["read_env"].reason
    assert env_secret not in outcomes["read_env"].stdout
    if _protected(iso):
        assert not outside.exists() and outcomes["write_outside"].status == "error"
        assert canary.read_text() == "still here" and outcomes["delete"].status == "error"
        assert outcomes["read_home"].status == "error" and home_secret not in outcomes["read_home"].stdout
    if iso.tool in ("bwrap", "unshare"):  # a network namespace of its own: our loopback is not reachable
        assert outcomes["socket"].status == "error" and not server_got
    # Nothing is left behind: no folder, no cgroup.
    assert _our_folders() == before
    cgroups = Path("/sys/fs/cgroup/pids")
    assert not list(cgroups.glob(f"overmem-{os.getpid()}-*")) if cgroups.is_dir() else True


def _our_folders() -> set[Path]:
    """This process's program folders (other processes on the machine may be grading too)."""
    return set(Path(tempfile.gettempdir()).glob(f"{sandbox.FOLDER_PREFIX}{os.getpid()}-*"))


def _accepted(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_reasons_of_failures():
    """Each status with the reason a reader needs: the assertion, the exception, the exit code."""
    iso = select_isolation()
    outcomes = run_programs(
        ["assert 1 == 2, 'one is not two'", "raise ValueError('bad value')", "import sys; sys.exit(3)",
         "print('hello')", "def f(:\n    pass", "import sys\nsys.exit(0)\nassert False"],
        limits=Limits(timeout_s=10), isolation=iso,
    )
    assert [o.status for o in outcomes] == ["failed", "error", "error", "passed", "error", "error"]
    assert outcomes[0].reason == "AssertionError: one is not two"
    assert outcomes[1].reason == "ValueError: bad value"
    assert outcomes[2].reason == "exit code 3"
    assert outcomes[3].reason is None and outcomes[3].stdout == "hello\n"
    assert outcomes[4].reason.startswith("SyntaxError")
    # Exit code 0 before the end (sys.exit, unittest.main) is no pass: the tests never ran.
    assert outcomes[5].reason == "exited before the end of the program (exit code 0)"


def test_isolation_is_described():
    iso = select_isolation()
    doc = iso.to_dict()
    assert doc["tool"] in sandbox.TOOLS and doc["description"].startswith(iso.tool)
    assert ("unprivileged uid" in doc["description"]) == iso.drop_user
    assert ("pids cgroup" in doc["description"]) == iso.pids_cgroup


def test_a_program_that_cannot_start_leaves_nothing(monkeypatch):
    iso = select_isolation()
    before = _our_folders()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sandbox.subprocess, "Popen", refuse)
    with pytest.raises(PermissionError):
        run_programs(["print(1)"], isolation=iso)
    assert _our_folders() == before
    cgroups = Path("/sys/fs/cgroup/pids")
    assert not list(cgroups.glob(f"overmem-{os.getpid()}-*")) if cgroups.is_dir() else True


def test_programs_of_two_processes_never_share_a_uid():
    """Two processes (two ranks of a torchrun) each run a batch at the same time: as root, every
    program has a uid of its own, so one batch's clean-up (`kill -1` as that uid) and process limit
    cannot reach the other's programs."""
    import subprocess
    import sys

    if not select_isolation().drop_user:
        pytest.skip("programs run as the caller's own user here (not root)")
    batch = ("from overmem.sandbox import run_programs\n"
             "outs = run_programs(['import os, time; time.sleep(1); print(os.getuid())'] * 3, workers=3)\n"
             "print(' '.join(o.stdout.strip() for o in outs))\n")
    procs = [subprocess.Popen([sys.executable, "-c", batch], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    uids = [set(p.communicate(timeout=120)[0].split()) for p in procs]
    assert all(len(u) == 3 for u in uids), uids  # three concurrent programs, three uids
    assert not uids[0] & uids[1], uids


# ---- grading a program cannot forge -------------------------------------------------------------

_ADD_TEST = """
def check(candidate):
    assert candidate(2, 3) == 5
    assert abs(candidate(0.1, 0.2) - 0.3) < 1e-9
    assert candidate(a=[1], b=[2]) == [1, 2]
"""
_RIGHT = "def add(a, b):\n    return a + b\n"

# Wrong programs (each returns the wrong value, or nothing) that try to be counted as passed. Each
# attack is one the old harness (the tests appended to the program, a random marker printed at
# its end) fell for or could: the verdict must not move.
FORGERIES = {
    # The marker in the program's own file: print every 32-hex string of it, then leave with 0.
    "marker_from_file": "import os, re, sys\ndef add(a, b):\n    return None\n"
                        "for m in re.findall(r'[0-9a-f]{32}', open(__file__).read()):\n"
                        "    sys.stdout.write('\\n' + m + '\\n')\nsys.stdout.flush()\nos._exit(0)\n",
    "exit_0_at_load": "import sys\ndef add(a, b):\n    return None\nsys.exit(0)\n",
    "os_exit_0_when_called": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "exit_0_when_called": "def add(a, b):\n    raise SystemExit(0)\n",
    # Patched builtins: the tests' own assert, abs and == must be out of reach.
    "patched_builtins": "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = type('A', (Exception,), {})\n"
                        "def add(a, b):\n    return None\n",
    # Objects that claim to equal anything.
    "equals_anything": "class Any:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
                       "        return False\n    def __sub__(self, other):\n        return 0\n    __rsub__ = __sub__\n"
                       "def add(a, b):\n    return Any()\n",
    "int_equals_anything": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                           "    def __sub__(self, other):\n        return 0\n"
                           "def add(a, b):\n    return Int(0)\n",
    # A verdict of its own on its stdout, or the checker's stdout found and written.
    "verdict_on_stdout": 'import os\nprint(\'\\n{"status": "passed", "reason": null}\')\ndef add(a, b):\n    os._exit(0)\n',
    "verdict_into_checker": "import glob, os, tempfile\n"
                            "def add(a, b):\n"
                            "    for path in glob.glob(os.path.join(tempfile.gettempdir(), 'overmem-sandbox-*', '.stdout')):\n"
                            "        try:\n            open(path, 'a').write('\\n{\"status\": \"passed\", \"reason\": null}\\n')\n"
                            "        except OSError:\n            pass\n"
                            "    os._exit(0)\n",
    # Its parent killed (bwrap's init, or the supervisor): the end of the program, not a pass.
    "kill_parent": "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return None\n",
}


@pytest.mark.parametrize("tool", sandbox.TOOLS)
def test_a_wrong_program_cannot_forge_a_pass(tool):
    iso = _isolation(tool)
    programs = [_RIGHT, *FORGERIES.values(), _RIGHT]
    tested = [sandbox.TestedProgram(p, _ADD_TEST, "add") for p in programs]
    outcomes = run_tests(tested, limits=LIMITS, isolation=iso, workers=4)
    assert outcomes[0].passed and outcomes[-1].passed, (outcomes[0], outcomes[-1])
    for name, outcome in zip(FORGERIES, outcomes[1:-1]):
        if name == "verdict_into_checker" and not _protected(iso):
            continue  # the user's own files are the program's to write here (docs/sandbox.md)
        assert not outcome.passed and outcome.status in ("error", "failed", "killed"), (name, outcome)


def test_verdicts_of_graded_programs():
    """Each status of `run_tests` with the reason a reader needs."""
    cases = {
        "wrong": ("def add(a, b):\n    return a - b\n", "failed", "AssertionError"),
        "raises": ("def add(a, b):\n    raise ValueError('bad value')\n", "error", "ValueError: bad value"),
        "syntax": ("def add(a, b:\n    return a\n", "error", "SyntaxError"),
        "missing": ("def plus(a, b):\n    return a + b\n", "error", "NameError: the program does not define add"),
        "exit_3": ("import sys\nsys.exit(3)\n", "error", "exit code 3"),
        "exit_0": ("import sys\nsys.exit(0)\n", "error", "the program exited before its tests ran (exit code 0)"),
        "unpassable": ("def add(a, b):\n    return object()\n", "error", "a value of type object cannot be passed"),
        "loop": ("def add(a, b):\n    while True:\n        pass\n", "timeout", "timeout"),
        "memory": ("def add(a, b):\n    return bytearray(2**40)\n", "memory", "MemoryError"),
        "right": (_RIGHT, "passed", None),
    }
    outcomes = run_tests([sandbox.TestedProgram(p, _ADD_TEST, "add") for p, _, _ in cases.values()],
                         limits=Limits(timeout_s=4, memory_mb=512), workers=4)
    for (name, (_, status, fragment)), outcome in zip(cases.items(), outcomes):
        assert outcome.status == status, (name, outcome)
        assert (outcome.reason is None) if fragment is None else (fragment in outcome.reason), (name, outcome)


def test_values_cross_between_program_and_tests_as_plain_data():
    """Every kind of value the codec carries comes back equal and of the same type."""
    values = ("[None, True, 3, -2**70, 1.5, float('inf'), -0.0, 'text\\n', b'\\x00\\xff', 2 + 3j, [1, [2]], (1, (2,)), "
              "{'a': 1, (1, 2): [3]}, {1, 2}, frozenset({3})]")
    test = (f"def check(candidate):\n    values = {values}\n    for v in values:\n        got = candidate(v)\n"
            "        assert got == v and type(got) is type(v), (v, got)\n"
            "    nan = candidate(float('nan'))\n    assert nan != nan\n")
    (outcome,) = run_tests([sandbox.TestedProgram("def echo(x):\n    return x\n", test, "echo")], limits=LIMITS)
    assert outcome.passed, outcome
