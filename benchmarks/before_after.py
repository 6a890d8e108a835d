"""Compare two source trees of fisherfunc with ``benchmarks/run.py``, interleaved, in one run.

Each round runs every tree's own ``benchmarks/run.py`` (so an older tree uses the benchmark as it
was) in a fresh process with that tree first on ``PYTHONPATH``, alternating the order from round to
round so that machine drift hits both alike. Per workload and method, the table reports the median
over rounds of the time ratio to a plain forward+backward measured in the same process (the
number ``run.py`` reports), and of the milliseconds.

    python benchmarks/before_after.py --trees before=../old-checkout after=. --rounds 3 \\
        --workloads mlp cnn transformer encoder gpt2 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROW = re.compile(r"^\| (?P<workload>[^|]+) \| (?P<method>[^|]+) \| (?P<ms>[\d.]+) \| (?P<ratio>[\d.]+)× \|")


def run_tree(
    root: Path, workloads: list[str], repeats: int, threads: int | None
) -> dict[tuple[str, str], tuple[float, float]]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(root / "benchmarks" / "run.py"), "--workloads", *workloads, "--repeats", str(repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=root).stdout
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            rows[(m["workload"].strip(), m["method"].strip())] = (float(m["ms"]), float(m["ratio"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", required=True, help="name=path pairs, e.g. before=../old after=.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "transformer", "encoder"])
    args = parser.parse_args()
    trees = [(name, Path(path).resolve()) for name, path in (t.split("=", 1) for t in args.trees)]
    results: dict[str, list[dict[tuple[str, str], tuple[float, float]]]] = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for name, root in order:
            print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            results[name].append(run_tree(root, args.workloads, args.repeats, args.threads))
    keys = [k for k in results[trees[0][0]][0] if all(k in rounds[0] for rounds in results.values())]
    print(
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.rounds} rounds × {args.repeats} repeats, workloads {' '.join(args.workloads)}\n"
    )
    head = " | ".join(f"{name} × fwd+bwd | {name} ms" for name, _ in trees)
    print(f"| workload | method | {head} |")
    print("|---|---|" + "---|---|" * len(trees))
    for key in keys:
        cells = []
        for name, _ in trees:
            ratios = [rounds[key][1] for rounds in results[name] if key in rounds]
            ms = [rounds[key][0] for rounds in results[name] if key in rounds]
            cells.append(f"{statistics.median(ratios):.2f}× | {statistics.median(ms):.1f}")
        print(f"| {key[0]} | {key[1]} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
