"""The ``fisherfunc`` command: collect group Fisher of a model, print the ranking, save the state and plots.

    fisherfunc                                   # built-in default: digits MLP, per-channel Fisher
    fisherfunc --model ./gpt2 --text corpus.txt  # a local Hugging Face causal LM, per-head Fisher
    fisherfunc --entry mypkg.jobs:make_job       # anything else: returns (model, loss, batches)

``fisherfunc --help`` lists the options; ``python -m fisherfunc`` is the same command.
:mod:`~fisherfunc.cli.demo` is the built-in job (a digits MLP), also used by the per-sample notebook.
"""

from . import demo as demo
from ._command import UsageError as UsageError
from ._command import main as main
from ._command import parse_args as parse_args
from ._command import rank_groups as rank_groups

__all__ = ["UsageError", "demo", "main", "parse_args", "rank_groups"]
