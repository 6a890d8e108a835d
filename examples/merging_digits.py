"""Fisher merging on scikit-learn's digits: two fine-tunes of one MLP merged, against plain averaging.

    python examples/merging_digits.py

1. A shared start: the digits MLP of the ``fisherfunc`` command (64-64-32-10, ReLU), trained briefly
   (20 full-batch Adam steps) on the training split (60% of the 1797 images).
2. Two fine-tunes of it, 200 full-batch Adam steps each: task A on the digits 0–4, task B on 5–9.
   Each task keeps its own head (the last Linear, ``4.weight`` and ``4.bias``), as in Matena &
   Raffel's experiments, where task heads are not merged: the bodies are merged with
   ``exclude="4.*"``, and each task is read through its own fine-tuned head.
3. Bodies compared on the test split (20%): accuracy on task A and on task B (10-way argmax) — each
   fine-tune, the plain average, Fisher merges (the true Fisher, ``kind="exact"``, of each
   fine-tune on its own task's training data: the diagonal, with and without the default L2
   normalisation, and the per-channel Fisher spread onto the weights), and ``λ`` searched on the
   validation split (the other 20%) for the plain average and the Fisher merge.
4. All of it for 8 seeds (split and initialisation): the table gives each accuracy averaged over
   the seeds, and the range of the two tasks' mean accuracy across seeds.

Needs scikit-learn (the ``demo`` or ``test`` extra). About a second per seed on a 2-core CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import fisherfunc as ff
import fisherfunc.merging as fm
from fisherfunc.cli.demo import load_digits, train

HEAD = "4.*"  # the last Linear of the demo MLP: each task's own head, never merged
Data = tuple[Tensor, Tensor]

ROWS = (
    "shared start (its own head)",
    "fine-tuned on A",
    "fine-tuned on B",
    "plain average",
    "plain average, λ searched",
    "Fisher, diagonal, normalize=None",
    "Fisher, diagonal (default: L2-normalised)",
    "Fisher, per channel, spread",
    "Fisher, diagonal, λ searched",
)


def split(seed: int) -> dict[str, dict[str, Data]]:
    """The digits shuffled by ``seed``, cut 60/20/20 into train/val/test, each into task A (0–4) and B (5–9)."""
    x, y = load_digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n = len(y)
    cuts = {"train": slice(0, 6 * n // 10), "val": slice(6 * n // 10, 8 * n // 10), "test": slice(8 * n // 10, n)}
    out: dict[str, dict[str, Data]] = {}
    for name, cut in cuts.items():
        xs, ys = x[cut], y[cut]
        out[name] = {"all": (xs, ys), "A": (xs[ys < 5], ys[ys < 5]), "B": (xs[ys >= 5], ys[ys >= 5])}
    return out


def finetune(model: nn.Module, data: Data, *, steps: int) -> nn.Module:
    """A copy of ``model`` trained ``steps`` full-batch Adam steps on ``data`` (the original is untouched)."""
    tuned = copy.deepcopy(model).train()
    opt = torch.optim.Adam(tuned.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(tuned(data[0]), data[1]).backward()
        opt.step()
    return tuned.eval()


def params_of(model: nn.Module) -> dict[str, Tensor]:
    """``{name: tensor}`` of a model's parameters, detached."""
    return {k: v.detach() for k, v in model.named_parameters()}


