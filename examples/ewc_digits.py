"""Elastic weight consolidation on split digits: how much of task A survives learning task B?

    python examples/ewc_digits.py                      # class-incremental, 3 seeds (about 30 s on 2 CPU cores)
    python examples/ewc_digits.py --scenario task      # task-incremental

scikit-learn's bundled ``load_digits`` (1797 8×8 images) split into two tasks, A = digits 0–4 and
B = digits 5–9, each cut 60/20/20 into train / validation / test. A 64-256-10 tanh MLP learns A,
then B (Adam, lr 1e-3, minibatches of 32, 10 epochs each); we measure accuracy on A's and B's test
sets after B. The 10 logits are used in one of two ways:

- ``class`` (class-incremental; the default): one shared 10-way head. Each task trains on all 10
  logits and is tested on all 10, so the task is not known at test time: to keep A, learning B
  must not let B's classes take over A's inputs. Without a regulariser this forgets A completely.
- ``task`` (task-incremental): two 5-way heads, A's logits 0–4 and B's 5–9; each task trains and
  is tested on its own head. Only the shared hidden layer can forget, and on this problem it
  hardly does.

Regularisers while learning B (the anchor ``θ*_A`` is the parameters after A):

- ``none``;
- ``L2 to θ*_A``: ``F = 1``, the same pull on every weight — the control for the Fisher;
- ``EWC, diagonal``: the true Fisher of A (``kind="exact"``) at ``θ*_A``, full diagonal;
- ``EWC, channels``: the same, one number per output unit (``ff.infer_spec``), broadcast onto the
  weights as densities ``F_g / n_g``;
- ``online EWC``: a running per-channel ``FisherState`` with decay ``γ = 0.9``, stepped on every
  minibatch while A was learned (``state = fisher_step(params, batch, state)``, exact kind): no
  separate pass over A's data after A (EWC++, Chaudhry et al. 2018; its penalty uses the state's
  bias-corrected estimate).

``λ`` of each regulariser is chosen on the validation sets: decades from 1e-2 to 1e5, then the two
half-decades around the best; the score is the mean of A's and B's validation accuracy after B,
averaged over the seeds. The table reports test accuracy, mean ± standard deviation over the
seeds. Needs scikit-learn (the ``demo`` or ``test`` extra).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import fisherfunc as ff
import fisherfunc.ewc as ewc

Split = tuple[Tensor, Tensor]
Params = dict[str, Tensor]
METHODS = ("none", "L2 to θ*_A", "EWC, diagonal", "EWC, channels", "online EWC")
DECADES = tuple(10.0**k for k in range(-2, 6))


class Task(NamedTuple):
    """One task's classes ``[lo, hi)`` and its train / validation / test splits (labels are digits 0–9)."""

    classes: tuple[int, int]
    train: Split
    val: Split
    test: Split


def split_tasks(seed: int) -> tuple[Task, Task]:
    """Digits 0–4 and 5–9, each shuffled (seeded) and cut 60/20/20."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for lo, hi in ((0, 5), (5, 10)):
        idx = torch.nonzero((y >= lo) & (y < hi)).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        a, b = int(0.6 * len(idx)), int(0.8 * len(idx))
        train, val, test = ((x[i], y[i]) for i in (idx[:a], idx[a:b], idx[b:]))
        tasks.append(Task((lo, hi), train, val, test))
    return tasks[0], tasks[1]


def make_model(hidden: int) -> nn.Module:
    """The 64-hidden-10 tanh MLP (its 10 logits are both heads, or the shared one)."""
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def head(scenario: str, task: Task) -> tuple[int, int]:
    """The logits a task trains and is tested on: its own 5 (``task``) or all 10 (``class``)."""
    return task.classes if scenario == "task" else (0, 10)


def accuracy(model: nn.Module, scenario: str, task: Task, split: Split) -> float:
    """Accuracy on ``split``: argmax over the task's head."""
    lo, hi = head(scenario, task)
    x, y = split
    with torch.no_grad():
        return float((model(x)[:, lo:hi].argmax(1) + lo == y).float().mean())


def train(
    model: nn.Module,
    scenario: str,
    task: Task,
    *,
    epochs: int,
    seed: int,
    penalty: Callable[[Params], Tensor] | None = None,
    on_batch: Callable[[Split], None] | None = None,
) -> None:
    """Adam (lr 1e-3), minibatches of 32: cross-entropy on the task's head, plus ``penalty(params)``."""
    lo, hi = head(scenario, task)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    x, y = task.train
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 32):
            xb, yb = x[order[i : i + 32]], y[order[i : i + 32]] - lo
            loss = nn.functional.cross_entropy(model(xb)[:, lo:hi], yb)
            if penalty is not None:
                loss = loss + penalty(dict(model.named_parameters()))  # a scalar tensor; autograd does the rest
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_batch is not None:
                on_batch((xb, yb))


class AfterA(NamedTuple):
    """What learning A leaves: the trained model, the anchor ``θ*_A`` and A's Fishers."""

    model: nn.Module
    anchor: Params
    spec: Any
    diagonal: Any  # elementwise tree, exact kind, at θ*_A
    channels: Any  # group tree under spec, exact kind, at θ*_A
    online: ff.FisherState  # per-channel, stepped on every minibatch of A


