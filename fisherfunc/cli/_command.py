"""The ``fisherfunc`` command: collect group Fisher of a model, print the ranking, save the state and plots.

    fisherfunc                                   # built-in default: digits MLP, per-channel Fisher
    fisherfunc --model ./gpt2 --text corpus.txt  # a local Hugging Face causal LM, per-head Fisher
    fisherfunc --entry mypkg.jobs:make_job       # anything else: returns (model, loss, batches)
    fisherfunc --model ./llama --text corpus.txt --dtype bfloat16 --max-memory 20GiB   # at scale

Each run folds the batches into a :class:`~fisherfunc.FisherState` with
:func:`~fisherfunc.make_fisher_step` (progress on stderr), prints the most and least important
groups of the bias-corrected estimate to stdout, and writes to ``--out``: ``fisher.safetensors``
(:func:`~fisherfunc.save`, under the ``--task`` name) and PNG plots. ``fisherfunc.load`` of that file
gives back the printed numbers. Bad arguments end with a one-line error on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import optree
import torch

from .._engine.budget import BudgetError, parse_bytes
from .._engine.kinds import KIND_NAMES, MC, FisherKind, as_kind
from .._estimate import per_sample_fisher
from .._spec.infer import infer_spec
from .._spec.rules import Heads, SpecError, is_rule
from .._state.files import save
from .._state.keys import SEPARATOR, to_keyed
from .._state.state import FisherState
from .._state.step import make_fisher_step
from ..heads import HeadImportance, head_importance
from ._hf import JobError, hf_job
from ._progress import Progress, total_tokens
from ._report import heads_table, write_heads_csv

__all__ = ["main", "UsageError", "parse_args", "rank_groups"]

STATE_FILE = "fisher.safetensors"

#: ``--dtype`` values: the dtype the model is loaded in (float32: the exact float32 policy; the others:
#: forward and backward in that dtype, ``precision="model"``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """A bad argument or input, reported as one line on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see fisherfunc --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fisherfunc",
        description=(
            "Collect exact group Fisher information (per channel, per attention head) of a PyTorch model "
            "with fisherfunc.make_fisher_step, print the most and least important groups, and save the state "
            "(safetensors + JSON metadata) and PNG plots. With no arguments: a small MLP trained on "
            "scikit-learn's digits, offline, in seconds."
        ),
        epilog=(
            "Files: OUT/fisher.safetensors (load with fisherfunc.load(path, params, task=TASK)), "
            "OUT/channels.png, OUT/heads.png (models with attention heads), OUT/per_sample.png. "
            "Errors in the arguments exit with code 2."
        ),
    )
    source = p.add_argument_group("what to measure (default: the built-in digits MLP)")
    source.add_argument(
        "--model", metavar="DIR", help="a local Hugging Face checkpoint directory (a causal or a masked LM)"
    )
    source.add_argument("--text", metavar="FILE", help="with --model: a UTF-8 text file, one example per line")
    source.add_argument(
        "--entry",
        metavar="MODULE:FUNCTION",
        help="a function (called with no arguments) returning (model, loss, batches); loss as in fisherfunc.losses",
    )
    opts = p.add_argument_group("collection")
    opts.add_argument("--task", default=None, help="task name the state is saved under (default: the job's name)")
    opts.add_argument(
        "--kind",
        default="empirical",
        choices=list(KIND_NAMES),
        help="empirical: dataset labels; mc: labels sampled from the model; exact: all classes (default: empirical)",
    )
    opts.add_argument(
        "--decay", type=float, default=0.9, help="EMA decay in [0, 1); 0 = last batch only (default: 0.9)"
    )
    opts.add_argument("--batch-size", type=_positive, default=None, help="samples per batch (default: 64, HF: 8)")
    opts.add_argument("--max-batches", type=_positive, default=None, help="fold in at most this many batches")
    opts.add_argument("--max-length", type=_positive, default=128, help="with --model: tokens per line (default: 128)")
    opts.add_argument(
        "--objective",
        default="auto",
        choices=["auto", "causal", "masked"],
        help="with --model: next-token (causal) or masked-token prediction (masked, 15%% of the tokens masked with "
        "--seed); auto: masked when the checkpoint's architecture is a ...ForMaskedLM (default: auto)",
    )
    opts.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    opts.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="the dtype the model is loaded in (default: float32 for --model, an --entry model's own); float32 "
        "computes in float32 (exact); bfloat16/float16 run forward and backward in that dtype, with squares, sums "
        'and state in float32 (precision="model")',
    )
    opts.add_argument(
        "--chunk-size",
        type=_positive,
        default=None,
        help="samples per vectorised chunk (default: a whole batch, or what --max-memory allows)",
    )
    opts.add_argument(
        "--max-memory",
        metavar="BYTES",
        default=None,
        help="peak memory budget of each step, e.g. 8GiB or 500MB: picks the chunk size (see docs/scale.md)",
    )
    opts.add_argument("--seed", type=int, default=0, help="seed for training, shuffling and mc labels (default: 0)")
    output = p.add_argument_group("output")
    output.add_argument("--out", default="fisherfunc-out", help="output folder (default: ./fisherfunc-out)")
    output.add_argument("--top", type=_positive, default=10, help="rows in each half of the table (default: 10)")
    output.add_argument("--no-plots", action="store_true", help="write no PNGs (matplotlib not needed)")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (exits with code 2 and one line on stderr for bad arguments)."""
    args = _parser().parse_args(argv)
    if args.text is not None and args.model is None:
        raise UsageError("--text needs --model DIR (a Hugging Face checkpoint directory)")
    if args.model is not None and args.text is None:
        raise UsageError("--model needs --text FILE (the text to measure the model on)")
    if args.model is not None and args.entry is not None:
        raise UsageError("use either --model or --entry, not both")
    if not 0.0 <= args.decay < 1.0:
        raise UsageError(f"--decay must be in [0, 1), got {args.decay}")
    if args.max_memory is not None:
        try:
            parse_bytes(args.max_memory, "--max-memory")
        except BudgetError as err:
            raise UsageError(str(err)) from None
    if args.dtype == "float16":  # the engine's precision="model" refuses float16 (fisherfunc._engine.numerics)
        raise UsageError(
            "--dtype float16 is refused: float16 gradients below 6e-8 flush to zero and their Fisher would be "
            "silently lost; use --dtype bfloat16 (same memory, float32's range) or float32"
        )
    return args


def _check_out(folder: Path) -> None:
    """Create ``folder`` and check that files can be written there, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fisherfunc-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to the output folder {str(folder)!r}: {err.strerror or err}") from None


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as err:  # CPU-only torch asserts on "cuda"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--device {name!r} is not usable here: {first}") from None
    return device


