"""K-FAC / EK-FAC: fidelity to the exact Fisher blocks, and cost against a forward+backward and the peers.

(a) Fidelity. For every covered layer, the exact dense token-normalised empirical Fisher block
``F = Σ_b g_b g_bᵀ / Σ_b n_b`` (``g_b = [vec W, b]`` of sample ``b``'s summed loss, from
``vmap(grad)`` in float64) is compared with each approximation ``F̃`` by the relative Frobenius
error ``‖F̃ − F‖_F / ‖F‖_F``, per layer and aggregated over layers
(``√(Σ_l ‖F̃_l − F_l‖²) / √(Σ_l ‖F_l‖²)``). Approximations: the diagonal of ``F`` itself, fisherfunc
K-FAC (expand and, for the sequence model, reduce), EK-FAC, and the peers' K-FAC / EK-FAC where they
run (curvlinops ``KFACLinearOperator`` / ``EKFACLinearOperator`` with ``fisher_type="empirical"``,
``reduction="mean"``, ``separate_weight_and_bias=False``; nngeometry ``PMatKFAC`` / ``PMatEKFAC``
with the per-sample losses as its function). The peers' dense blocks are built from their factors
(``G ⊗ A`` and ``Q diag(S) Qᵀ``); tests/test_kfac_peers.py checks these equal the operators.
Models: an MLP trained on scikit-learn's digits, and a small pre-LN transformer trained on a
synthetic next-token task. The script asserts EK-FAC ≤ K-FAC (EK-FAC's scaling is the
Frobenius-optimal diagonal in K-FAC's eigenbasis).

(b) Cost. Median wall time over interleaved repeats, each in a random order (after one warm-up),
of ``ff.kfac.kfac`` on the benchmark workloads of benchmarks/run.py (MLP 784-512-512-10 B=128, the TinyLM
"transformer"), relative to a plain forward+backward of the same batch, next to the peers
computing their factors (curvlinops ``KFACLinearOperator.compute_kronecker_factors`` on an operator
built once; nngeometry ``PMatKFAC``) in the same interleaved repeats. Rows: the one-shot call (it
keeps the layers it discovered per loss object, so repeated calls run no discovery forward), a
``make_kfac_step`` call in steady state (the step keeps the layers' shapes across calls, as the
peers' operators do), ``update_every=10`` (the mean per call over 10 calls: one refresh, nine
returns of the state), ``ff.kfac.ekfac``'s second pass with and without eigendecompositions, and the
peers' EK-FAC passes with their bases kept (curvlinops ``compute_eigenvalue_correction`` after a
first call; nngeometry ``PMatEKFAC.update_diag``). It also prints the FLOP floor
``1 + Σ_l 2 P_l (a_l² + o_l²) / FLOPs(fwd+bwd)`` (``P_l`` positions, ``a_l`` / ``o_l`` the input
(+1) / output widths of layer ``l``; fwd+bwd FLOPs counted by ``torch.utils.flop_counter``): the
factor products alone cost that much on top of a forward+backward (on the CPU fisherfunc forms a
wide factor's blocks above the diagonal and mirrors them, a quarter or more of those FLOPs fewer).
Timing runs need the machine to themselves: on a shared machine, serialise them (e.g. under
``flock`` with a lock file of your choice).

    python benchmarks/kfac.py                      # both parts, markdown on stdout
    python benchmarks/kfac.py --part cost --repeats 15 --threads 1 --out kfac_cost.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

import fisherfunc as ff

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench_run  # noqa: E402

# --- models ----------------------------------------------------------------------------------------


class _ChannelsSecond(nn.Module):
    """``[B, T, C] -> [B, C, T]`` (``nn.CrossEntropyLoss``'s layout for curvlinops)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class _Flatten(nn.Module):
    """``[B, T, C] -> [B·T, C]`` (curvlinops' EK-FAC accepts 2-D outputs only)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])


class Block(nn.Module):
    """Pre-LN causal attention (q/k/v/o as ``nn.Linear``) and a 4× MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(z: Tensor) -> Tensor:
            return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SmallLM(nn.Module):
    """Token + position embeddings, one :class:`Block`, final LayerNorm, untied linear head."""

    def __init__(self, vocab: int, d: int, heads: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d))
        self.block = Block(d, heads)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.ln(self.block(self.embed(ids) + self.pos[: ids.shape[1]])))


