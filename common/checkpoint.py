"""Atomic writes of safetensors files and component folders.

Nothing is ever written in place: a file goes to a hidden temporary name in the same folder, is
flushed to disk, and is renamed over the final name (`os.replace` is atomic on POSIX), so a reader
sees the old file or the new one, never half of one. A full disk raises an error and leaves the
previous file as it was. Nothing here unpickles: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.errors import RunFolderError, UserError


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


def default_file_mode() -> int:
    """The mode a plain open() would give a new file (0o666 less the umask); temp files get 0o600."""
    return 0o666 & ~_umask()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _explain(error: OSError | SafetensorError, path: Path) -> CheckpointWriteError:
    if isinstance(error, SafetensorError):  # safetensors reports a failed write (e.g. a full disk) as its own error
        reason = f"the write failed ({str(error)[:200]}; is the disk full?)"
    else:
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
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file 0600; readers expect the umask's mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as error:
        raise _explain(error, path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (the rest)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{param_id}.{key}"] = value
            else:
                plain.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "state": plain}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            param_id, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["state"].items():
        state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def check_weights(folder: str | Path, command: str) -> None:
    """Refuse a model folder (`save_pretrained` output) whose safetensors are damaged, naming the file and
    `command`, before diffusers or transformers fail on it with a bare decoding or OSError; or that holds a
    NaN or infinite weight, which loads without a word and makes every latent, text state or image it
    touches NaN (train-ldm would then stop on "non-finite losses", blaming its learning rate)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path, command)
        check_finite_weights(path, command)


def check_finite_weights(path: str | Path, command: str) -> None:
    """Refuse a (whole) safetensors file with a NaN or infinite float tensor, naming it and `command`."""
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            weight = f.get_tensor(key)
            if weight.element_size() == 1:  # isfinite has no kernel for some 8-bit floats (float8_e4m3fn)
                weight = weight.float()
            if weight.is_floating_point() and not torch.isfinite(weight).all():
                raise DamagedFileError(f"{path} holds non-finite weights (NaN or infinity in {key}): the model "
                                       f"diverged or the file was changed; re-run `{command} --config ...` to "
                                       f"write it again")


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


class DamagedFileError(RunFolderError):
    """A safetensors file that is cut short or is not safetensors (a killed copy, a full disk, a stray file)."""


def check_safetensors(path: str | Path, command: str) -> tuple[int, dict]:
    """(header length, header) of a safetensors file found whole from its header alone: the header parses and
    the file is exactly as long as the tensors it lists. Else DamagedFileError naming the file, what is wrong
    and `command`, the stage that writes it again (loaders would fail on it later with a bare mmap,
    overflow or decoding error, or not at all)."""
    path = Path(path)

    def damaged(reason: str) -> DamagedFileError:
        return DamagedFileError(f"{path} is damaged ({reason}); re-run `{command} --config ...` to write it again")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            if len(prefix) < 8:
                raise damaged(f"{size} bytes, too short for a header")
            if 8 + header_size > size:
                raise damaged(f"its first bytes announce a {header_size}-byte header, longer than the file's {size} bytes")
            header = json.loads(f.read(header_size))
    except (ValueError, RecursionError):  # JSON or UTF-8 that does not decode
        raise damaged("its header is not valid JSON") from None
    except OSError as error:
        raise damaged(f"it cannot be read: {error.strerror}") from None
    try:
        expected = 8 + header_size + max([info["data_offsets"][1] for name, info in header.items()
                                          if name != "__metadata__"], default=0)
    except (AttributeError, KeyError, IndexError, TypeError):
        raise damaged("its header does not list tensors") from None
    if expected != size:
        raise damaged(f"{size} bytes where its header describes {expected}: cut short, or not one whole file")
    return header_size, header


def header_digest(path: str | Path) -> str:
    """Hash of a safetensors file's header (tensor names, shapes, offsets and metadata) without reading its data:
    for a resume state, what tells one (step, settings, inputs) from another."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return hashlib.sha256(f.read(size)).hexdigest()


def finite_or_none(value):
    """A JSON-ready copy of `value` with NaN and infinities as None (null): strict JSON, no silent NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: str | Path, value) -> str:
    """Write `value` as indented, strict JSON (NaN becomes null) atomically; returns the text."""
    text = json.dumps(finite_or_none(value), indent=2, ensure_ascii=False, allow_nan=False)
    write_text(path, text)
    return text


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


def remove_leftovers(folder: str | Path, names: str) -> None:
    """Delete the temporary files and folders that writes of `names` (a glob) into `folder` leave when their process is
    killed mid-write (kill -9, a power cut): never loaded, but each as large as what it held. Call it only while
    holding the lock of the stage that writes them, so no live write is removed."""
    for leftover in Path(folder).glob(f".{names}.*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


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
    remove_leftovers(path.parent, path.name)  # the writers of a component hold its stage's lock
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~_umask())  # as any file the user creates (save_pretrained writes 0600)
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        old = path.parent / f".{path.name}.old"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as error:
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


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")  # what it reads with


def folder_fingerprint(folder: str | Path) -> str:
    """Hash of a saved component's weights and config (`save_pretrained` output): changes when it is retrained.
    A tokenizer folder (no weights) is hashed by its vocabulary and settings files."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files and (folder / "tokenizer_config.json").is_file():
        files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not files:
        raise UserError(f"no weights (*.safetensors) in {folder}; train that stage first")
    h = hashlib.sha256()
    for path in files + [p for p in [folder / "config.json"] if p.is_file()]:
        file_hash = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                file_hash.update(chunk)
        h.update(file_hash.hexdigest().encode())  # a hash of the files' hashes: what latent caches record
    return h.hexdigest()


def writable_folder(path: str | Path, what: str, fix: str = "") -> Path:
    """Make sure `path` is (or can become) a folder this process may write in, before any work starts.
    `fix` replaces the advice to choose another path, for folders whose path the user does not choose."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file, not a folder; {fix or 'choose another path'}")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():  # a file part-way down the path: no permission would make it a folder
        raise UserError(f"{what} '{path}' cannot be created: '{existing}' is a file, not a folder; "
                        f"{fix or 'choose another path'}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{path}' cannot be written ('{existing}' is read-only for this user); "
                        f"{fix or 'choose a folder you can write to'}")
    return path


def writable_file(path: str | Path, what: str, example: str) -> Path:
    """Make sure `path` can be written as a file, before work whose result it will hold (minutes of measuring, say):
    not a folder, and in a folder this process may create or write in. `example` is a file name to suggest."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder, not a file; give a file name, e.g. {what} {path / example}")
    writable_folder(path.parent, f"{what}'s folder")
    return path
