"""The file container of every fisherfunc file: safetensors tensors plus one JSON header, sealed and atomic.

A file holds named tensors and, in the safetensors header's ``__metadata__``, one JSON document
under a format's key (``"fisherfunc"`` for states, ``"fisherfunc_kfac"`` for K-FAC). The document
carries a SHA-256 **seal** over the document itself (every field but the seal, as canonical JSON)
and over every tensor's key, dtype, shape and bytes::

    sha256 = SHA-256( canonical JSON of the header without "sha256" ‖ key₁ dtype₁ shape₁ bytes₁ ‖ … )

so a flipped byte in the data *or* an edited header field (a step count, a decay, a rule) is
refused on reading, as a corrupted file (:class:`StateFileError`). Format version 1 files (written
before the header was sealed) are still read; their seal covers the tensors only.

A write goes to a temporary file next to the target, is flushed to disk (``fsync``) and renamed over
the target (``os.replace``, atomic on POSIX and Windows): a crash leaves either the old file or the
new one, never half of one. ``safetensors`` is an optional dependency (``fisherfunc[io]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["StateFileError", "safetensors_module", "write", "read", "seal"]


class StateFileError(ValueError):
    """A file is not a readable fisherfunc file: truncated, corrupted (data or header), or another format."""


def safetensors_module() -> Any:
    """The ``safetensors`` package, or an ImportError naming the extra to install."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError as err:
        raise ImportError(
            "saving and loading fisherfunc files needs the safetensors package: "
            "pip install 'fisherfunc[io]'  (or: pip install 'safetensors>=0.4')"
        ) from err
    return safetensors


def seal(header: Mapping[str, Any] | None, tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the header (without its ``"sha256"`` field; ``None``: tensors only) and every tensor."""
    digest = hashlib.sha256()
    if header is not None:
        fields = {k: v for k, v in header.items() if k != "sha256"}
        digest.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\0")
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _atomic_write(path: Path, write_to: Callable[[Path], None]) -> None:
    """``write_to(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], header: dict[str, Any], *, key: str) -> Path:
    """Seal ``header`` (adding its ``"sha256"``) and write it with ``tensors``, atomically.

    Args:
        path: the file to write (replaced atomically if it exists).
        tensors: CPU tensors by name (contiguous, not views into larger storages).
        header: the JSON-serialisable description; ``version`` must be the sealed format (2+).
        key: the header's key in safetensors' ``__metadata__``.
    """
    safetensors = safetensors_module()
    sealed = {**header, "sha256": seal(header, tensors)}
    target = Path(os.fspath(path))
    metadata = {key: json.dumps(sealed)}
    _atomic_write(target, lambda tmp: safetensors.torch.save_file(dict(tensors), str(tmp), metadata=metadata))
    return target


def read(
    path: str | os.PathLike[str], *, key: str, format: str, version: int, what: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and all tensors (on CPU) of a file of ``format``, with its seal checked.

    Args:
        path: the file.
        key: the header's key in ``__metadata__``.
        format: the expected ``"format"`` field.
        version: the newest format version this code reads (versions 1 … ``version``).
        what: what the file should hold, for messages (``"state"``, ``"K-FAC"``).

    Raises:
        FileNotFoundError: no file at ``path``.
        StateFileError: a truncated or corrupted file, another format, or a broken seal.
    """
    safetensors = safetensors_module()
    target = Path(os.fspath(path))
    if not target.exists():
        raise FileNotFoundError(f"no {what} file at {target}")
    try:
        with safetensors.safe_open(str(target), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own errors: a short, clear message instead
        raise StateFileError(
            f"{target}: not a readable safetensors file, truncated or corrupted ({type(err).__name__}: {err})"
        ) from None
    if key not in metadata:
        raise StateFileError(f"{target}: has no fisherfunc {what} metadata: not a file written by fisherfunc")
    try:
        header = json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise StateFileError(
            f"{target}: its fisherfunc metadata is not valid JSON ({err}): the file is corrupted"
        ) from None
    if not isinstance(header, dict) or header.get("format") != format:
        raise StateFileError(f"{target}: its metadata is not a fisherfunc {what} description")
    found = header.get("version")
    if not isinstance(found, int) or isinstance(found, bool) or not 1 <= found <= version:
        raise StateFileError(f"{target}: format version {found!r}; this fisherfunc reads versions 1 to {version}")
    expected = seal(header if found >= 2 else None, tensors)
    if header.get("sha256") != expected:
        raise StateFileError(f"{target}: checksum mismatch: the header or the tensor data is corrupted or was edited")
    return header, tensors
