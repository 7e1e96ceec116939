"""One entry per whole-tensor merge method: name -> `merger(xs, base, params, shared,
generators)`, the function `plan.compute_whole` calls for every output tensor of that method.

`xs` are the inputs of one output tensor in the merge dtype (YAML order), `base` the base's
index (None without one), `params` the per-input parameters of the inputs the method binds them
to (the non-base ones, or every input for passthrough), `shared` the per-tensor parameters and
`generators` one seeded generator per non-base input (random methods). Specs (parameters,
defaults, input contract, domains) are in `methods.SPECS`; `linear` and `task_arithmetic` stream
slice by slice in `plan` and need no entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import extra_methods as extra
from . import methods as m

Merger = Callable[
    [
        Sequence[torch.Tensor],
        "int | None",
        Sequence[dict[str, Any]],
        dict[str, Any],
        Sequence[torch.Generator | None],
    ],
    torch.Tensor,
]


# The generalized task arithmetic family (also used whole-tensor under tokenizer alignment).
MERGERS: dict[str, Merger] = {name: getattr(m, name) for name in m.GTA_FAMILY}
MERGERS.update(
    {
        "slerp": lambda xs, base, params, shared, gens: m.slerp(
            float(shared["t"]), xs[base], xs[1 - base]
        ),
        "nuslerp": lambda xs, base, params, shared, gens: m.nuslerp_merge(
            xs, base, [p["weight"] for p in params], shared
        ),
        "model_stock": lambda xs, base, params, shared, gens: m.model_stock(
            xs, base, bool(shared["filter_wise"])
        ),
        "passthrough": lambda xs, base, params, shared, gens: m.passthrough(
            xs[0], params[0]["scale"]
        ),
        "sce": lambda xs, base, params, shared, gens: extra.sce(xs, base, shared),
        "ram": lambda xs, base, params, shared, gens: extra.ram(xs, base, shared),
        "ramplus_tl": lambda xs, base, params, shared, gens: extra.ramplus_tl(xs, base, shared),
        "multislerp": lambda xs, base, params, shared, gens: extra.multislerp(
            xs, base, [p["weight"] for p in params], shared
        ),
        "karcher": lambda xs, base, params, shared, gens: extra.karcher(xs, shared),
        "arcee_fusion": lambda xs, base, params, shared, gens: extra.arcee_fusion(
            xs, base, gens[0] if gens else None
        ),
        "nearswap": lambda xs, base, params, shared, gens: extra.nearswap(xs, base, shared),
    }
)
missing = set(m.SPECS) - set(MERGERS) - {"linear", "task_arithmetic"}
assert not missing, f"merge methods without a merger: {missing}"


def merge_tensor(
    method: str,
    xs: Sequence[torch.Tensor],
    base: int | None,
    params: Sequence[dict[str, Any]],
    shared: dict[str, Any],
    generators: Sequence[torch.Generator | None] = (),
) -> torch.Tensor:
    """Merge one whole output tensor with `method` (see the module docstring)."""
    if method not in MERGERS:
        raise ValueError(f"method {method!r} has no whole-tensor merger")
    return MERGERS[method](xs, base, params, shared, generators)
