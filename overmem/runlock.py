"""One writer per run folder: `RUN/.overmem.lock`, held by every command that writes into RUN, and
by `pipeline.run` and `pipeline.scan` when a script calls them (within one process, the library
call inside a command that holds the lock holds it too).

The lock is an advisory `flock` on that file, which names the holder (pid, host, command, start
time) for the message a second command gets. The kernel drops a `flock` when its holder dies, so
a lock file left by a killed command holds nothing: the next command takes it over, with a note
naming the dead holder. The holder removes the file when it is done, and the run folder too when
it made the folder and nothing else was written there (bad input found after the lock was taken
leaves nothing behind). Under `torchrun` rank 0 alone takes the lock and tells the other ranks
how it went (`distributed.on_main`): a refused rank 0 stops them instead of leaving them waiting.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import ConfigError
from .distributed import on_main
from .results import LOCK


class RunLock:
    """A held lock of one run folder; `release()` gives it back."""

    def __init__(self, root: Path, fd: int, made: list[Path]):
        self.root, self._fd, self._made = root, fd, made

    @property
    def path(self) -> Path:
        return self.root / LOCK

    @classmethod
    def acquire(cls, root: str | Path, command: str) -> RunLock:
        """Take the lock of `root` (made if missing), or raise `ConfigError` naming its holder."""
        root = Path(root)
        made = _make_folder(root)
        path = root / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the folder was removed by a holder that had made it
                made = _make_folder(root) or made
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                _remove_empty(made)
                raise ConfigError(f"{root}: in use by {_describe(holder)}; wait for it to finish, or write to "
                                  "another folder") from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(path, fd):
                break
            os.close(fd)  # the file was removed and made afresh by another command since it was opened
        left = _read(fd)
        if left:
            print(f"note: {path}: taking over the lock of {_describe(left)}, which ended without releasing it",
                  file=sys.stderr)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return cls(root, fd, made)

    def release(self) -> None:
        """Remove the lock file (while still holding it), then the folders it made if still empty.
        A lock file deleted by hand meanwhile, and made afresh by another command, is that one's."""
        if _same_file(self.path, self._fd):
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        _remove_empty(self._made)


# Run folders whose lock this process holds (resolved path -> blocks holding it): a command that
# holds the lock calls the library entry points, which take it too.
_HELD: dict[Path, int] = {}


@contextmanager
def run_lock(root: str | Path, command: str) -> Iterator[None]:
    """Hold the lock of run folder `root` for the block (rank 0 alone under several processes);
    a block inside another that holds it already holds it too."""
    key = Path(root).resolve()
    held: list[RunLock] = []
    if key not in _HELD:
        on_main(lambda: held.append(RunLock.acquire(root, command)))
    _HELD[key] = _HELD.get(key, 0) + 1
    try:
        yield
    finally:
        _HELD[key] -= 1
        if not _HELD[key]:
            del _HELD[key]
        for lock in held:
            lock.release()


def python_command() -> str:
    """What a lock file says of a holder that is not the command line: the script and its arguments."""
    return " ".join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "python"


def _make_folder(root: Path) -> list[Path]:
    """Make `root` and its missing parents; the ones made, deepest first."""
    missing = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something was written there (or another command uses it): it stays
            return


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict:
    """What the lock file says about its holder ({} when empty or unreadable)."""
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {} if not text.strip() else {"command": text.strip()[:200]}
    return info if isinstance(info, dict) else {}


def _describe(holder: dict) -> str:
    """`pid 123 (overmem scan ...) on host h since ...`, from what the lock file holds."""
    if not holder:
        return "another command (its lock file names none)"
    text = f"pid {holder.get('pid', '?')}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    if holder.get("host") and holder["host"] != socket.gethostname():
        text += f" on host {holder['host']}"
    if holder.get("since"):
        text += f", since {holder['since']}"
    return text
