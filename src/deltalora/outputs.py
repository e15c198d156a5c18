"""Output folders: written complete or not at all, and nothing deltalora did not write is ever lost.

The output-folder rule (``docs/reliability.md``, "Nothing lost"): a folder deltalora writes must be new,
empty, or one deltalora wrote for the same kind of artifact, recognised by its marker file ``.deltalora.json``.
Anything else is refused with :class:`OutputError`, one line naming the path and the way out. ``overwrite``
replaces only such a folder: the old one is renamed to a backup, the new one renamed into place, the backup
removed last; the next writer of that path finishes a replacement a crash interrupted (:func:`recover_dir`).
Written files and folders get the mode a plain write would give under the process umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from deltalora.errors import OutputError
from deltalora.io import TMP_RANDOM, atomic_write_json, dir_mode, disk_full_error, existing_parent, file_mode, inside

MARKER = ".deltalora.json"
"""Marker file in every folder deltalora owns: ``{"kind", "written_by": "deltalora", "version", "files"?}``."""

# What each kind of folder holds when deltalora writes it: (entry that identifies it, key that entry's JSON
# must have or None, every top-level entry it may hold). A folder without a marker (written before markers
# existed) counts as deltalora's only if it holds the first entry and nothing outside the list.
_KNOWN: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "adapter": (
        "provenance.json",
        "prompts_sha256",
        ("adapter_config.json", "adapter_model.safetensors", "provenance.json", "README.md"),
    ),
    "checkpoint": (
        "adapter_config.json",
        "peft_type",
        ("adapter_config.json", "adapter_model.safetensors", "README.md"),
    ),
    "generator": (
        "train_config.json",
        "train_tasks",
        ("train_config.json", "train_state.pt", "log.jsonl", "generator.safetensors", "config.json", "README.md"),
    ),
    "retrieval": ("config.json", "kind", ("config.json", "means.safetensors", "adapters")),
    "zoo": ("config.json", "zoo", ("config.json", "manifest.json", "adapters", "runs", "base")),
    "delta": ("deltas_p*.safetensors", None, ("deltas_p*.safetensors", "timing_p*.json", "config.json")),
    "experiment": (
        "config.json",
        "experiment",
        ("config.json", "cells", "scores", "generators", "retrieval", "composition"),
    ),
}


def _backup(path: Path) -> Path:
    """Where the old folder waits while ``overwrite`` moves the new one into place."""
    return path.with_name(f".{path.name}.deltalora-old")


def _marker(folder: Path) -> dict | None:
    try:
        m = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("written_by") == "deltalora" and isinstance(m.get("kind"), str) else None


def _written_as(name: str) -> str:
    """The name a writer's temporary (``.<name>.<8 random>.tmp``) stands for; other names unchanged."""
    return re.sub(r"^\.(.+)\." + TMP_RANDOM + r"\.tmp$", r"\1", name)


def _legacy_kind(folder: Path, names: list[str], prefer: str | None) -> str | None:
    # a folder with only config.json fits several kinds: the one the caller expects wins
    for kind, (ident, key, allowed) in sorted(_KNOWN.items(), key=lambda kv: kv[0] != prefer):
        if not all(any(fnmatch.fnmatchcase(_written_as(n), pat) for pat in allowed) for n in names):
            continue
        hits = [n for n in names if fnmatch.fnmatchcase(n, ident)]
        if not hits:
            continue
        if key is None:
            return kind
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            doc = json.loads((folder / hits[0]).read_text())
            if isinstance(doc, dict) and key in doc:
                return kind
    return None


def folder_kind(folder: str | Path, prefer: str | None = None) -> str | None:
    """The kind of artifact deltalora wrote in ``folder`` (its marker, or the layout of an older version), else None.

    ``prefer``: the kind to report when an older version's layout fits several.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    m = _marker(folder)
    if m is not None:
        return m["kind"]
    with contextlib.suppress(OSError):
        return _legacy_kind(folder, os.listdir(folder), prefer)
    return None


def foreign_entries(folder: str | Path, kind: str) -> list[str]:
    """Top-level entries of deltalora's ``kind`` folder that deltalora did not write (a model card, notes)."""
    folder = Path(folder)
    m = _marker(folder) or {}
    names = [n for n in os.listdir(folder) if n != MARKER]
    if isinstance(m.get("files"), list):
        own = set(m["files"])
        return sorted(n for n in names if n not in own)
    allowed = _KNOWN.get(kind, ("", None, ()))[2]

    return sorted(n for n in names if not any(fnmatch.fnmatchcase(_written_as(n), pat) for pat in allowed))


def _refuse_location(path: Path, protected: Iterable[str | Path]) -> Path:
    """Refuse the folders no writer may touch; return the real path."""
    real = Path(os.path.realpath(path))
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if real == Path(real.anchor) or real in (home, *home.parents):
        raise OutputError(
            f"{path}: is the home folder, the filesystem root or above the home folder; give a new folder inside it"
        )
    if path.name in ("", ".", "..") or real in (cwd, *cwd.parents):
        raise OutputError(f"{path}: is the current folder or one above it; give a new folder, e.g. {path}/out")
    for p in protected:
        rp = Path(os.path.realpath(p))
        if inside(real, rp) or inside(rp, real):
            raise OutputError(
                f"{path}: {'is inside' if inside(real, rp) else 'holds'} {p}, which deltalora keeps "
                f"(the workspace's zoo or δ); choose a folder outside it"
            )
    anc = existing_parent(path)
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: {anc} is not writable; choose another folder")
    return real


