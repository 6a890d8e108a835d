"""Live tensor bytes, counted as torch allocates and frees them: a peak-memory gauge that works on CPU.

On CUDA, ``torch.cuda.max_memory_allocated`` is the truth; the CPU allocator keeps no statistics,
and a process's resident memory mixes in the interpreter, libraries and freed-but-kept pages. A
:class:`LiveBytes` mode counts what tensors hold instead::

    live(t) = Σ_{storage s allocated since the mode was entered, still alive at t} nbytes(s)
    peak    = max_t live(t)

It is a ``TorchDispatchMode``: every operator's output tensors are seen once, by their storage
(views share their base's storage and add nothing; an in-place op allocates nothing), and a weak
reference on the storage subtracts its bytes when torch frees it. ``torch.func`` transforms sit
above the dispatch mode, so under ``vmap`` the mode sees the physical, batched tensors (a vmapped
op over ``B`` samples counts ``B`` times the bytes), and ``grad``'s backward runs under it too.

What it does not see: storages allocated before it was entered (parameters, inputs: they are the
baseline, not the call's), scratch memory a kernel allocates and frees inside itself (oneDNN,
cuBLAS workspaces), and memory outside tensors. Peaks are therefore a lower bound of what the
allocator sees, exact for what the computation keeps.

``section(name)`` labels the allocations made inside it, and the mode keeps, for the moment of
the peak, the live bytes per section and per operator: what :mod:`benchmarks.memory_sites` uses to
attribute a peak to the sites that hold it.

Where torch keeps one Python object per storage for its lifetime (2.4 and later were tested), a
weak reference sees the free as it happens. Older torch (2.1) makes a new object on every access;
there the mode holds each storage and polls its use count before every operator and on reading
``current``, releasing the ones only it still holds — the same numbers, at a cost per operator
that grows with the live storages.

>>> import torch
>>> with LiveBytes() as live:
...     x = torch.zeros(1000)            # 4000 bytes
...     y = x.view(10, 100)              # a view: nothing new
...     del x, y
...     z = torch.zeros(500)             # 2000 bytes
>>> live.peak, live.current
(4000, 2000)
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import Any

import optree
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LiveBytes", "weak_storages"]


@functools.cache
def weak_storages() -> bool:
    """Whether this torch keeps one Python object per storage for its lifetime (a weak reference sees the free)."""
    t = torch.zeros(1)
    return t.untyped_storage() is t.untyped_storage()


def _storage(leaf: Any, device_type: str | None) -> torch.UntypedStorage | None:
    """The storage of a plain, non-meta tensor on ``device_type`` (any if ``None``); else ``None``."""
    if not isinstance(leaf, Tensor) or leaf.is_meta:
        return None
    if type(leaf) is not Tensor and not isinstance(leaf, torch.nn.Parameter):
        return None  # a wrapper subclass: the mode sees its inner tensors' allocations
    if device_type is not None and leaf.device.type != device_type:
        return None
    try:
        return leaf.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


class LiveBytes(TorchDispatchMode):
    """Count the bytes of live tensor storages allocated inside the mode, and their peak.

    Attributes:
        current: bytes of the storages allocated inside the mode and still alive.
        peak: the largest ``current`` seen (since entering, or :meth:`reset_peak`).
        peak_by_section: at the peak, live bytes per :meth:`section` label (``""``: outside any).
        peak_by_op: at the peak, live bytes per allocating operator (e.g. ``"aten.mm.default"``).

    Args:
        device_type: count only tensors on this device type (``"cpu"``, ``"cuda"``); ``None``: all
            but ``"meta"``.
    """

    def __init__(self, device_type: str | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self._current = 0
        self.peak = 0
        self.peak_by_section: dict[str, int] = {}
        self.peak_by_op: dict[str, int] = {}
        self._sections: list[str] = [""]
        # storage key -> (bytes, section, op, a weak reference or, on old torch, the storage itself)
        self._live: dict[int, tuple[int, str, str, Any]] = {}
        self._weak = weak_storages()
        self._by_section: dict[str, int] = {}
        self._by_op: dict[str, int] = {}

    @property
    def current(self) -> int:
        """Bytes of the storages allocated inside the mode and still alive."""
        self._poll()
        return self._current

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Label the allocations made inside the block ``name`` (nested: the innermost label wins)."""
        self._sections.append(name)
        try:
            yield
        finally:
            self._sections.pop()

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak = self._current
        self.peak_by_section = {k: v for k, v in self._by_section.items() if v}
        self.peak_by_op = {k: v for k, v in self._by_op.items() if v}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self._poll()
        out = func(*args, **(kwargs or {}))
        inputs: set[int] | None = None  # storages of the inputs, found once an output's storage is new
        for leaf in optree.tree_leaves(out):
            storage = _storage(leaf, self.device_type)
            if storage is None:
                continue
            key, size = storage._cdata, storage.nbytes()
            held = self._live.get(key)
            if held is not None:
                if held[0] != size:  # resized in place
                    self._change(held[1], held[2], size - held[0])
                    self._live[key] = (size, held[1], held[2], held[3])
                continue
            if inputs is None:
                leaves: list[Any] = optree.tree_leaves((args, kwargs or {}))  # type: ignore[arg-type]
                inputs = {s._cdata for x in leaves if (s := _storage(x, None)) is not None}
            if key not in inputs:  # not a view (or in-place result) of a storage from before the mode
                self._add(storage, key, size, str(func))
        return out

    def _add(self, storage: torch.UntypedStorage, key: int, size: int, op: str) -> None:
        section = self._sections[-1]
        ref = weakref.ref(storage, functools.partial(self._free, key)) if self._weak else storage
        self._live[key] = (size, section, op, ref)
        self._change(section, op, size)

    def _free(self, key: int, _ref: Any = None) -> None:
        held = self._live.pop(key, None)
        if held is not None:
            self._change(held[1], held[2], -held[0])

    def _poll(self) -> None:
        """Old torch: release the storages that only this mode still holds (use count 1)."""
        if self._weak:
            return
        use_count = torch._C._storage_Use_Count
        for key in [k for k, held in self._live.items() if use_count(held[3]._cdata) == 1]:
            self._free(key)

    def __exit__(self, *exc: Any) -> Any:
        self._poll()
        return super().__exit__(*exc)

    def _change(self, section: str, op: str, delta: int) -> None:
        self._current += delta
        self._by_section[section] = self._by_section.get(section, 0) + delta
        self._by_op[op] = self._by_op.get(op, 0) + delta
        if self._current > self.peak:
            self.reset_peak()
