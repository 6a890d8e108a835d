"""fisherfunc: Fisher information of PyTorch models as pure functions over pytrees.

Per-sample gradients come from ``torch.func.vmap(torch.func.grad(...))``; they are squared and
summed into groups (channels, heads, token rows...) described by a spec pytree, inside the
vectorised computation. Running estimates live in immutable :class:`FisherState` tuples.
No module hooks, no hidden mutation.

Reading order: :mod:`~fisherfunc.losses` (per-sample losses) → :mod:`~fisherfunc.rules` and
:mod:`~fisherfunc.spec` (groups) → :mod:`~fisherfunc.per_sample` (the vectorised engine) →
:mod:`~fisherfunc.estimate` (one-shot) → :mod:`~fisherfunc.state` and :mod:`~fisherfunc.step`
(EMA) → :mod:`~fisherfunc.keys` (flat keys). :mod:`~fisherfunc.kinds` says which targets the
gradients are taken at: the dataset's labels, labels sampled from the model, or all classes.
States that survive: :mod:`~fisherfunc.storage` (dtype and device of a state, with
:mod:`~fisherfunc.codec`), :mod:`~fisherfunc.io` (``save``/``load``), :mod:`~fisherfunc.merge`,
:mod:`~fisherfunc.distributed` (data-parallel) and :mod:`~fisherfunc.nonfinite` (NaN/Inf batches).
Uses: :mod:`~fisherfunc.perturb` (Fisher-guided perturbations and their predicted damage, on the
group numbering of :mod:`~fisherfunc.membership`, choosing groups with :mod:`~fisherfunc.selection`).
Beyond the diagonal: :mod:`~fisherfunc.kfac` (K-FAC and EK-FAC from the same probes).
Pictures: :mod:`~fisherfunc.plot` (matplotlib, optional); the ``fisherfunc`` command: :mod:`~fisherfunc.cli`.
"""

from . import distributed as distributed
from . import dropout as dropout
from . import hf as hf
from . import kfac as kfac
from . import losses as losses
from . import perturb as perturb
from . import plot as plot
from . import storage as storage
from .batch import BatchError as BatchError
from .estimate import Accumulator as Accumulator
from .estimate import PerSampleFisher as PerSampleFisher
from .estimate import accumulate as accumulate
from .estimate import fisher as fisher
from .estimate import per_sample_fisher as per_sample_fisher
from .infer import infer_spec as infer_spec
from .io import StateFileError as StateFileError
from .io import load as load
from .io import save as save
from .keys import from_keyed as from_keyed
from .keys import to_keyed as to_keyed
from .kinds import FisherKind as FisherKind
from .merge import merge as merge
from .nonfinite import NonFiniteError as NonFiniteError
from .rules import Buckets as Buckets
from .rules import Channel as Channel
from .rules import Elementwise as Elementwise
from .rules import Heads as Heads
from .rules import Rows as Rows
from .rules import Rule as Rule
from .rules import Skip as Skip
from .rules import SpecError as SpecError
from .rules import Whole as Whole
from .state import FisherState as FisherState
from .state import clear as clear
from .state import estimate as estimate
from .state import init_state as init_state
from .state import metadata as metadata
from .step import FisherStep as FisherStep
from .step import make_fisher_step as make_fisher_step

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "BatchError",
    "Buckets",
    "Channel",
    "Elementwise",
    "FisherKind",
    "FisherState",
    "FisherStep",
    "Heads",
    "NonFiniteError",
    "PerSampleFisher",
    "Rows",
    "Rule",
    "Skip",
    "SpecError",
    "StateFileError",
    "Whole",
    "accumulate",
    "clear",
    "distributed",
    "dropout",
    "estimate",
    "fisher",
    "from_keyed",
    "hf",
    "infer_spec",
    "kfac",
    "init_state",
    "load",
    "losses",
    "make_fisher_step",
    "merge",
    "metadata",
    "per_sample_fisher",
    "perturb",
    "plot",
    "save",
    "storage",
    "to_keyed",
]
