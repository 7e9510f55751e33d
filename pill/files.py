"""Files that survive crashes and say what is wrong with them: directories replaced in one step, and JSON and
safetensors readers whose errors name the file."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without exchange
        return False
    raise OSError(error, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(error)}")


def replace_directory(staging: Path, target: Path) -> None:
    """Put the complete directory `staging` at `target`, replacing what is there, so that at every instant
    `target` is either the old directory whole or the new one whole. rename(2) cannot replace a non-empty
    directory, so an existing target is exchanged with the staging directory in one step where the system
    allows it; elsewhere the old one is moved aside first (a short window with no `target`, where a crash
    leaves the old directory beside it as .<name>.old-*)."""
    if not target.exists():
        os.replace(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old directory
    else:
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync_dir(target.parent)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; a truncated or garbled file is an error naming it."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); expected {what} (the file may be truncated or "
                         f"corrupt: save it again)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected {what} as a JSON object, got a JSON {type(value).__name__}")
    return value


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or garbled file is an error naming it."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(f"{path}: not a readable safetensors file ({size:,} bytes; {type(exc).__name__}: "
                         f"{exc}); it may be truncated or corrupt: save it again") from None
