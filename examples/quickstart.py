"""Per-channel Fisher of a small classifier, collected with ``fisher_step`` over a data stream.

Runs offline in seconds on a CPU: trains a 2-hidden-layer MLP on a synthetic 10-class problem,
then folds 20 batches into an EMA of per-channel empirical Fisher and prints the most and least
important hidden units, with the one-shot estimate over the same data for comparison.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch import nn

import fisherfunc as ff


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10-class problem: Gaussian blobs in 20 dimensions, 5 of them informative."""
    centres = torch.randn(10, 5, generator=generator) * 1.2
    y = torch.randint(0, 10, (n,), generator=generator)
    x = torch.randn(n, 20, generator=generator)
    x[:, :5] += centres[y]
    return x, y


def main() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = make_data(2048, g)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    accuracy = (model(x).argmax(1) == y).float().mean().item()

    # --- the library loop -----------------------------------------------------------------------
    loss = ff.losses.classification(model)  # batch = (inputs, labels)
    params = {k: v.detach() for k, v in model.named_parameters()}
    fisher_step = ff.make_fisher_step(loss, decay=0.9)  # spec inferred: one value per channel
    state = fisher_step.init(params)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1280, 64)]
    for batch in batches:
        state = fisher_step(params, batch, state)
    F = ff.estimate(state)  # bias-corrected EMA
    one_shot = ff.fisher(loss, params, batches)  # Σ over all samples / Σ tokens

    print(f"trained MLP: accuracy {accuracy:.3f}; {state.step} steps, {state.samples} samples")
    for name in ("0.weight", "2.weight"):
        order = torch.argsort(F[name], descending=True)
        print(f"\nper-channel Fisher of layer '{name}' (output units), EMA vs one-shot:")
        print("  rank  unit        EMA   one-shot")
        for rank, unit in enumerate(order.tolist()):
            if rank < 5 or rank >= len(order) - 3:
                print(f"  {rank + 1:4d}  {unit:4d}  {F[name][unit]:9.3e}  {one_shot[name][unit]:9.3e}")
            elif rank == 5:
                print("   ...")
    keyed = ff.to_keyed(state, task="blobs")
    print(f"\n{len(keyed)} keyed tensors, e.g. {next(iter(keyed))!r}")


if __name__ == "__main__":
    main()
