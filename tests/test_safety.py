"""What must never go silently wrong: edited files, and models instrumented with hooks.

- A state file's header (task, step, tokens, samples, decay, kind, spec, names, shapes) is sealed
  with its tensors: editing any field by hand — ``"step": 1`` to ``7`` would turn the bias-corrected
  estimate from 0.58 into 0.11 — is refused on load, like a flipped tensor byte. The same holds for
  K-FAC files.
- A model carrying backward hooks (another library's ``extend(model)``, a
  ``register_full_backward_hook``) is refused before any work, naming the hooked modules; forward
  hooks are part of the model's function and work, and the hooks run on one sample at a time.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fisherfunc as ff

pytest.importorskip("safetensors")


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite the JSON header of a safetensors file in place (same tensors), applying ``edit`` to it."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def _state(decay: float = 0.9) -> tuple[dict[str, torch.Tensor], ff.FisherState, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    step = ff.make_fisher_step(ff.losses.classification(model), decay=decay)
    state = step(params, (torch.randn(8, 4), torch.randint(0, 3, (8,))), step.init(params))
    return params, state, model


def _flip(field: str, value) -> callable:
    def edit(header: dict) -> None:
        meta = json.loads(header["__metadata__"]["fisherfunc"])
        task = next(iter(meta["tasks"]))
        meta["tasks"][task][field] = value
        header["__metadata__"]["fisherfunc"] = json.dumps(meta)

    return edit


def test_a_hand_edited_step_count_is_refused(tmp_path: Path) -> None:
    params, state, _ = _state()
    path = ff.save(tmp_path / "fisher.safetensors", state, params=params)
    honest = ff.estimate(ff.load(path, params))
    _rewrite_header(path, lambda header: None)  # rewriting the same header keeps the seal
    assert torch.equal(ff.estimate(ff.load(path, params))["0.weight"], honest["0.weight"])
    _rewrite_header(path, _flip("step", 7))
    with pytest.raises(ff.StateFileError, match="checksum mismatch: the header or the tensor data"):
        ff.load(path, params)


@pytest.mark.parametrize(
    ("field", "value"),
    [("decay", 0.5), ("tokens", 1.0), ("samples", 3), ("kind", "exact"), ("skipped", 2)],
)
def test_every_header_field_is_sealed(tmp_path: Path, field: str, value) -> None:
    params, state, _ = _state()
    path = ff.save(tmp_path / "fisher.safetensors", state, params=params)
    _rewrite_header(path, _flip(field, value))
    with pytest.raises(ff.StateFileError, match="checksum mismatch"):
        ff.load(path, params)


def test_edited_rules_and_parameter_table_are_refused(tmp_path: Path) -> None:
    params, state, _ = _state()
    path = ff.save(tmp_path / "fisher.safetensors", state, params=params)

    def rule(header: dict) -> None:
        meta = json.loads(header["__metadata__"]["fisherfunc"])
        meta["tasks"]["default"]["spec"]["0.weight"] = {"type": "fisherfunc.Whole", "fields": {}}
        header["__metadata__"]["fisherfunc"] = json.dumps(meta)

    def shapes(header: dict) -> None:
        meta = json.loads(header["__metadata__"]["fisherfunc"])
        meta["params"]["shapes"][0] = [4, 5]
        header["__metadata__"]["fisherfunc"] = json.dumps(meta)

    for edit in (rule, shapes):
        target = tmp_path / f"{edit.__name__}.safetensors"
        target.write_bytes(path.read_bytes())
        _rewrite_header(target, edit)
        with pytest.raises(ff.StateFileError, match="checksum mismatch"):
            ff.load(target, params)


def test_a_hand_edited_kfac_file_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    K = ff.kfac.kfac(
        ff.losses.classification(model), dict(model.named_parameters()), (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    )
    path = ff.kfac.save(tmp_path / "kfac.safetensors", K)
    assert ff.kfac.load(path).tokens == K.tokens

    def tokens(header: dict) -> None:
        meta = json.loads(header["__metadata__"]["fisherfunc_kfac"])
        meta["fields"]["tokens"] = 60.0
        header["__metadata__"]["fisherfunc_kfac"] = json.dumps(meta)

    _rewrite_header(path, tokens)
    with pytest.raises(ff.StateFileError, match="checksum mismatch"):
        ff.kfac.load(path)


# --- hooks ----------------------------------------------------------------------------------------


def _hooked(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    if kind == "full_backward":
        model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    elif kind == "backward_pre":
        model[0].register_full_backward_pre_hook(lambda module, grad_out: None)
    elif kind == "legacy_backward":
        with warnings.catch_warnings():  # deprecated in some torch releases
            warnings.simplefilter("ignore")
            model[0].register_backward_hook(lambda module, grad_in, grad_out: None)
    return model


@pytest.mark.parametrize(
    ("kind", "where"), [("full_backward", "'2'"), ("backward_pre", "'0'"), ("legacy_backward", "'0'")]
)
def test_backward_hooked_models_are_refused_naming_the_modules(kind: str, where: str) -> None:
    model = _hooked(kind)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    loss = ff.losses.classification(model)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))  # counts forwards
    for entry in (
        lambda: ff.fisher(loss, params, batch),
        lambda: ff.per_sample_fisher(loss, params, batch),
        lambda: ff.make_fisher_step(loss)(params, batch, ff.make_fisher_step(loss).init(params)),
        lambda: ff.kfac.kfac(loss, params, batch),
        lambda: ff.infer_spec(model),
    ):
        with pytest.raises(ValueError, match=f"module\\(s\\) {where} of Sequential carry backward hooks"):
            entry()
    assert not calls, "refused before any forward"


def test_backpack_extended_models_are_refused() -> None:
    backpack = pytest.importorskip("backpack")
    model = backpack.extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=r"module\(s\) '0', '1', '2' of Sequential carry backward hooks.*BackPACK"):
        ff.fisher(ff.losses.classification(model), params, (torch.randn(6, 4), torch.randint(0, 3, (6,))))


def test_a_global_backward_hook_is_refused() -> None:
    model = nn.Linear(4, 3)
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda module, gi, go: None)
    try:
        with pytest.raises(ValueError, match="a global module backward hook is registered"):
            ff.fisher(
                ff.losses.classification(model),
                dict(model.named_parameters()),
                (torch.randn(2, 4), torch.tensor([0, 1])),
            )
    finally:
        handle.remove()


def test_forward_hooks_are_part_of_the_model_and_run_per_sample() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    plain = ff.fisher(ff.losses.classification(model), params, batch)
    shapes = []
    model[0].register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    model[1].register_forward_hook(lambda module, args, out: 2 * out)  # changes the function
    hooked = ff.fisher(ff.losses.classification(model), params, batch)
    assert shapes and all(s == (1, 5) for s in shapes), "hooks see one sample at a time"
    reference = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    scaled = {**params, "2.weight": 2 * params["2.weight"]}  # 2·tanh(z) into the head = tanh(z) into 2·W
    expected = ff.fisher(ff.losses.classification(reference), scaled, batch)
    for name in ("0.weight", "0.bias", "2.bias"):
        assert torch.allclose(hooked[name], expected[name], rtol=1e-10, atol=0), name
    assert not torch.allclose(hooked["0.weight"], plain["0.weight"])
