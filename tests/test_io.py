"""``save`` / ``load``: bitwise round trips, low-precision storage, refusals and broken files.

Low-precision cases plant values from 1e-30 to 1e30 (and exact zeros) in the EMA and require
``|x̂ − x| ≤ u·|x|`` with ``u`` the storage dtype's unit roundoff (2⁻⁸ bfloat16, 2⁻¹¹ float16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import optree
import pytest
import safetensors.torch  # in the test extra; fisherfunc itself only needs it for save/load
import torch
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc.storage import UNIT_ROUNDOFF, Scaled, decode
from fisherfunc.testing import cases


def _setup(hidden: int = 6, **step: Any) -> tuple[nn.Module, ff.FisherStep, dict[str, Tensor], ff.FisherState]:
    """Linear(4, hidden) → Tanh → Linear(hidden, 3) (float32) after three steps on batches of 8."""
    case = cases.case("mlp", hidden=hidden, batch=(8, 8, 8), dtype=torch.float32)
    params = {k: v.detach() for k, v in case.params.items()}
    spec = {"0.weight": ff.Elementwise(), "0.bias": ff.Skip(), "2.weight": ff.Heads(3, axis=1), "2.bias": ff.Whole()}
    fisher_step = ff.make_fisher_step(case.loss, spec=spec, **({"decay": 0.9} | step))
    state = fisher_step.init(params)
    for batch in case.batches:
        state = fisher_step(params, batch, state)
    return case.model, fisher_step, params, state


def assert_bitwise(actual: ff.FisherState, expected: ff.FisherState) -> None:
    assert type(actual) is ff.FisherState
    assert actual._replace(ema=None) == expected._replace(ema=None)  # step, tokens, ..., spec, kind, skipped
    assert optree.tree_structure(actual.ema, none_is_leaf=True) == optree.tree_structure(
        expected.ema, none_is_leaf=True
    )
    for a, e in zip(optree.tree_leaves(actual.ema), optree.tree_leaves(expected.ema), strict=True):
        pairs = [(a.mantissa, e.mantissa), (a.exponent, e.exponent)] if isinstance(e, Scaled) else [(a, e)]
        for x, y in pairs:
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


# --- round trips ----------------------------------------------------------------------------------


def test_float32_round_trip_is_bitwise(tmp_path: Path) -> None:
    _, fisher_step, params, state = _setup()
    path = ff.save(tmp_path / "fisher.safetensors", state, params=params)
    loaded = ff.load(path, params)
    assert_bitwise(loaded, state)
    assert loaded.ema["0.bias"] is None and loaded.ema["2.bias"].shape == ()
    # The loaded state carries on exactly like the original.
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    assert_bitwise(fisher_step(params, batch, loaded), fisher_step(params, batch, state))


def test_task_dict_round_trip_and_single_task(tmp_path: Path) -> None:
    _, fisher_step, params, state = _setup()
    skipped = state._replace(skipped=4)
    fresh = fisher_step.init(params, dtype=torch.float64)
    path = ff.save(tmp_path / "tasks.safetensors", {"math": state, "code": skipped, "new": fresh}, params=params)
    loaded = ff.load(path, params)
    assert list(loaded) == ["math", "code", "new"]
    assert_bitwise(loaded["math"], state)
    assert_bitwise(loaded["code"], skipped)
    assert_bitwise(loaded["new"], fresh)
    assert_bitwise(ff.load(path, params, task="code"), skipped)
    with pytest.raises(KeyError, match=r"no task 'art'; its tasks are \['code', 'math', 'new'\]"):
        ff.load(path, params, task="art")
    # The same state under two tasks saves too (safetensors refuses shared memory; we copy).
    twice = ff.load(ff.save(tmp_path / "twice.safetensors", {"a": state, "b": state}, params=params), params)
    assert_bitwise(twice["b"], state)


def test_nested_params_and_every_rule(tmp_path: Path) -> None:
    params = {
        "enc": {"emb": torch.randn(7, 4), "proj": torch.randn(6, 4)},
        "heads": (torch.randn(8, 4), torch.randn(3)),
        "ids": torch.arange(3),
    }
    spec = {
        "enc": {"emb": ff.Buckets(mapping=(0, 1, 1, 2, 0, 2, 1)), "proj": ff.Heads(3, parts=2)},
        "heads": (ff.Channel(axis=1), ff.Rows()),
        "ids": ff.Skip(),
    }
    state = ff.init_state(params, spec=spec, decay=0.5)
    state = state._replace(ema=optree.tree_map(lambda m: torch.rand_like(m), state.ema), step=2, tokens=9.5, samples=3)
    loaded = ff.load(ff.save(tmp_path / "nested.safetensors", state, params=params), params)
    assert_bitwise(loaded, state)
    flat = ff.load(tmp_path / "nested.safetensors")  # no params: trust the file, flat names
    assert sorted(flat.ema) == ["enc.emb", "enc.proj", "heads.0", "heads.1", "ids"]
    assert torch.equal(flat.ema["enc.emb"], state.ema["enc"]["emb"])


@dataclasses.dataclass(frozen=True)
class EveryOther(ff.Rule):
    """A user-defined rule: even and odd entries of a vector."""

    group_type: str = dataclasses.field(default="parity", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        return torch.Size([2])

    def reduce(self, x: Tensor) -> Tensor:
        return torch.stack([x[0::2].sum(), x[1::2].sum()])


def test_user_defined_rules_round_trip(tmp_path: Path) -> None:
    params = {"v": torch.randn(5)}
    state = ff.init_state(params, spec=EveryOther(), decay=0.9)
    loaded = ff.load(ff.save(tmp_path / "custom.safetensors", state, params=params), params)
    assert loaded.spec == {"v": EveryOther()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_round_trip_keeps_1e_minus_30_to_1e30(tmp_path: Path, dtype: torch.dtype) -> None:
    _, fisher_step, params, state = _setup()
    exact = state.ema["0.weight"].clone()
    exact.view(-1)[:23] = torch.logspace(-30, 30, 23)
    exact.view(-1)[23] = 0.0
    wide = state._replace(ema=state.ema | {"0.weight": exact, "2.bias": torch.tensor(1e30)})
    low = ff.storage.store(wide, dtype=dtype)
    loaded = ff.load(ff.save(tmp_path / "low.safetensors", low, params=params), params)
    assert_bitwise(loaded, low)  # the stored form survives bitwise
    u = UNIT_ROUNDOFF[dtype]
    for name, original in wide.ema.items():
        if original is None:
            continue
        back = decode(loaded.ema[name])
        assert back.dtype == torch.float32 and torch.isfinite(back).all()
        assert ((back - original).abs() <= u * original.abs()).all(), name
    assert decode(loaded.ema["0.weight"]).view(-1)[23] == 0.0
    assert decode(loaded.ema["0.weight"]).view(-1)[0] > 0.0  # 1e-30 is not flushed
    assert ff.estimate(loaded)["2.bias"] == pytest.approx(1e30 / (1 - 0.9**3), rel=u)
    # A loaded low-precision state keeps stepping in its storage dtype.
    stepped = fisher_step(params, (torch.randn(8, 4), torch.randint(0, 3, (8,))), loaded)
    assert ff.metadata(stepped)["storage"]["dtypes"] == [str(dtype).removeprefix("torch.")]


# --- the file's metadata ---------------------------------------------------------------------------


def _header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def test_metadata_describes_the_states(tmp_path: Path) -> None:
    _, _, params, state = _setup()
    path = ff.save(tmp_path / "meta.safetensors", {"math": ff.storage.store(state, dtype=torch.float16)}, params=params)
    header = _header(path)
    meta = json.loads(header["__metadata__"]["fisherfunc"])
    assert meta["format"] == "fisherfunc.state" and meta["version"] == 2
    assert meta["library"]["fisherfunc"] == ff.__version__ and meta["library"]["torch"] == torch.__version__
    assert meta["created"].endswith("+00:00")
    assert meta["params"] == {
        "names": ["0.bias", "0.weight", "2.bias", "2.weight"],
        "shapes": [[6], [6, 4], [3], [3, 6]],
    }
    task = meta["tasks"]["math"]
    assert task["keys"] == ["math|0.weight|param", "math|2.bias|tensor", "math|2.weight|head"]
    assert (task["kind"], task["decay"], task["step"], task["tokens"], task["samples"], task["skipped"]) == (
        "empirical", 0.9, 3, 24.0, 24, 0,
    )  # fmt: skip
    assert task["rules"]["2.weight"] == "Heads(num_heads=3, axis=1, parts=1)"
    assert task["bias_correction"] == pytest.approx(1 - 0.9**3)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert tensors["math|0.weight|param"]["dtype"] == "F16" and tensors["math|0.weight|param|exponent"]["dtype"] == "I8"
    # Another tool reads the estimate straight from the file: tensor / bias_correction.
    raw = safetensors.torch.load_file(str(path))
    expected = ff.estimate(state)["2.weight"]
    via_file = raw["math|2.weight|head"].float() * 2.0 ** raw["math|2.weight|head|exponent"].float()
    torch.testing.assert_close(via_file / task["bias_correction"], expected, rtol=2**-11, atol=0)


# --- refusals -------------------------------------------------------------------------------------


def test_other_shapes_are_refused_naming_the_first_differing_parameter(tmp_path: Path) -> None:
    _, _, params, state = _setup(hidden=6)
    path = ff.save(tmp_path / "fisher.safetensors", state, params=params)
    _, _, wider, _ = _setup(hidden=9)  # 0.bias, 0.weight and 2.weight all differ; 0.bias comes first
    with pytest.raises(ff.SpecError, match=r"^parameter '0\.bias' has shape \(9,\) in params, but \(6,\) in the file$"):
        ff.load(path, wider)
    other_out = {k: v for k, v in params.items()} | {"2.weight": torch.zeros(3, 6), "2.bias": torch.zeros(4)}
    with pytest.raises(ff.SpecError, match=r"^parameter '2\.bias' has shape \(4,\)"):
        ff.load(path, other_out)
    with pytest.raises(ff.SpecError, match=r"the file's parameter '2\.bias' \(3,\) is not in params"):
        ff.load(path, {k: v for k, v in params.items() if k != "2.bias"})
    with pytest.raises(ff.SpecError, match=r"parameter 'extra' of params is not in the file"):
        ff.load(path, params | {"extra": torch.zeros(2)})


def test_save_refuses_a_state_made_for_other_params(tmp_path: Path) -> None:
    _, _, params, state = _setup(hidden=6)
    _, _, wider, _ = _setup(hidden=9)
    with pytest.raises(ff.SpecError, match=r"task 'default': parameter '0\.weight' has groups \(6, 4\)"):
        ff.save(tmp_path / "x.safetensors", state, params=wider)
    with pytest.raises(ff.SpecError, match=r"parameter 'extra' is only in params"):
        ff.save(tmp_path / "x.safetensors", state, params=params | {"extra": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"task 'a\|b' must be a non-empty string without '\|'"):
        ff.save(tmp_path / "x.safetensors", {"a|b": state}, params=params)
    assert not any(tmp_path.iterdir())  # nothing written


# --- broken files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1], ids=["empty", "5-bytes", "8-bytes", "in-header", "last-byte"])
def test_truncated_file_gets_a_clear_error(tmp_path: Path, keep: int) -> None:
    _, _, params, state = _setup()
    path = ff.save(tmp_path / "fisher.safetensors", state, params=params)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(
        ff.StateFileError, match=r"fisher\.safetensors: not a readable safetensors file, truncated"
    ) as info:
        ff.load(path, params)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no deep library traceback


def test_corrupted_bytes_are_detected(tmp_path: Path) -> None:
    _, _, params, state = _setup()
    path = ff.save(tmp_path / "fisher.safetensors", state, params=params)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one bit of tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ff.StateFileError, match="checksum mismatch: the header or the tensor data is corrupted"):
        ff.load(path, params)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ff.StateFileError, match="has no fisherfunc state metadata"):
        ff.load(plain)
    odd = tmp_path / "odd.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(odd), metadata={"fisherfunc": "{not json"})
    with pytest.raises(ff.StateFileError, match="not valid JSON"):
        ff.load(odd)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a tensor file at all")
    with pytest.raises(ff.StateFileError, match="not a readable safetensors file"):
        ff.load(text)
    with pytest.raises(FileNotFoundError, match="no state file at"):
        ff.load(tmp_path / "missing.safetensors")


# --- atomic writes --------------------------------------------------------------------------------


def test_a_crash_while_writing_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, fisher_step, params, state = _setup()
    path = ff.save(tmp_path / "fisher.safetensors", state, params=params)
    before = path.read_bytes()

    def crash(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str]) -> None:
        Path(filename).write_bytes(b"half a fi")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    newer = fisher_step(params, (torch.randn(4, 4), torch.randint(0, 3, (4,))), state)
    with pytest.raises(KeyboardInterrupt):
        ff.save(path, newer, params=params)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["fisher.safetensors"]
    monkeypatch.undo()
    ff.save(path, newer, params=params)  # a complete write replaces the file
    assert_bitwise(ff.load(path, params), newer)
    assert os.listdir(tmp_path) == ["fisher.safetensors"]


# --- safetensors is optional ----------------------------------------------------------------------


def test_missing_safetensors_gives_an_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, params, state = _setup()
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    for call in (lambda: ff.save(tmp_path / "x.safetensors", state, params=params), lambda: ff.load(tmp_path / "x")):
        with pytest.raises(ImportError, match=r"pip install 'fisherfunc\[io\]'"):
            call()


def test_fisherfunc_imports_without_safetensors() -> None:
    code = "import sys; sys.modules['safetensors'] = None; import fisherfunc; print(fisherfunc.save.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "save"


def test_design_names_of_this_part_are_public() -> None:
    # DESIGN §7: save, load, merge in fisherfunc; the module fisherfunc.distributed.
    assert {"save", "load", "merge", "distributed", "storage", "NonFiniteError", "StateFileError"} <= set(ff.__all__)
    assert ff.FisherState._fields[-1] == "skipped" and ff.FisherState._field_defaults["skipped"] == 0
    assert callable(ff.distributed.data_parallel) and callable(ff.distributed.all_reduce)