def learn_a(scenario: str, a: Task, *, seed: int, epochs: int, hidden: int, decay: float) -> AfterA:
    """Train on A, stepping a running Fisher state on every minibatch; then A's exact Fishers at ``θ*_A``."""
    torch.manual_seed(seed)
    model = make_model(hidden)
    lo, hi = head(scenario, a)
    loss = ff.losses.classification(model, output=lambda z: z[..., lo:hi])  # labels y − lo
    spec = ff.infer_spec(model)  # one group per output unit
    fisher_step = ff.make_fisher_step(loss, spec=spec, decay=decay, kind="exact")
    params = dict(model.named_parameters())  # the live weights: each step reads them as they are now
    running = [fisher_step.init(params)]

    def step(batch: Split) -> None:
        running.append(fisher_step(params, batch, running.pop()))

    train(model, scenario, a, epochs=epochs, seed=seed, on_batch=step)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = (a.train[0], a.train[1] - lo)
    diagonal = ff.fisher(loss, anchor, data, spec=ff.Elementwise(), kind="exact")
    channels = ff.fisher(loss, anchor, data, spec=spec, kind="exact")
    return AfterA(model, anchor, spec, diagonal, channels, running.pop())


def regulariser(method: str, after: AfterA, strength: float) -> Callable[[Params], Tensor] | None:
    """A method's penalty, built once before learning B."""
    if method == "none":
        return None
    if method == "L2 to θ*_A":
        ones = {k: torch.ones_like(v) for k, v in after.anchor.items()}
        return ewc.penalty(after.anchor, ones, strength=strength)
    if method == "EWC, diagonal":
        return ewc.penalty(after.anchor, after.diagonal, strength=strength)
    if method == "EWC, channels":
        return ewc.penalty(after.anchor, after.channels, spec=after.spec, strength=strength)
    if method == "online EWC":
        return ewc.penalty(after.anchor, after.online, strength=strength)
    raise ValueError(f"unknown method {method!r}")


class Run(NamedTuple):
    """One seed's tasks and what learning A left."""

    seed: int
    a: Task
    b: Task
    after: AfterA


def learn_b(scenario: str, run: Run, method: str, strength: float, *, epochs: int, hidden: int) -> dict[str, float]:
    """Learn B from ``θ*_A`` with a method's penalty; accuracy on A and B, validation and test."""
    model = make_model(hidden)
    model.load_state_dict(run.after.model.state_dict())
    penalty = regulariser(method, run.after, strength)
    train(model, scenario, run.b, epochs=epochs, seed=run.seed + 1000, penalty=penalty)
    return {
        f"{name} {split}": accuracy(model, scenario, task, getattr(task, split))
        for name, task in (("A", run.a), ("B", run.b))
        for split in ("val", "test")
    }


def sweep(score: Callable[[float], float], strengths: Sequence[float], refine: bool) -> float:
    """The strength with the best score: over ``strengths``, then (``refine``) the two half-decades around it."""
    scores = {s: score(s) for s in strengths}
    best = max(scores, key=lambda s: scores[s])
    if refine:
        for s in (best / 10**0.5, best * 10**0.5):
            scores[s] = score(s)
        best = max(scores, key=lambda s: scores[s])
    return best


def main(
    *,
    scenario: str = "class",
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 10,
    hidden: int = 256,
    decay: float = 0.9,
    strengths: Sequence[float] = DECADES,
    refine: bool = True,
) -> dict[str, dict[str, Any]]:
    """Learn A, then B under each regulariser with ``λ`` chosen on validation; print and return the table.

    Returns:
        ``{method: {"strength": λ, "A": (mean, sd), "B": (mean, sd)}}`` (test accuracies after B), and
        ``"A before B"``: ``(mean, sd)`` of A's test accuracy before B.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    try:
        table = _compare(scenario, seeds, epochs, hidden, decay, strengths, refine)
    finally:
        torch.set_num_threads(threads)
    return table


def _compare(
    scenario: str,
    seeds: Sequence[int],
    epochs: int,
    hidden: int,
    decay: float,
    strengths: Sequence[float],
    refine: bool,
) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        a, b = split_tasks(seed)
        runs.append(Run(seed, a, b, learn_a(scenario, a, seed=seed, epochs=epochs, hidden=hidden, decay=decay)))
    before = _mean_sd([accuracy(r.after.model, scenario, r.a, r.a.test) for r in runs])
    table: dict[str, Any] = {"A before B": before}
    for method in METHODS:
        cache: dict[float, list[dict[str, float]]] = {}

        def score(strength: float, method: str = method, cache: dict = cache) -> float:
            cache[strength] = [learn_b(scenario, r, method, strength, epochs=epochs, hidden=hidden) for r in runs]
            return statistics.mean((o["A val"] + o["B val"]) / 2 for o in cache[strength])

        strength = 0.0 if method == "none" else sweep(score, strengths, refine)
        if method == "none":
            score(0.0)
        outs = cache[strength]
        table[method] = {
            "strength": strength,
            "A": _mean_sd([o["A test"] for o in outs]),
            "B": _mean_sd([o["B test"] for o in outs]),
        }
    print(markdown(scenario, table, len(runs)))
    return table


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(scenario: str, table: dict[str, Any], seeds: int) -> str:
    """The table as markdown, with a one-line caption."""
    title = {"task": "task-incremental (two 5-way heads)", "class": "class-incremental (one 10-way head)"}[scenario]
    before = table["A before B"]
    lines = [
        f"{title}: test accuracy after learning B, mean ± sd over {seeds} seed(s); "
        f"A before B: {before[0]:.3f} ± {before[1]:.3f}",
        "",
        "| method | λ (validation) | accuracy on A | accuracy on B |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        row = table[method]
        lam = "—" if method == "none" else f"{row['strength']:.3g}"
        a, b = row["A"], row["B"]
        lines.append(f"| {method} | {lam} | {a[0]:.3f} ± {a[1]:.3f} | {b[0]:.3f} ± {b[1]:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="EWC on split digits: accuracy on A and B after learning B.")
    parser.add_argument("--scenario", choices=("class", "task"), default="class")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … n−1")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task")
    args = parser.parse_args()
    main(scenario=args.scenario, seeds=tuple(range(args.seeds)), epochs=args.epochs)
