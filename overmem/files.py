"""Reading the text files a user gives or a run folder holds (configs, data, generations, results):
UTF-8, with a byte-order mark accepted (editors on Windows write one), and every way a path can
fail to be a readable text file (missing, a folder, a FIFO, unreadable, not UTF-8) said in one line
that names the path. Imports nothing from overmem, so that every module can use it."""

from __future__ import annotations

import stat
from pathlib import Path

BOM = "\ufeff"


def kind_of(path: Path) -> str | None:
    """What `path` is when it exists but is not a regular file ("a folder", "a FIFO (named pipe)", ...);
    None for a regular file or a path that does not exist."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def check_file(path: Path, what: str = "file") -> None:
    """A `FileNotFoundError` ("WHAT PATH does not exist") or `ValueError` ("WHAT PATH is a folder,
    not a file") unless `path` is a regular file. Reading a FIFO would wait for a writer forever."""
    kind = kind_of(path)
    if kind is not None:
        raise ValueError(f"{what} {path} is {kind}, not a file; give a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")


def missing_folder(path: str | Path, what: str) -> Exception:
    """The error for a folder that is not there: "PATH: WHAT not found", or, when something else is at
    PATH, what it is ("PATH: WHAT expected, but it is a file")."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return ValueError(f"{path}: {what} expected, but it is {kind_of(p) or 'a file'}; give a folder")
    return FileNotFoundError(f"{path}: {what} not found")


def unreadable(path: Path, err: OSError) -> ValueError:
    """The error for a file that exists but cannot be read (permissions): not a place to write to."""
    return ValueError(f"{path}: unreadable ({err.strerror or err}); make it readable (chmod +r) or give another file")


def decode(data: bytes, path: Path) -> str:
    """`data` of the file `path` as text: UTF-8, a leading byte-order mark dropped."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of the file `path` (`check_file`, `unreadable`, `decode`)."""
    path = Path(path)
    check_file(path, what)
    try:
        data = path.read_bytes()
    except PermissionError as err:
        raise unreadable(path, err) from None
    return decode(data, path)