def check_output_dir(
    path: str | Path,
    kind: str | None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    protected: Iterable[str | Path] = (),
) -> str:
    """Decide whether deltalora may write the folder ``path``, an artifact of ``kind``; changes nothing.

    Returns ``"new"`` (absent), ``"empty"``, ``"own"`` (deltalora's folder of this kind, maybe mid-replacement;
    allowed only with ``overwrite``, to be replaced, or ``resume``, to be continued in place) or, for
    ``kind=None`` (a folder deltalora only adds named files to), ``"shared"`` for any existing folder.
    Raises :class:`OutputError` for everything else: ``.``, ``..``, the current folder or one above it, the
    home folder or above it, the filesystem root, a path inside or holding a ``protected`` folder, a symbolic
    link, a file, an unwritable place, a non-empty folder deltalora did not write or wrote for another kind,
    and (with ``overwrite``) a folder of ours that also holds files deltalora did not write.
    """
    path = Path(path)
    _refuse_location(path, protected)
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; give the folder it points to, or a new folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: is a file, not a folder; give a new folder")
    target = path
    if not path.exists():
        backup = _backup(path)
        if not (backup.is_dir() and not backup.is_symlink() and folder_kind(backup) is not None):
            return "new"
        target = backup  # a replacement a crash interrupted: the backup is the artifact
    if kind is None:
        return "shared"
    if not os.access(target, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: folder is not writable; choose another folder")
    if target is path and not os.listdir(path):
        return "empty"
    found = folder_kind(target, prefer=kind)
    if found is None:
        raise OutputError(
            f"{path}: folder is not empty and was not written by deltalora; "
            f"choose a new or empty folder (nothing was changed)"
        )
    if found != kind:
        raise OutputError(f"{path}: holds a deltalora {found}, not a {kind}; choose another folder")
    if overwrite:
        extra = foreign_entries(target, kind)
        if extra:
            raise OutputError(
                f"{path}: also holds files deltalora did not write ({', '.join(extra[:3])}"
                f"{', ...' if len(extra) > 3 else ''}); move them out or choose another folder"
            )
        return "own"
    if resume:
        return "own"
    raise OutputError(
        f"{path}: holds a deltalora {kind} already; pass --overwrite to replace it, or choose another folder"
    )


def _write_marker(folder: Path, kind: str, files: list[str] | None = None) -> None:
    doc: dict[str, Any] = {"kind": kind, "written_by": "deltalora", "version": 1}
    if files is not None:
        doc["files"] = files
    atomic_write_json(folder / MARKER, doc)


def _plain_modes(folder: Path) -> None:
    """Give what a writer put in ``folder`` the modes of a plain write (safetensors creates its files 0600)."""
    fmode, dmode = file_mode(), dir_mode()
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dmode if name in dirs else fmode)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[int]:
    """Serialise the renames of deltalora processes writing in ``folder`` (a lock on the folder itself)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def recover_dir(path: str | Path) -> None:
    """Finish a replacement a crash interrupted between its renames.

    The backup (the old folder) goes back into place if the new folder never arrived (roll back), and is
    removed if it did (roll forward); a backup not marked as deltalora's is left alone.
    """
    path = Path(path)
    backup = _backup(path)
    if backup.is_symlink() or not backup.is_dir() or folder_kind(backup) is None:
        return
    if path.exists() or path.is_symlink():
        shutil.rmtree(backup)
    else:
        os.rename(backup, path)


def claim_output_dir(
    path: str | Path,
    kind: str | None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    protected: Iterable[str | Path] = (),
) -> str:
    """:func:`check_output_dir` after finishing any interrupted replacement of ``path``; call before the work."""
    path = Path(path)
    if (
        kind is not None and path.name not in ("", ".", "..") and _backup(path).exists()
    ):  # only ever moves our own backup
        with _locked(path.parent):
            recover_dir(path)
    return check_output_dir(path, kind, overwrite=overwrite, resume=resume, protected=protected)


def own_dir(path: str | Path, kind: str, *, protected: Iterable[str | Path] = ()) -> Path:
    """A folder deltalora writes in place and resumes (zoo, δ, a generator in training): new, empty or ours.

    Creates it and marks it as ours; files another program put in it stay untouched.
    """
    path = Path(path)
    claim_output_dir(path, kind, resume=True, protected=protected)
    path.mkdir(parents=True, exist_ok=True)
    if _marker(path) is None:
        _write_marker(path, kind)
    return path


@contextlib.contextmanager
def atomic_dir(
    path: str | Path, kind: str, *, overwrite: bool = False, protected: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``path`` (an artifact of ``kind``) only on success.

    ``path`` must pass :func:`check_output_dir` (checked on entry, and again just before the rename, since
    another process may have written it meanwhile). With ``overwrite`` an existing folder of ours is
    replaced through a backup; a crash between the renames is repaired by the next writer.
    """
    path = Path(path)
    claim_output_dir(path, kind, overwrite=overwrite, protected=protected)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    kept = path.exists()
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp's 0700 would otherwise survive the rename
        yield tmp
        _plain_modes(tmp)
        _write_marker(tmp, kind, sorted(n for n in os.listdir(tmp) if n != MARKER))
        with _locked(path.parent) as parent_fd:
            recover_dir(path)
            state = check_output_dir(path, kind, overwrite=overwrite, protected=protected)
            if state == "own":
                backup = _backup(path)
                os.rename(path, backup)
                os.rename(tmp, path)
                shutil.rmtree(backup)
            else:
                try:
                    os.rename(tmp, path)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    raise OutputError(
                        f"{path}: another program wrote this folder meanwhile; nothing was replaced"
                    ) from e
            os.fsync(parent_fd)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = e if isinstance(e, OSError) else e.__cause__  # a file written inside the folder may have said it first
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(cause, path, kept) from e
        raise
