"""Safe file writes: a file appears complete or not at all, with the mode a plain write would give.

Folders (adapters, the zoo, generators) follow the output-folder rule in ``deltalora.outputs``.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from deltalora.errors import ArtifactError, OutputError

TMP_RANDOM = r"[a-z0-9_]{8}"
"""tempfile's names: prefix + 8 characters of this alphabet + suffix; nothing else is a deltalora temporary."""


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """Mode of a file created by a plain ``open(path, "w")`` under the current umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Mode of a folder created by a plain ``mkdir`` under the current umask."""
    return 0o777 & ~_umask()


def inside(a: Path, b: Path) -> bool:
    """True if ``a`` is ``b`` or below it."""
    return a == b or b in a.parents


def check_output_file(path: str | Path, *, protected: Iterable[str | Path] = ()) -> Path:
    """Refuse a file output that is a folder, a symbolic link, under a file, or inside a ``protected`` folder.

    A previous file of the same name is replaced (it is an output of ours by name).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; give the real path")
    real = Path(os.path.realpath(path))
    for p in protected:
        if inside(real, Path(os.path.realpath(p))):
            raise OutputError(
                f"{path}: is inside {p}, which deltalora keeps (the workspace's zoo or δ); choose a path outside it"
            )
    existing_parent(path)
    return path


def existing_parent(path: Path) -> Path:
    """The nearest existing folder above ``path`` (where a write would create it); refused if it is a file."""
    anc = path.parent
    while not (anc.exists() or anc.is_symlink()) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{path}: {anc} is a file, not a folder")
    return anc


def disk_full_error(e: OSError, path: Path, kept: bool) -> OutputError:
    """The one-line error of a write that ran out of space, saying whether the previous version survived."""
    return OutputError(
        f"{path}: no space left while writing ({e.strerror or e}); "
        + ("the previous version is intact" if kept else "nothing was written")
    )


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file under a temporary name and rename it into place, with the umask's mode."""
    path = check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise OutputError(f"{path}: a parent is a file, not a folder") from e
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would otherwise survive the rename
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(e, path, path.exists()) from e
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def remove_stale_tmp(folder: str | Path, prefix: str = ".") -> None:
    """Delete temporaries deltalora's writers left when a process was SIGKILLed mid-write.

    Only names of exactly the writers' form (``.<name>.<8 random>.tmp``, starting with ``prefix``) are
    removed, so a user's ``.notes.tmp`` stays. Call only on a folder no other process is writing into.
    """
    folder = Path(folder)
    pattern = re.compile(r"\..+\." + TMP_RANDOM + r"\.tmp")
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(prefix) and pattern.fullmatch(p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file deltalora wrote (or a user gave), naming it in the error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: {what} not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: {what} is not valid JSON ({e})") from e


@contextlib.contextmanager
def file_lock(path: str | Path, block: bool = False) -> Iterator[bool]:
    """An exclusive lock on ``path``; without ``block``, yields False while another process holds it.

    Lets several processes share a grid of work: each takes the items nobody holds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # "a": never truncates, whoever made the file
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


class Busy(Exception):
    """Another process is building a shared artifact and the caller chose not to wait (``defer_when_busy``)."""


_DEFER = contextvars.ContextVar("deltalora_defer_when_busy", default=False)


@contextlib.contextmanager
def defer_when_busy(enabled: bool = True) -> Iterator[None]:
    """Inside (when ``enabled``), ``build_once`` raises ``Busy`` instead of waiting for another process's build, so
    a worker with other cells to run does them first instead of idling (a context, not an argument: the builds sit
    several calls below the worker's loop)."""
    token = _DEFER.set(enabled)
    try:
        yield
    finally:
        _DEFER.reset(token)


def build_once(lock: str | Path, done: Callable[[], bool], build: Callable[[], None]) -> None:
    """Run ``build`` unless ``done()``: of several processes that need one artifact, one builds it while the others
    wait (or raise ``Busy`` inside ``defer_when_busy``); ``done`` is asked before the lock too, so readers of a
    finished artifact never contend for it."""
    if done():
        return
    with file_lock(lock, block=not _DEFER.get()) as mine:
        if not mine:
            raise Busy(f"{lock}: another process is building this")
        if not done():
            build()
