"""Save and load K-FAC / EK-FAC estimates and K-FAC states (safetensors + JSON metadata, atomic).

Tensors are stored under ``"<field>/<layer name>"`` (``A``, ``G`` for K-FAC and states; ``QA``,
``QG``, ``scale`` for EK-FAC); the metadata records the layers, counts, convention, kind, the
parameter names, versions, the time and a SHA-256 over the tensors, as :func:`fisherfunc.save` does.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch

from ..io import StateFileError, _atomic_write, _checksum, _safetensors, read_safetensors
from .eigen import EKFAC
from .factors import KFAC, KFACState
from .layers import Layer

__all__ = ["save", "load"]

FORMAT = "fisherfunc-kfac"
FORMAT_VERSION = 1
_META_KEY = "fisherfunc_kfac"
_TENSORS = {"KFAC": ("A", "G"), "KFACState": ("A", "G"), "EKFAC": ("QA", "QG", "scale")}
_TYPES = {"KFAC": KFAC, "KFACState": KFACState, "EKFAC": EKFAC}


def save(path: str | os.PathLike[str], value: KFAC | EKFAC | KFACState) -> Path:
    """Write a :class:`KFAC`, :class:`EKFAC` or :class:`KFACState` to a safetensors file, atomically.

    >>> import tempfile, torch, fisherfunc as ff
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> F = ff.kfac.kfac(ff.losses.classification(model), dict(model.named_parameters()), (x, y))
    >>> G = ff.kfac.load(ff.kfac.save(tempfile.mkdtemp() + "/kfac.safetensors", F))
    >>> torch.equal(G.A["weight"], F.A["weight"])
    True
    """
    safetensors = _safetensors()
    kind_name = type(value).__name__
    if kind_name not in _TYPES or not isinstance(value, _TYPES[kind_name]):
        raise TypeError(f"save takes a KFAC, EKFAC or KFACState, got {type(value).__name__}")
    tensors = {
        f"{field}/{layer.name}": getattr(value, field)[layer.name].detach().cpu().contiguous()
        for field in _TENSORS[kind_name]
        for layer in value.layers
    }
    fields = {k: v for k, v in value._asdict().items() if k not in _TENSORS[kind_name] and k != "layers"}
    fields["names"] = list(fields["names"])
    from .. import __version__

    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "type": kind_name,
        "layers": [layer.to_json() for layer in value.layers],
        "fields": fields,
        "library": {"fisherfunc": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sha256": _checksum(tensors),
    }
    target = Path(os.fspath(path))
    header = {_META_KEY: json.dumps(meta)}
    _atomic_write(target, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=header))
    return target


def load(path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> KFAC | EKFAC | KFACState:
    """Read what :func:`save` wrote (tensors on ``device``, default CPU).

    Raises:
        FileNotFoundError: no file at ``path``.
        StateFileError: a truncated, corrupted or foreign file (checksum and format checked).
    """
    target = Path(os.fspath(path))
    header, tensors = read_safetensors(target, "K-FAC")

    def bad(why: str) -> StateFileError:
        return StateFileError(f"{target}: {why}")

    try:
        meta = json.loads(header[_META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise bad("has no valid fisherfunc K-FAC metadata: not a file written by fisherfunc.kfac.save") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION or meta.get("type") not in _TYPES:
        raise bad(f"format {meta.get('format')!r} version {meta.get('version')!r} is not this library's K-FAC format")
    if meta.get("sha256") != _checksum(tensors):
        raise bad("checksum mismatch: the tensor data is corrupted")
    layers = tuple(
        Layer(
            **{
                **x,
                "out_shape": tuple(x["out_shape"]),
                "weight_shape": tuple(x["weight_shape"]),
                "conv": None if x["conv"] is None else tuple(tuple(pair) for pair in x["conv"]),
            }
        )
        for x in meta["layers"]
    )
    fields = dict(meta["fields"])
    fields["names"] = tuple(fields["names"])
    for field in _TENSORS[meta["type"]]:
        fields[field] = {x.name: tensors[f"{field}/{x.name}"].to(device or "cpu") for x in layers}
    return _TYPES[meta["type"]](layers=layers, **fields)