def _fibonacci_batch(n: int, length: int, vocab: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x_t = (x_{t−1} + x_{t−2}) mod V`` from two random tokens; inputs ``[:, :-1]``, targets ``[:, 1:]``."""
    seq = torch.zeros(n, length + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, vocab, (n, 2), generator=g)
    for t in range(2, length + 1):
        seq[:, t] = (seq[:, t - 1] + seq[:, t - 2]) % vocab
    return seq[:, :-1], seq[:, 1:]


def _train(model: nn.Module, batches: Callable[[int], tuple[Tensor, Tensor]], loss_fn, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    value = float("nan")
    for step in range(steps):
        x, y = batches(step)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        value = float(loss.detach())
    return value


def digits_mlp(samples: int, steps: int = 300) -> dict[str, Any]:
    """64-32-10 Tanh MLP trained ``steps`` Adam steps on scikit-learn's digits; ``samples`` training samples."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    g = torch.Generator().manual_seed(0)

    def batches(step: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x), (128,), generator=g)
        return x[idx], y[idx]

    final = _train(model, batches, F.cross_entropy, steps=steps, lr=1e-2) if steps else float("nan")
    model = model.double().eval()
    batch = (x[:samples].double(), y[:samples])
    trained = f"{steps} Adam steps (train loss {final:.3f})" if steps else "at initialisation"
    return {
        "name": f"digits MLP 64-32-10 (tanh), {trained}, N={samples}",
        "model": model,
        "batch": batch,
        "loss": ff.losses.classification(model),
        "tokens": float(samples),
        "sequence": False,
    }


def small_transformer(samples: int) -> dict[str, Any]:
    """:class:`SmallLM` d=32, 2 heads, T=16, V=16 trained 300 Adam steps on ``x_t = x_{t−1} + x_{t−2} mod V``."""
    torch.manual_seed(0)
    vocab, d, length = 16, 32, 16
    model = SmallLM(vocab, d, 2, length)
    g = torch.Generator().manual_seed(0)

    def batches(step: int) -> tuple[Tensor, Tensor]:
        return _fibonacci_batch(64, length, vocab, g)

    def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    final = _train(model, batches, lm_loss, steps=300, lr=3e-3)
    model = model.double().eval()
    batch = _fibonacci_batch(samples, length, vocab, torch.Generator().manual_seed(1))
    return {
        "name": (
            f"pre-LN transformer block d=32, 2 heads, T=16, V=16, 300 Adam steps "
            f"(train loss {final:.3f}), N={samples} sequences"
        ),
        "model": model,
        "batch": batch,
        "loss": ff.losses.token_classification(model),
        "tokens": float(samples * length),
        "sequence": True,
    }


# --- exact blocks and approximations -----------------------------------------------------------------


def own_order(out: int, width: int, in_features: int) -> Tensor:
    """Indices into row-major ``vec [W | b]`` (``[out, width]``) of ``[W.reshape(-1), b]``."""
    o, i = torch.arange(out), torch.arange(in_features)
    weight = (o.unsqueeze(1) * width + i.unsqueeze(0)).reshape(-1)
    return torch.cat([weight, o * width + in_features])


def _kron_dense(G: Tensor, A: Tensor) -> Tensor:
    order = own_order(G.shape[0], A.shape[0], A.shape[0] - 1)
    return torch.kron(G, A)[order][:, order]


def _eigen_dense(QG: Tensor, QA: Tensor, S: Tensor) -> Tensor:
    q = torch.kron(QG, QA)
    order = own_order(QG.shape[0], QA.shape[0], QA.shape[0] - 1)
    return ((q * S.reshape(1, -1)) @ q.t())[order][:, order]