# --- jobs -------------------------------------------------------------------------------------------


def _default_job(args: argparse.Namespace) -> tuple[Any, Any, list[Any], str, str]:
    from . import demo

    try:
        job = demo.build(seed=args.seed, batch_size=args.batch_size or 64)
    except ImportError as err:
        raise UsageError(str(err)) from None
    return job.model, job.loss, job.batches, job.description, "digits"


def _entry_job(args: argparse.Namespace) -> tuple[Any, Any, list[Any], str, str]:
    module_name, sep, function_name = args.entry.partition(":")
    if not sep or not module_name or not function_name:
        raise UsageError(f"--entry {args.entry!r} must look like module:function")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import failure of user code is a bad argument
        raise UsageError(
            f"--entry {args.entry!r}: cannot import {module_name!r}: {type(err).__name__}: {err}"
        ) from None
    finally:
        sys.path.remove(os.getcwd())
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"--entry {args.entry!r}: module {module_name!r} has no function {function_name!r}")
    result = function()
    if not (isinstance(result, tuple | list) and len(result) == 3 and isinstance(result[0], torch.nn.Module)):
        raise UsageError(f"--entry {args.entry!r} must return (model, loss, batches) with an nn.Module model")
    model, loss, batches = result
    return model, loss, list(batches), f"{type(model).__name__} from {args.entry}", function_name


# --- collection and reporting -----------------------------------------------------------------------


