"""Atomic writes of safetensors files and component folders.

Nothing is ever written in place: a file goes to a hidden temporary name in the same folder, is
flushed to disk, and is renamed over the final name (`os.replace` is atomic on POSIX), so a reader
sees the old file or the new one, never half of one. A full disk raises an error and leaves the
previous file as it was. Nothing here unpickles: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.errors import UserError


class CheckpointWriteError(UserError):
    """Saving failed (e.g. the disk is full); the previous checkpoint is untouched."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary(path: Path) -> str:
    """A hidden temporary file beside `path`, readable like any file the user creates (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _explain(error: OSError, path: Path) -> CheckpointWriteError:
    reason = "the disk is full" if error.errno == errno.ENOSPC else str(error)
    return CheckpointWriteError(f"could not save '{path}': {reason}. The previous checkpoint is intact; "
                                f"free some space (or change run_dir) and re-run the same command to resume")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write a safetensors file atomically; `metadata` (any JSON value) goes in its header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"json": json.dumps(metadata)} if metadata is not None else None
    tmp = _temporary(path)
    try:
        # safetensors refuses tensors that share memory; a contiguous CPU copy of each is cheap here
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, tmp, metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        raise _explain(error, path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def decode_metadata(header: dict | None) -> dict | None:
    """The JSON value `save_tensors` put in a safetensors header's metadata, or None."""
    return json.loads(header["json"]) if header and "json" in header else None


def load_tensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a safetensors file and its JSON metadata (raises on a truncated or foreign file)."""
    tensors = {}
    with safe_open(str(path), framework="pt", device=device) as f:
        header = f.metadata()
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, decode_metadata(header)


def read_metadata(path: str | Path) -> dict | None:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return decode_metadata(f.metadata())


def write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise _explain(error, path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it into place when the block succeeds.

    Used for `save_pretrained` components (`run/vae/`, `run/unet/`, ...). On failure the old folder
    stays. Between the two renames of the swap the old folder exists as `.<name>.old`, which
    `recover_directory` puts back if a run was killed right there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        old = path.parent / f".{path.name}.old"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        raise _explain(error, path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_directory(path: str | Path) -> None:
    """If a swap was interrupted after the old folder moved aside, move it back."""
    path = Path(path)
    old = path.parent / f".{path.name}.old"
    if old.exists() and not path.exists():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