def exact_blocks(loss: Any, model: nn.Module, batch: Any, layers: list[str], tokens: float) -> dict[str, Tensor]:
    """``Σ_b g_b g_bᵀ / tokens`` per layer from per-sample gradients (``vmap(grad)``, float64)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    wanted = {name: params[name] for name in layers} | {
        name[:-6] + "bias": params[name[:-6] + "bias"] for name in layers
    }

    def sample_loss(sub: dict[str, Tensor], sample: Any) -> Tensor:
        return loss({**params, **sub}, sample)[0]

    grads = vmap(grad(sample_loss), in_dims=(None, 0))(wanted, batch)
    out = {}
    for name in layers:
        g = torch.cat([grads[name].flatten(1), grads[name[:-6] + "bias"]], dim=1)
        out[name] = g.t() @ g / tokens
    return out


def curvlinops_blocks(model: nn.Module, batch: Any, approx: str, sequence: bool) -> dict[str, dict[str, Tensor]]:
    """curvlinops K-FAC and EK-FAC dense blocks (by weight name), from their factors."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = [p for m in linears.values() for p in (m.weight, m.bias)]
    peer = nn.Sequential(model, _ChannelsSecond()) if sequence else model
    common = dict(fisher_type="empirical", separate_weight_and_bias=False, check_deterministic=False)
    kfac = KFACLinearOperator(peer, nn.CrossEntropyLoss(), params, [batch], kfac_approx=approx, **common)
    kfac.compute_kronecker_factors()
    prefix = "0." if sequence else ""
    out: dict[str, dict[str, Tensor]] = {"K-FAC": {}, "EK-FAC": {}}
    for name in linears:
        key = prefix + name
        out["K-FAC"][f"{name}.weight"] = _kron_dense(kfac._gradient_covariances[key], kfac._input_covariances[key])
    # EK-FAC: 2-D outputs only, so sequences are flattened to [B·T, C] (the layers still see [B, T, d]
    # and the per-example gradients are per sequence, as ours).
    peer = nn.Sequential(model, _Flatten()) if sequence else model
    data = [(batch[0], batch[1].reshape(-1))] if sequence else [batch]
    ekfac = EKFACLinearOperator(
        peer, nn.CrossEntropyLoss(), params, data, kfac_approx=approx, num_data=batch[0].shape[0], **common
    )
    ekfac.compute_kronecker_factors()
    ekfac.compute_eigenvalue_correction()
    for name in linears:
        key = prefix + name
        out["EK-FAC"][f"{name}.weight"] = _eigen_dense(
            ekfac._gradient_covariances_eigenvectors[key],
            ekfac._input_covariances_eigenvectors[key],
            ekfac._corrected_eigenvalues[key],
        )
    return out


def nngeometry_blocks(model: nn.Module, batch: Any) -> dict[str, dict[str, Tensor]]:
    """nngeometry PMatKFAC / PMatEKFAC dense blocks (empirical: its function is the per-sample losses)."""
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatEKFAC, PMatKFAC
    from torch.utils.data import DataLoader, TensorDataset

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(*batch), batch_size=batch[0].shape[0])

    collection = LayerCollection.from_model(model)
    generator = TorchHooksJacobianBackend(
        model,
        function=lambda x, y: F.cross_entropy(model(x), y, reduction="none"),
        layer_collection=collection,
    )
    kfac = PMatKFAC(generator=generator, examples=loader())
    ekfac = PMatEKFAC(generator=generator, examples=loader())
    ekfac.update_diag(loader())
    evecs, diags = ekfac.data
    out: dict[str, dict[str, Tensor]] = {"K-FAC": {}, "EK-FAC": {}}
    for layer_id in collection.layers:
        a, g = kfac.data[layer_id]
        out["K-FAC"][f"{layer_id}.weight"] = _kron_dense(g, a)
        qa, qg = evecs[layer_id]
        out["EK-FAC"][f"{layer_id}.weight"] = _eigen_dense(qg, qa, diags[layer_id])
    return out


