"""Fisher-guided perturbations: which groups to perturb, with how much energy, and the predicted damage.

Pure functions of (group Fisher, spec, params, generator); the equations are in ``_plan``'s module
documentation (selection by Gumbel-top-k over densities ``f_g = F_g / n_g``, energy allocation,
the perturbation itself, the predicted loss increase ``E[ΔL̂] = ½ Σ_g e_g f_g`` and the stressed
fraction), the sampling in ``_selection``.

>>> import torch, fisherfunc as ff
>>> model = torch.nn.Linear(6, 4)
>>> params = {name: p.detach() for name, p in model.named_parameters()}
>>> batch = (torch.randn(16, 6), torch.randint(0, 4, (16,)))
>>> F = ff.fisher(ff.losses.classification(model), params, batch, kind="exact")
>>> g = torch.Generator().manual_seed(0)
>>> plan = ff.perturb.plan(F, ff.Channel(0), params, concentration=0.5, energy=1e-2, generator=g)
>>> new_params, record = ff.perturb.perturb(params, plan, generator=torch.Generator().manual_seed(1))
>>> delta = {name: new_params[name] - params[name] for name in params}
>>> round(sum(float(d.square().sum()) for d in delta.values()), 6)   # ‖δ‖² = E
0.01
>>> ff.perturb.risk(plan).stressed_fraction <= 1.0
True
"""

from ._plan import Plan as Plan
from ._plan import Record as Record
from ._plan import Risk as Risk
from ._plan import delta as delta
from ._plan import density as density
from ._plan import expected_increase as expected_increase
from ._plan import perturb as perturb
from ._plan import plan as plan
from ._plan import predicted_increase as predicted_increase
from ._plan import replay as replay
from ._plan import risk as risk
from ._selection import allocate as allocate
from ._selection import select as select

__all__ = [
    "Plan",
    "Record",
    "Risk",
    "allocate",
    "delta",
    "density",
    "expected_increase",
    "perturb",
    "plan",
    "predicted_increase",
    "replay",
    "risk",
    "select",
]
