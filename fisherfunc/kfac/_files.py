"""Save and load K-FAC / EK-FAC estimates and K-FAC states (safetensors + JSON metadata, atomic).

Tensors are stored under ``"<field>/<layer name>"`` (``A``, ``G`` for K-FAC and states; ``QA``,
``QG``, ``scale`` for EK-FAC); the metadata records the layers, counts, convention, kind, the
parameter names, versions, the time and a SHA-256 over the tensors, as :func:`fisherfunc.save` does.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch

from .._state import container
from .._version import __version__
from ._eigen import EKFAC
from ._factors import KFAC, KFACState
from ._layers import Layer

__all__ = ["save", "load"]

FORMAT = "fisherfunc-kfac"
#: 2: the header is sealed with the tensors (version 1 files are read too).
FORMAT_VERSION = 2
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
    safetensors = container.safetensors_module()
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
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "type": kind_name,
        "layers": [layer.to_json() for layer in value.layers],
        "fields": fields,
        "library": {
            "fisherfunc": __version__,
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return container.write(path, tensors, meta, key=_META_KEY)


def load(path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> KFAC | EKFAC | KFACState:
    """Read what :func:`save` wrote (tensors on ``device``, default CPU).

    Raises:
        FileNotFoundError: no file at ``path``.
        StateFileError: a truncated, corrupted or foreign file (checksum and format checked).
    """
    target = Path(os.fspath(path))
    meta, tensors = container.read(target, key=_META_KEY, format=FORMAT, version=FORMAT_VERSION, what="K-FAC")
    if meta.get("type") not in _TYPES:
        raise container.StateFileError(f"{target}: holds a {meta.get('type')!r}, not a KFAC, EKFAC or KFACState")
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
