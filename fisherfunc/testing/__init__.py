"""Test cases, hypothesis strategies and invariant checks for Fisher computations on your own models.

:mod:`~fisherfunc.testing.cases` is one seeded registry of named test cases (a model, its
per-sample loss, params, batches and a spec: ``cases.case("mlp", seed=0)``);
:mod:`~fisherfunc.testing.strategies` draws group rules for a shape, specs for a params tree,
padded token batches and the registry's hypothesis families; :mod:`~fisherfunc.testing.invariants`
checks the algebraic properties every Fisher computation must satisfy (conservation, token,
permutation and chunk invariance, split additivity, EMA of a constant, purity of ``fisher_step``).
Importing this module needs ``hypothesis`` (``pip install fisherfunc[test]``).
"""

from . import cases as cases
from . import invariants as invariants
from . import strategies as strategies
from .cases import Case as Case
from .cases import case as case
from .cases import names as names
from .cases import register as register
from .invariants import assert_fisher_close as assert_fisher_close
from .invariants import check_all as check_all
from .invariants import check_chunk_invariance as check_chunk_invariance
from .invariants import check_conservation as check_conservation
from .invariants import check_decay_zero as check_decay_zero
from .invariants import check_ema_constant as check_ema_constant
from .invariants import check_paths_agree as check_paths_agree
from .invariants import check_per_sample_consistency as check_per_sample_consistency
from .invariants import check_permutation_invariance as check_permutation_invariance
from .invariants import check_pure_step as check_pure_step
from .invariants import check_split_additivity as check_split_additivity
from .invariants import check_token_invariance as check_token_invariance
from .strategies import model_cases as model_cases
from .strategies import padded_batches as padded_batches
from .strategies import rules as rules
from .strategies import specs as specs

__all__ = [
    "Case",
    "assert_fisher_close",
    "case",
    "cases",
    "check_all",
    "check_chunk_invariance",
    "check_conservation",
    "check_decay_zero",
    "check_ema_constant",
    "check_paths_agree",
    "check_per_sample_consistency",
    "check_permutation_invariance",
    "check_pure_step",
    "check_split_additivity",
    "check_token_invariance",
    "invariants",
    "model_cases",
    "names",
    "padded_batches",
    "register",
    "rules",
    "specs",
    "strategies",
]
