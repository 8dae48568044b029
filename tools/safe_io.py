"""Reading files that a stranger wrote: regular files only (never through a symlink, never a FIFO or a device), with a
size cap checked before anything is read (docs/rules.md "How the checker reads a folder").

Every reader opens with O_NOFOLLOW | O_NONBLOCK and checks fstat on the open descriptor, so a FIFO cannot block the
checker, a symlink cannot point it outside the folder, and a file swapped between the check and the read is still the
file that was checked.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

MAX_LOG_BYTES = 64 * 2**20  # real logs are 5 KB-2 MB (the source-embedding ones up to ~400 KB)
MAX_SCRIPT_BYTES = 8 * 2**20
MAX_JSON_BYTES = 4 * 2**20
MAX_ARTIFACT_BYTES = 64 * 2**20  # 4x the cap: enough to hash an over-cap artifact and say by how much


class UnsafeFile(OSError):
    """A file the checker refuses to read (symlink, FIFO, device, directory, too large, missing)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of a regular file no larger than `limit`; UnsafeFile (one line, naming the path) otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeFile(f"no such file: {path}") from None
    except OSError as e:
        raise UnsafeFile(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{path}: {_kind(st.st_mode)}, not read (regular files only)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UnsafeFile(f"{path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # swapped after the lstat
            raise UnsafeFile(f"{path}: {_kind(st.st_mode)}, not read (regular files only)")
        if st.st_size > limit:
            raise UnsafeFile(f"{path}: {st.st_size:,} bytes, over the {limit:,}-byte cap for this kind of file")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise UnsafeFile(f"{path}: grew past the {limit:,}-byte cap while being read")
    return data


def read_text(path: Path, limit: int) -> str:
    """UTF-8 text of a regular file (undecodable bytes replaced, so one bad byte cannot hide the rest)."""
    return read_bytes(path, limit).decode("utf-8", errors="replace")


def read_log(path: Path) -> str:
    """A log's text, byte-exact apart from undecodable bytes (no newline translation: source frames count bytes)."""
    return read_text(path, MAX_LOG_BYTES)


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "file", "dir", or what else it is ("a symlink", "a FIFO", ...)
    size: int


def list_folder(folder: Path) -> list[Entry]:
    """The entries of a folder, classified without following symlinks, sorted by name."""
    out = []
    for name in sorted(os.listdir(folder)):
        st = os.lstat(folder / name)
        kind = "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else _kind(st.st_mode)
        out.append(Entry(name, kind, st.st_size))
    return out
