"""fisherfunc: Fisher information of PyTorch models as pure functions over pytrees.

Per-sample gradients come from ``torch.func.vmap(torch.func.grad(...))``; they are squared and
summed into groups (channels, heads, token rows...) described by a spec pytree, inside the
vectorised computation. Running estimates live in immutable :class:`FisherState` tuples.
No module hooks, no hidden mutation.

This module only re-exports; the layers underneath, in the order a batch flows through them
(``docs/architecture.md``):

- ``_spec``: group rules and their geometry, spec resolution, the group numbering, ``infer_spec``
  and the model families' layouts;
- ``_engine``: batches, numerics, the one probe mechanism, the vectorised per-sample gradient,
  group sums (direct and factorised paths), Fisher kinds, the non-finite policy, the one chunk loop;
- ``_estimate``: one-shot estimates (``fisher``, ``accumulate``, ``per_sample_fisher``);
- ``_state``: states, the EMA, the step, storage codec, keys, merging and files.

Public modules on top: :mod:`~fisherfunc.losses`, :mod:`~fisherfunc.heads`, :mod:`~fisherfunc.dropout`,
:mod:`~fisherfunc.storage`, :mod:`~fisherfunc.distributed`, :mod:`~fisherfunc.plot`; the uses
:mod:`~fisherfunc.merging`, :mod:`~fisherfunc.ewc`, :mod:`~fisherfunc.compat`, :mod:`~fisherfunc.perturb`,
:mod:`~fisherfunc.kfac`, :mod:`~fisherfunc.hf`, :mod:`~fisherfunc.testing` and the command :mod:`~fisherfunc.cli`.
"""

from . import compat as compat
from . import distributed as distributed
from . import dropout as dropout
from . import ewc as ewc
from . import hf as hf
from . import kfac as kfac
from . import losses as losses
from . import merging as merging
from . import perturb as perturb
from . import plot as plot
from . import storage as storage
from ._engine.batches import BatchError as BatchError
from ._engine.budget import BudgetError as BudgetError
from ._engine.kinds import MC as MC
from ._engine.kinds import Empirical as Empirical
from ._engine.kinds import Exact as Exact
from ._engine.kinds import FisherKind as FisherKind
from ._engine.nonfinite import NonFiniteError as NonFiniteError
from ._estimate import Accumulator as Accumulator
from ._estimate import PerSampleFisher as PerSampleFisher
from ._estimate import accumulate as accumulate
from ._estimate import fisher as fisher
from ._estimate import per_sample_fisher as per_sample_fisher
from ._spec.experts import ExpertChannels as ExpertChannels
from ._spec.families import HeadLayoutWarning as HeadLayoutWarning
from ._spec.infer import infer_spec as infer_spec
from ._spec.recurrent import Units as Units
from ._spec.rules import Buckets as Buckets
from ._spec.rules import Channel as Channel
from ._spec.rules import Elementwise as Elementwise
from ._spec.rules import Heads as Heads
from ._spec.rules import Rows as Rows
from ._spec.rules import Rule as Rule
from ._spec.rules import Skip as Skip
from ._spec.rules import SpecError as SpecError
from ._spec.rules import Whole as Whole
from ._state.files import StateFileError as StateFileError
from ._state.files import load as load
from ._state.files import save as save
from ._state.keys import from_keyed as from_keyed
from ._state.keys import to_keyed as to_keyed
from ._state.merge import merge as merge
from ._state.state import FisherState as FisherState
from ._state.state import clear as clear
from ._state.state import estimate as estimate
from ._state.state import init_state as init_state
from ._state.state import metadata as metadata
from ._state.step import FisherStep as FisherStep
from ._state.step import make_fisher_step as make_fisher_step
from ._version import __version__ as __version__
from .heads import HeadImportance as HeadImportance
from .heads import head_importance as head_importance

__all__ = [
    "MC",
    "Accumulator",
    "BatchError",
    "BudgetError",
    "Buckets",
    "Channel",
    "Elementwise",
    "Empirical",
    "Exact",
    "ExpertChannels",
    "FisherKind",
    "FisherState",
    "FisherStep",
    "HeadImportance",
    "HeadLayoutWarning",
    "Heads",
    "NonFiniteError",
    "PerSampleFisher",
    "Rows",
    "Rule",
    "Skip",
    "SpecError",
    "StateFileError",
    "Units",
    "Whole",
    "accumulate",
    "clear",
    "compat",
    "distributed",
    "dropout",
    "estimate",
    "ewc",
    "fisher",
    "from_keyed",
    "head_importance",
    "hf",
    "infer_spec",
    "init_state",
    "kfac",
    "load",
    "losses",
    "make_fisher_step",
    "merge",
    "merging",
    "metadata",
    "per_sample_fisher",
    "perturb",
    "plot",
    "save",
    "storage",
    "to_keyed",
]