def _to_device(batch: Any, device: torch.device) -> Any:
    return optree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def rank_groups(keyed: dict[str, torch.Tensor], group_type: str) -> list[tuple[str, str, float]]:
    """All groups of one type as ``(parameter, index, value)``, most important first.

    ``index`` is the group's position in its tensor, ``"3"`` or ``"1,3"`` for ``[parts, heads]``.
    """
    rows = []
    for key, value in keyed.items():
        _, name, kind = key.split(SEPARATOR)
        if kind != group_type:
            continue
        flat = value.detach().float().cpu()
        for index in torch.cartesian_prod(*[torch.arange(n) for n in flat.shape]).reshape(flat.numel(), -1).tolist():
            rows.append((name, ",".join(map(str, index)), flat[tuple(index)].item()))
    return sorted(rows, key=lambda row: -row[2])


def _table(rows: list[tuple[str, str, float]], top: int, group_type: str) -> str:
    width = max([len("parameter")] + [len(r[0]) for r in rows])
    head = f"  {'rank':>4}  {'parameter':<{width}}  {group_type:>7}  {'Fisher':>11}"
    lines = [head]
    for rank, row in enumerate(rows, 1):
        if rank <= top or rank > len(rows) - top:
            lines.append(f"  {rank:4d}  {row[0]:<{width}}  {row[1]:>7}  {row[2]:11.4e}")
        elif rank == top + 1:
            lines.append(f"  {'...':>4}")
    return "\n".join(lines)


def _plots(state: FisherState, job: tuple[Any, ...], params: Any, spec: Any, args: argparse.Namespace) -> list[Path]:
    from .. import plot

    model, loss, batches = job[:3]
    out = Path(args.out)
    figures = plot.figures_for_state(state, model=model)
    ps = per_sample_fisher(loss, params, _to_device(batches[0], params_device(params)), spec=spec, kind=_kind(args))
    figures["per_sample"] = plot.per_sample_distribution(
        ps, title=f"Per-sample Fisher, first batch of {type(model).__name__}"
    )
    written = []
    import matplotlib.pyplot as plt

    for stem, fig in figures.items():
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``chunk_size``, ``max_memory`` and ``precision`` for the engine, as the command line sets them."""
    options: dict[str, Any] = {"chunk_size": args.chunk_size}
    if args.max_memory is not None:
        options["max_memory"] = args.max_memory
    if args.dtype not in (None, "float32"):
        options["precision"] = "model"
    return options


def _options_text(args: argparse.Namespace) -> str:
    """The options a configuration error may come from, as typed (for the one-line error)."""
    words = [f"--kind {args.kind}"] + [f"--dtype {args.dtype}"] * (args.dtype is not None)
    words += [f"--chunk-size {args.chunk_size}"] * (args.chunk_size is not None)
    words += [f"--max-memory {args.max_memory}"] * (args.max_memory is not None)
    return ", ".join(words)


def _kind(args: argparse.Namespace) -> FisherKind:
    """The ``--kind`` as a kind value (``mc`` draws from ``--seed``)."""
    return MC(seed=args.seed) if args.kind == MC.name else as_kind(args.kind)


def _dtype_of(params: Any) -> str:
    """The first floating parameter's dtype, as ``--dtype`` spells it."""
    floating = [t for t in optree.tree_leaves(params) if t.is_floating_point()]
    return str(floating[0].dtype).removeprefix("torch.") if floating else "no floating parameters"


