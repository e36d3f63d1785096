"""Writing files and folders so that a crash never leaves a torn one (docs/design.md §9).

- :func:`atomic_write`: a file is written under a temporary name unique to this process
  (``.NAME.<pid>.<random>.tmp`` in the same folder), flushed to disk, then renamed into place;
- :func:`remove_stale_temporaries`: temporaries left by *dead* processes (a ``kill -9`` mid-save)
  are deleted by the next save; those of live processes (another rank saving) are left alone;
- :func:`folder_lock`: an advisory lock on a folder, so two processes committing into one
  folder (every DDP rank saving) take turns;
- :func:`replace_directory`: a finished folder takes the place of an old one in one step
  (``renameat2(RENAME_EXCHANGE)`` on Linux), so a reader sees the old folder or the new one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


def temporary_name(path: Path) -> Path:
    """A name beside ``path`` unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a unique temporary beside ``path``, flush it to disk, rename it over
    ``path``: a crash leaves the old file or the new one, and at worst a temporary."""
    tmp = temporary_name(path)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, atomically; tied tensors (one storage under two names) are written twice."""
    from safetensors.torch import save_file
    seen: dict[tuple[int, int], str] = {}
    plain = {}
    for key, t in tensors.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        plain[key] = t.clone().contiguous() if ident in seen else t.contiguous()  # tied weights: one copy each
        seen[ident] = key
    atomic_write(path, lambda p: save_file({k: v.cpu() for k, v in plain.items()}, p, metadata=metadata))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path, prefix: str | None = None) -> list[Path]:
    """Delete temporaries (files or folders) in ``folder`` whose writing process is gone (only
    those of ``prefix``'s entries, if given)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = TEMP_PATTERN.match(entry.name)
        if match and (prefix is None or match["name"] == prefix) and not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
    return removed


@contextlib.contextmanager
def folder_lock(folder: Path, missing_ok: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (POSIX ``flock``; a no-op elsewhere). With
    ``missing_ok`` a folder that does not exist or cannot hold the lock file is read unlocked."""
    try:
        import fcntl
    except ImportError:  # Windows: renames are still atomic, only concurrent commits are not ordered
        yield
        return
    try:
        handle = open(folder / ".adaptopt.lock", "a")
    except OSError:
        if not missing_ok:
            raise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False if unavailable."""
    import ctypes
    import ctypes.util
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    return result == 0


def replace_directory(staging: Path, final: Path) -> None:
    """Put the finished folder ``staging`` at ``final`` in one step and delete what was there.

    A new ``final`` is a plain rename. An existing one is exchanged atomically where Linux
    allows it; elsewhere the old folder is renamed aside first (a crash between the two
    renames leaves it beside ``final`` as ``.NAME.<pid>.<random>.tmp``, removed by the next
    export once this process is gone)."""
    if not final.exists():
        os.rename(staging, final)
    elif _exchange(staging, final):
        shutil.rmtree(staging)  # now holds the old folder
    else:
        aside = temporary_name(final)
        os.rename(final, aside)
        os.rename(staging, final)
        shutil.rmtree(aside)
    _fsync_dir(final.parent)