def _fro_errors(approx: dict[str, Tensor], exact: dict[str, Tensor]) -> dict[str, float]:
    errs, num, den = {}, 0.0, 0.0
    for name, F_ in exact.items():
        if name not in approx:
            continue
        diff = float((approx[name] - F_).norm() ** 2)
        norm = float(F_.norm() ** 2)
        errs[name] = math.sqrt(diff / norm)
        num, den = num + diff, den + norm
    if len(errs) == len(exact):
        errs["all"] = math.sqrt(num / den)
    return errs


def _check_one_sample(w: dict[str, Any]) -> None:
    """With one sample and one position K-FAC is exact: checks the exact blocks' conventions."""
    model, loss = w["model"], w["loss"]
    params = {k: v.detach() for k, v in model.named_parameters()}
    one = tuple(t[:1] for t in w["batch"])
    F1 = ff.kfac.kfac(loss, params, one)
    names = [x.name for x in F1.layers]
    exact = exact_blocks(loss, model, one, names, 1.0)
    for n in names:
        err = float((ff.kfac.dense(F1, n) - exact[n]).norm() / exact[n].norm())
        assert err < 1e-10, f"one-sample K-FAC differs from the exact block of {n}: {err:.2e}"


def fidelity(w: dict[str, Any]) -> str:
    """The fidelity table (markdown) of one model (as built by :func:`digits_mlp`, :func:`small_transformer`)."""
    if not w["sequence"]:
        _check_one_sample(w)
    model, batch, loss = w["model"], w["batch"], w["loss"]
    params = {k: v.detach() for k, v in model.named_parameters()}
    F_expand = ff.kfac.kfac(loss, params, batch, approx="expand")
    layers = [x.name for x in F_expand.layers]
    exact = exact_blocks(loss, model, batch, layers, w["tokens"])
    rows: dict[str, dict[str, float]] = {}
    rows["diagonal of the exact F"] = _fro_errors({k: torch.diag(torch.diagonal(v)) for k, v in exact.items()}, exact)
    approxes = ["expand", "reduce"] if w["sequence"] else ["expand"]
    for approx in approxes:
        Fk = F_expand if approx == "expand" else ff.kfac.kfac(loss, params, batch, approx=approx)
        E = ff.kfac.ekfac(loss, params, batch, Fk)
        for n in layers:  # EK-FAC's scaling is diag(Qᵀ F Q) of the exact block: checks both
            order = own_order(Fk.G[n].shape[0], Fk.A[n].shape[0], Fk.A[n].shape[0] - 1)
            q = torch.kron(E.QG[n], E.QA[n])[order]
            s = E.scale[n].reshape(-1)
            assert torch.allclose(
                torch.einsum("ij,ik,kj->j", q, exact[n], q), s, rtol=1e-8, atol=1e-12 * float(s.max())
            )
        tag = f" ({approx})" if w["sequence"] else ""
        k_err = _fro_errors({n: ff.kfac.dense(Fk, n) for n in layers}, exact)
        e_err = _fro_errors({n: ff.kfac.dense(E, n) for n in layers}, exact)
        for n in k_err:  # EK-FAC is the Frobenius-closest diagonal in K-FAC's eigenbasis
            assert e_err[n] <= k_err[n] * (1 + 1e-9), f"EK-FAC worse than K-FAC on {n}: {e_err[n]} > {k_err[n]}"
        rows[f"fisherfunc K-FAC{tag}"] = k_err
        rows[f"fisherfunc EK-FAC{tag}"] = e_err
        try:
            peer = curvlinops_blocks(model, batch, approx, w["sequence"])
            rows[f"curvlinops K-FAC{tag}"] = _fro_errors(peer["K-FAC"], exact)
            rows[f"curvlinops EK-FAC{tag}"] = _fro_errors(peer["EK-FAC"], exact)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is a result
            rows[f"curvlinops{tag}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"] = {}
    if not w["sequence"]:
        try:
            peer = nngeometry_blocks(model, batch)
            rows["nngeometry PMatKFAC"] = _fro_errors(peer["K-FAC"], exact)
            rows["nngeometry PMatEKFAC"] = _fro_errors(peer["EK-FAC"], exact)
        except Exception as exc:  # noqa: BLE001
            rows[f"nngeometry: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"] = {}
    else:
        rows["nngeometry: n/a (its Linear layers take 2-D inputs only)"] = {}
    columns = [*layers, "all"]
    sizes = {n: exact[n].shape[0] for n in layers}
    lines = [
        f"**{w['name']}** — relative Frobenius error ‖F̃ − F‖/‖F‖ against the exact empirical Fisher block",
        "",
        "| approximation | " + " | ".join(f"{n} ({sizes[n]})" for n in layers) + " | all layers |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, errs in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{errs[c]:.4f}" if c in errs else "—" for c in columns) + " |")
    return "\n".join(lines)