def params_device(params: Any) -> torch.device:
    """The device of the first parameter."""
    return optree.tree_leaves(params)[0].device


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line (see the module docstring); returns the exit code."""
    out = Path(args.out)
    _check_out(out)
    device = _device(args.device)
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise UsageError('saving the state needs safetensors: pip install "fisherfunc[io]"') from None
    if not args.no_plots:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            raise UsageError('plots need matplotlib: pip install "fisherfunc[plot]" (or pass --no-plots)') from None
    start = time.perf_counter()
    if args.entry is not None:
        job = _entry_job(args)
    elif args.model is not None:
        try:
            job = hf_job(args)
        except JobError as err:
            raise UsageError(str(err)) from None
    else:
        job = _default_job(args)
    model, loss, batches, description, default_task = job
    task = args.task or default_task
    if SEPARATOR in task:
        raise UsageError(f"--task {task!r} must not contain {SEPARATOR!r}")
    model.to(device=device, dtype=DTYPES[args.dtype] if args.dtype else None)
    batches = batches[: args.max_batches] if args.max_batches else batches
    if not batches:
        raise UsageError("the job has no batches")
    params = {k: v.detach() for k, v in model.named_parameters()}
    try:
        spec = infer_spec(model)
    except SpecError as err:
        raise UsageError(f"cannot group this model's parameters: {str(err).splitlines()[0]}") from None
    try:
        fisher_step = make_fisher_step(loss, spec=spec, decay=args.decay, kind=_kind(args), **_engine_options(args))
    except (ValueError, TypeError) as err:
        raise UsageError(f"{_options_text(args)}: {err}") from None
    print(description)
    state = fisher_step.init(params)
    collect_start = time.perf_counter()
    tokens = total_tokens(loss, batches)
    progress = Progress(tokens or len(batches), "batches" if tokens is None else "tokens", f"Fisher ({args.kind})")
    for batch in batches:
        try:
            new = fisher_step(params, _to_device(batch, device), state)
        except BudgetError as err:  # one sample does not fit the budget: said after measuring it
            raise UsageError(f"--max-memory {args.max_memory}: {err}") from None
        progress.advance(1 if tokens is None else new.tokens - state.tokens)
        state = new
    progress.close()
    seconds = time.perf_counter() - collect_start

    heads = _heads(state, model)
    path = save(out / STATE_FILE, {task: state}, params=params)
    written = [path]
    summary = (
        f"\n{args.kind} Fisher per token, bias-corrected EMA (decay {args.decay}) over {state.step} batches, "
        f"{state.samples} samples, {state.tokens:g} tokens, model in {_dtype_of(params)}; "
    )
    if heads is not None:
        grouped = heads.kv_heads != heads.heads
        shape = f"{len(heads.layers)} layers × {heads.heads} heads" + (f", {heads.kv_heads} key-value heads" * grouped)
        print(summary + f"{heads.matrix.numel()} attention heads ({shape}), most and least important:")
        print(heads_table(heads, args.top))
        if grouped:
            print(
                f"(grouped-query attention: each key-value head's K and V Fisher is shared by the "
                f"{heads.heads // heads.kv_heads} query heads that read it; fisherfunc.head_importance(...).kv_groups "
                "has the groups)"
            )
        written.append(write_heads_csv(heads, out / "heads.csv"))
    else:
        _print_groups(state, task, args, summary)
    if not args.no_plots:
        written += _plots(state, job, params, spec, args)
    print(f"\nwrote {len(written)} files to {out}/ ({time.perf_counter() - start:.1f} s, Fisher {seconds:.1f} s):")
    for p in written:
        print(f"  {p}")
    print(f"load with: fisherfunc.load({str(path)!r}, params, task={task!r})")
    return 0


def _heads(state: FisherState, model: Any) -> HeadImportance | None:
    """The self-attention head importance of ``model``, or ``None`` if it has no head-grouped attention."""
    try:
        return head_importance(state, model)
    except ValueError:
        return None


def _print_groups(state: FisherState, task: str, args: argparse.Namespace, summary: str) -> None:
    """The ranked table of (parameter, group) pairs, for models without attention heads."""
    keyed = to_keyed(state, task=task)
    rule_leaves = optree.tree_leaves(state.spec, is_leaf=is_rule)
    group_type = "head" if any(isinstance(r, Heads) for r in rule_leaves) else "channel"
    rows = rank_groups(keyed, group_type)
    weights = [row for row in rows if row[0].endswith("weight")]
    rows = weights or rows  # a unit's bias Fisher is a small part of its weights': rank the weights
    zeros = sum(row[2] == 0 for row in rows)
    print(summary + f"{len(rows)} {group_type}s of weights, most and least important:")
    print(_table(rows, args.top, group_type))
    if any("," in row[1] for row in rows):
        print("(a head index p,h is part p of a fused projection, 0 = Q, 1 = K, 2 = V, of head h)")
    if zeros:
        print(
            f"{zeros} {group_type}s have zero Fisher: the loss does not depend on them on this data (e.g. dead ReLUs)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherfunc`` console script and ``python -m fisherfunc``."""
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except UsageError as err:
        print(f"fisherfunc: error: {err}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except UsageError as err:
        print(f"fisherfunc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fisherfunc: interrupted", file=sys.stderr)
        return 130
