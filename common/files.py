"""Files tokenlabel writes: durable atomic publishing, the marker that says an output is ours, overlap checks, and
the lock that keeps a second writer out.

Every output is written under a temporary name unique to its writer, flushed to disk (fsync of the file and of
its folder), then renamed into place: a reader sees the old version whole or the new one whole, and a crash or a
power cut leaves no truncated file under the final name. `--overwrite` may replace only an output that carries
tokenlabel's mark (its kind's marker: a shard manifest, a store's attributes, an export's or a run's marker
file), and never one that is or holds an input of the same command.
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from common.errors import UserError

MARKER = ".tokenlabel.json"  # in an output folder that no manifest or store attributes identify (exports, runs)


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder under `folder` to disk (a finished folder, before it is published)."""
    for parent, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(parent) / name)
        fsync_path(parent)


def temporary_sibling(path: str | Path, tag: str = "partial") -> Path:
    """A name beside `path` that no other writer (process or thread) uses: `<name>.<tag>-<pid>-<random>`."""
    path = Path(path)
    return path.with_name(f"{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish_file(tmp: Path, path: Path) -> None:
    """Rename a fully written temporary file over `path`, durably: the file, then the rename, reach the disk."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; published on success, removed on failure."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        publish_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def replace_folder(tmp: Path, path: Path) -> None:
    """Move a finished folder into place. An existing `path` (which the caller checked is ours) is first renamed
    aside, then removed, so that `path` never holds a half-removed or half-written folder."""
    fsync_path(tmp)
    old = temporary_sibling(path, "replaced") if path.exists() else None
    if old is not None:
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old)


def write_marker(folder: str | Path, kind: str, **info: Any) -> None:
    """Mark `folder` as a tokenlabel output of `kind` (e.g. "lvvit-export", "run")."""
    atomic_write(Path(folder) / MARKER, json.dumps({"tool": "tokenlabel", "kind": kind, **info}, indent=1) + "\n")


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of a tokenlabel output folder, or None where there is none (or it is not ours)."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == "tokenlabel" else None


def holds(a: str | Path, b: str | Path) -> bool:
    """Whether path `a` is `b` or a folder holding it (symlinks resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents


def refuse_overlap(out: str | Path, inputs: Mapping[str, str | Path | None], flag: str = "--out",
                   inside: bool = False) -> None:
    """One line when the output is or holds one of the named inputs ({"--shards": path, ...}), or with `inside`
    also when it sits inside one."""
    for name, path in inputs.items():
        if path is not None and (holds(out, path) or (inside and holds(path, out))):
            raise UserError(f"{flag} {out}: is, holds or sits inside {name} {path}; writing there could destroy "
                            f"the input: choose an output folder apart from it")


@contextlib.contextmanager
def exclusive_lock(lock: str | Path, busy: str) -> Iterator[None]:
    """Hold an flock on the file `lock` (released by the kernel even on kill -9) for the block; while another
    process holds it, refuse in one line: `busy`, then the owner's pid and host the file records.

    The file is removed on release; the inode check makes a process that locked a just-removed file try again
    instead of sharing the lock.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{busy} ({owner}; lock {lock}); wait for it to finish or stop it, then run again") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)