def run(seed: int, *, start_steps: int = 20, finetune_steps: int = 200) -> dict[str, dict[str, float]]:
    """One seed: ``{row: {"A": accuracy, "B": accuracy, "mean": their mean}}`` on the test split.

    Also ``"fine-tunes"``: each fine-tune's training loss on its task (``"A"``, ``"B"``) and the L2 norm
    of its diagonal Fisher over the merged body (``"fisher A"``, ``"fisher B"``).
    """
    data = split(seed)
    start, _ = train(*data["train"]["all"], seed=seed, steps=start_steps)
    tuned = [finetune(start, data["train"][t], steps=finetune_steps) for t in "AB"]
    models = [params_of(m) for m in tuned]
    heads = [{k: v for k, v in p.items() if k.startswith("4.")} for p in models]

    def accuracy(params: dict[str, Tensor], task: Data) -> float:
        with torch.no_grad():
            return float((torch.func.functional_call(start, params, (task[0],)).argmax(1) == task[1]).double().mean())

    def both(body: dict[str, Tensor], where: str) -> tuple[float, float]:
        """Task A through head A, task B through head B, on ``body``."""
        a, b = (accuracy({**body, **heads[i]}, data[where][t]) for i, t in enumerate("AB"))
        return a, b

    def val_score(body: dict[str, Tensor]) -> float:
        return sum(both(body, "val")) / 2

    fisher: dict[str, list[Any]] = {"diagonal": [], "channel": []}
    for model, params, t in zip(tuned, models, "AB"):
        loss = ff.losses.classification(model)
        batch = data["train"][t]
        fisher["diagonal"].append(ff.fisher(loss, params, batch, spec=ff.Elementwise(), kind="exact"))
        fisher["channel"].append(ff.fisher(loss, params, batch, spec=ff.infer_spec(model), kind="exact"))

    merges: dict[str, Callable[[], Any]] = {
        "plain average": lambda: fm.merge_models(models, None, exclude=HEAD),
        "plain average, λ searched": lambda: fm.search_coefficients(models, None, val_score, exclude=HEAD).params,
        "Fisher, diagonal, normalize=None": lambda: fm.merge_models(
            models, fisher["diagonal"], exclude=HEAD, normalize=None
        ),
        "Fisher, diagonal (default: L2-normalised)": lambda: fm.merge_models(models, fisher["diagonal"], exclude=HEAD),
        "Fisher, per channel, spread": lambda: fm.merge_models(
            models, fisher["channel"], spec=ff.infer_spec(start), exclude=HEAD
        ),
        "Fisher, diagonal, λ searched": lambda: (
            fm.search_coefficients(models, fisher["diagonal"], val_score, exclude=HEAD).params
        ),
    }
    own = params_of(start)
    results = {
        "shared start (its own head)": (accuracy(own, data["test"]["A"]), accuracy(own, data["test"]["B"])),
        "fine-tuned on A": both(models[0], "test"),
        "fine-tuned on B": both(models[1], "test"),
    }
    results.update({row: both(merge(), "test") for row, merge in merges.items()})
    out = {row: {"A": a, "B": b, "mean": (a + b) / 2} for row, (a, b) in results.items()}
    with torch.no_grad():
        losses = [
            float(nn.functional.cross_entropy(m(data["train"][t][0]), data["train"][t][1])) for m, t in zip(tuned, "AB")
        ]
    norms = [
        float(torch.cat([v.reshape(-1) for k, v in f.items() if k[:2] != "4."]).norm()) for f in fisher["diagonal"]
    ]
    out["fine-tunes"] = {"A": losses[0], "B": losses[1], "fisher A": norms[0], "fisher B": norms[1]}
    return out


def table(runs: list[dict[str, dict[str, float]]]) -> str:
    """The markdown table: each row's accuracies averaged over the seeds, and the range of its mean."""
    lines = [
        f"| body (each task read through its own head) | task A (0–4) | task B (5–9) | mean | "
        f"mean: min–max over {len(runs)} seeds |",
        "|---|---|---|---|---|",
    ]
    for row in ROWS:
        a, b, mean = (torch.tensor([r[row][k] for r in runs], dtype=torch.float64) for k in ("A", "B", "mean"))
        lines.append(
            f"| {row} | {a.mean():.3f} | {b.mean():.3f} | {mean.mean():.3f} | {mean.min():.3f}–{mean.max():.3f} |"
        )
    return "\n".join(lines)


def main(*, seeds: int = 8) -> dict[str, Any]:
    """Run ``seeds`` seeds, print the table and return ``{"runs": [per seed], "table": markdown}``."""
    runs = [run(seed) for seed in range(seeds)]
    text = table(runs)
    print(text)
    return {"runs": runs, "table": text}


if __name__ == "__main__":
    main()
