"""Atomic folder writes and file digests (standard library only)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY
    if path.is_dir():
        flags |= getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folders themselves to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``dest``; on success it becomes ``dest`` at once.

    Readers see either the previous ``dest`` or the complete new one, never a partial
    folder: the content is written under ``.tmp-<name>-<id>``, flushed to disk, then
    renamed. An existing ``dest`` is first renamed aside and removed after the swap.
    On an exception the temporary folder is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TEMP_PREFIX}{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if dest.exists():
            old = dest.parent / f"{_OLD_PREFIX}{dest.name}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        _fsync_path(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Clean up after :func:`atomic_folder` writes that were interrupted in ``folder``.

    Unfinished temporary folders are deleted. A previous version that was set aside
    when the process died between the two renames is put back where it was.
    Returns the paths that were removed or restored.
    """
    touched: list[Path] = []
    if not folder.is_dir():
        return touched
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith(_OLD_PREFIX):
            original = folder / entry.name[len(_OLD_PREFIX) :].rsplit("-", 1)[0]
            if not original.exists():
                os.rename(entry, original)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            touched.append(entry)
        elif entry.name.startswith(TEMP_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)
            touched.append(entry)
    return touched