# --- cost -------------------------------------------------------------------------------------------


def _flops_forward_backward(w: bench_run.Workload) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        bench_run._forward_backward(w)
    return float(counter.get_total_flops())


def _factor_flops(F_: ff.kfac.KFAC) -> float:
    return sum(2 * F_.positions[x.name] * (x.a_dim**2 + x.out_features**2) for x in F_.layers)


def _counted_flops(fn: Callable[[], Any]) -> float | None:
    """Matmul-like FLOPs of one call, counted by ``torch.utils.flop_counter`` (``None`` if it cannot)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001
        return None


def _eigh_all(F_: ff.kfac.KFAC) -> None:
    for x in F_.layers:  # what ff.kfac.ekfac does first: both factors' eigenbases, in float64
        torch.linalg.eigh(F_.A[x.name].double())
        torch.linalg.eigh(F_.G[x.name].double())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost(workload: str, repeats: int, device: str = "cpu") -> str:
    """The cost table (markdown) of one benchmark workload."""
    torch.manual_seed(0)
    dev = torch.device(device)
    w = bench_run.workloads(dev)[workload]()
    params = {k: v.detach() for k, v in w.model.named_parameters()}
    sequence = w.batch[0].ndim == 2 and w.batch[0].dtype == torch.long
    F_ = ff.kfac.kfac(w.loss, params, w.batch)
    covered = [x.name for x in F_.layers]
    fns: dict[str, Callable[[], Any]] = {
        "forward+backward": lambda: bench_run._forward_backward(w),
        f"ff.kfac.kfac expand ({len(covered)} layers)": lambda: ff.kfac.kfac(w.loss, params, w.batch),
    }
    # calls each timed function makes (a row's time is per call: the total divided by this)
    calls: dict[str, int] = {}
    one = tuple(t[:1] for t in w.batch)
    fns["ff.kfac.kfac expand on 1 sample (Python, [in, in] and [out, out] outputs)"] = lambda: ff.kfac.kfac(
        w.loss, params, one
    )
    step = ff.kfac.make_kfac_step(w.loss, decay=0.95)
    state = step.init(params, w.batch)
    fns["make_kfac_step, steady state (every call refreshes)"] = lambda: step(params, w.batch, state)
    every10 = ff.kfac.make_kfac_step(w.loss, decay=0.95, update_every=10)
    state10 = every10.init(params, w.batch)

    def ten_calls() -> None:
        s = state10
        for _ in range(10):  # call 0 refreshes the factors, calls 1-9 return the state
            s = every10(params, w.batch, s)

    amortised = "make_kfac_step update_every=10, per call (mean over 10 calls)"
    fns[amortised], calls[amortised] = ten_calls, 10
    if sequence:
        fns[f"ff.kfac.kfac reduce ({len(covered)} layers)"] = lambda: ff.kfac.kfac(
            w.loss, params, w.batch, approx="reduce"
        )
    fns["ff.kfac.ekfac second pass (given the factors; includes the eigh)"] = lambda: ff.kfac.ekfac(
        w.loss, params, w.batch, F_
    )
    fns["  of which: float64 eigh of every factor"] = lambda: _eigh_all(F_)
    E_ = ff.kfac.ekfac(w.loss, params, w.batch, F_)
    fns["ff.kfac.ekfac second pass reusing an EKFAC's bases (no eigh)"] = lambda: ff.kfac.ekfac(
        w.loss, params, w.batch, E_
    )
    notes = []
    # curvlinops: hooks on nn.Linear modules that are called (an nn.MultiheadAttention's out_proj
    # is not called as a module, its weights go to F.multi_head_attention_forward).
    try:
        from curvlinops import EKFACLinearOperator, KFACLinearOperator

        called: set[str] = set()
        handles = [
            m.register_forward_hook(lambda mod, i, o, n=n: called.add(n))
            for n, m in w.model.named_modules()
            if isinstance(m, nn.Linear)
        ]
        with torch.no_grad():
            w.model(w.batch[0])
        for h in handles:
            h.remove()
        modules = [n for n, m in w.model.named_modules() if n in called]
        peer_params = [p for n in modules for p in w.model.get_submodule(n).parameters()]
        common = dict(fisher_type="empirical", separate_weight_and_bias=False, check_deterministic=False)
        if sequence:
            ids = w.batch[0]
            op = KFACLinearOperator(
                nn.Sequential(w.model, _CausalShift()),
                nn.CrossEntropyLoss(),
                peer_params,
                [(ids, ids[:, 1:])],
                **common,
            )
            eop = EKFACLinearOperator(
                nn.Sequential(w.model, _CausalShift(), _ChannelsSecond(), _Flatten()),
                nn.CrossEntropyLoss(),
                peer_params,
                [(ids, ids[:, 1:].reshape(-1))],
                num_data=ids.shape[0],
                **common,
            )
        else:
            op = KFACLinearOperator(w.model, nn.CrossEntropyLoss(), peer_params, [w.batch], **common)
            eop = EKFACLinearOperator(w.model, nn.CrossEntropyLoss(), peer_params, [w.batch], **common)
        fns[f"curvlinops KFACLinearOperator factors ({len(modules)} layers)"] = op.compute_kronecker_factors
        same = [f"{n}.weight" for n in modules]
        if set(same) != set(covered):
            fns[f"ff.kfac.kfac expand, the same {len(modules)} layers"] = lambda: ff.kfac.kfac(
                w.loss, params, w.batch, layers=same
            )
            step_same = ff.kfac.make_kfac_step(w.loss, decay=0.95, layers=same)
            state_same = step_same.init(params, w.batch)
            fns[f"make_kfac_step steady state, the same {len(modules)} layers"] = lambda: step_same(
                params, w.batch, state_same
            )
            E_same = ff.kfac.ekfac(w.loss, params, w.batch, ff.kfac.kfac(w.loss, params, w.batch, layers=same))
            fns[f"ff.kfac.ekfac reusing bases, the same {len(modules)} layers"] = lambda: ff.kfac.ekfac(
                w.loss, params, w.batch, E_same
            )
        eop.compute_kronecker_factors()
        eop.compute_eigenvalue_correction()  # caches the eigenvectors: later calls time the pass alone
        fns["curvlinops EKFACLinearOperator second pass (eigenvectors cached)"] = eop.compute_eigenvalue_correction
        notes.append(f"curvlinops covers the nn.Linear modules called as modules: {', '.join(modules)}")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"curvlinops: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    if not sequence:
        try:
            from nngeometry.backend import TorchHooksJacobianBackend
            from nngeometry.layercollection import LayerCollection
            from nngeometry.object import PMatEKFAC, PMatKFAC
            from torch.utils.data import DataLoader, TensorDataset

            generator = TorchHooksJacobianBackend(
                w.model,
                function=lambda x, y: F.cross_entropy(w.model(x), y, reduction="none"),
                layer_collection=LayerCollection.from_model(w.model),
            )
            loader = DataLoader(TensorDataset(*w.batch), batch_size=w.batch[0].shape[0])
            fns["nngeometry PMatKFAC"] = lambda: PMatKFAC(generator=generator, examples=loader)
            peer_ekfac = PMatEKFAC(generator=generator, examples=loader)  # eigendecomposes once
            fns["nngeometry PMatEKFAC.update_diag (bases kept)"] = lambda: peer_ekfac.update_diag(loader)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"nngeometry: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    else:
        notes.append("nngeometry: n/a (its Linear layers take 2-D inputs only)")
    for fn in fns.values():  # warm-up
        fn()
    # nngeometry is not counted: under FlopCounterMode its pass raises, and it then leaves its hooks
    # on the model (no try/finally), breaking every later call.
    flops = {name: None if name.startswith("nngeometry") else _counted_flops(fn) for name, fn in fns.items()}
    for name, n in calls.items():
        counted = flops[name]
        flops[name] = None if counted is None else counted / n
    times: dict[str, list[float]] = {k: [] for k in fns}
    for name in bench_run.shuffled_repeats(list(fns), repeats):  # interleaved, in a random order per repeat
        fn = fns[name]
        _sync(dev)
        start = time.perf_counter()
        fn()
        _sync(dev)
        times[name].append(time.perf_counter() - start)
    for name, n in calls.items():
        times[name] = [t / n for t in times[name]]
    base = statistics.median(times["forward+backward"])
    fb_flops = flops["forward+backward"]
    assert fb_flops
    factor_flops = _factor_flops(F_)
    lines = [
        f"**{w.name}** — median of {repeats} interleaved repeats in a random order (after a warm-up; load average "
        f"{os.getloadavg()[0]:.2f} at the end); "
        "GFLOP: matmul FLOPs counted by torch.utils.flop_counter",
        "",
        "| method | median (ms) | × fwd+bwd time | GFLOP | × fwd+bwd FLOPs | GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, ts in times.items():
        m, f = statistics.median(ts), flops[name]
        fl = f"{f / 1e9:.3f} | {f / fb_flops:.2f} | {f / m / 1e9:.0f}" if f else "— | — | —"
        lines.append(f"| {name} | {1e3 * m:.1f} | {m / base:.2f} | {fl} |")
    lines += [
        "",
        f"Factor products Σ_l 2·P_l·(a_l² + o_l²) of the {len(covered)} covered layers: {factor_flops / 1e9:.3f} GFLOP "
        f"= {factor_flops / fb_flops:.2f} × the forward+backward's {fb_flops / 1e9:.3f} GFLOP, so K-FAC (expand) "
        f"on top of a training step's forward+backward is ≥ {1 + factor_flops / fb_flops:.2f}× by FLOPs.",
        f"Covered by fisherfunc: {', '.join(covered)}.",
        *[f"{n}." for n in notes],
    ]
    return "\n".join(lines)


class _CausalShift(nn.Module):
    """``logits [B, T, V] -> [B, V, T − 1]``: position t predicts token t + 1 (for curvlinops)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :-1].transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["fidelity", "cost", "both"], default="both")
    parser.add_argument("--samples", type=int, default=256, help="samples (MLP) for the fidelity part")
    parser.add_argument("--sequences", type=int, default=64, help="sequences (transformer) for the fidelity part")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workloads", nargs="*", default=["mlp", "transformer"])
    parser.add_argument("--out", help="also write the tables to this markdown file")
    parser.add_argument("--device", default="cpu", help="device of the cost part, e.g. cuda (fidelity: CPU, float64)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) before anything runs (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    header = [
        f"`{' '.join(['python', *sys.argv])}`",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()}; load average at the start {os.getloadavg()[0]:.2f}",
        "",
    ]
    sections = []
    if args.part in ("fidelity", "both"):
        sections.append("## Fidelity\n")
        for build in (
            lambda: digits_mlp(args.samples),
            lambda: digits_mlp(args.samples, steps=0),
            lambda: small_transformer(args.sequences),
        ):
            sections.append(fidelity(build()) + "\n")
            print(sections[-1], flush=True)
    if args.part in ("cost", "both"):
        sections.append("## Cost\n")
        for name in args.workloads:
            sections.append(cost(name, args.repeats, args.device) + "\n")
            print(sections[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(header + sections))


if __name__ == "__main__":
    main()
