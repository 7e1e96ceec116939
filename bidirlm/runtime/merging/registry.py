"""The merge methods, one small class each, collected in `REGISTRY` by name (mergekit's
`MergeMethod` registry is the model): a method's `spec` (`methods.SPECS`: parameters, defaults,
input contract, domains) says what it reads; its `merge` computes one whole output tensor.

`merge(xs, base, params, shared, generators)`: `xs` are the inputs of one output tensor in the
merge dtype (YAML order), `base` the base's index (None without one), `params` the per-input
parameters of the inputs the method binds them to (the non-base ones, or every input for
passthrough), `shared` the per-tensor parameters and `generators` one seeded generator per
non-base input (random methods). `linear` and `task_arithmetic` stream slice by slice in `plan`
(`streams = True`); their `merge` serves whole tensors under vocabulary alignment. Adding a
method: a `MethodSpec` in `methods.SPECS`, a class here, `@register`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from . import extra_methods as extra
from . import methods as m

Tensors = Sequence[torch.Tensor]
Params = Sequence[dict[str, Any]]
Generators = Sequence[torch.Generator | None]


class MergeMethod:
    """One merge method: its name, its spec and its whole-tensor merge."""

    name: ClassVar[str]

    @property
    def spec(self) -> m.MethodSpec:
        return m.SPECS[self.name]

    def merge(
        self, xs: Tensors, base: int | None, params: Params, shared: dict, gens: Generators
    ) -> torch.Tensor:
        raise NotImplementedError


REGISTRY: dict[str, MergeMethod] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Add one instance of `cls` to `REGISTRY` (its name must have a spec, once)."""
    if cls.name not in m.SPECS or cls.name in REGISTRY:
        raise ValueError(f"merge method {cls.name!r}: no spec, or registered twice")
    REGISTRY[cls.name] = cls()
    return cls


class _TaskArithmeticFamily(MergeMethod):
    """mergekit's generalized task arithmetic: consensus and sparsification per `GTA_FAMILY`."""

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        consensus, sparsification = m.GTA_FAMILY[self.name]
        return m.generalized_task_arithmetic(
            xs, base, params, shared, consensus=consensus, sparsification=sparsification,
            generators=gens,
        )  # fmt: skip


@register
class Linear(MergeMethod):
    name = "linear"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        raise ValueError("linear streams slice by slice (plan.linear)")


@register
class TaskArithmetic(_TaskArithmeticFamily):
    """`b + lambda * sum_i w_i d_i` (/ `sum_i w_i` when normalize), in the merge dtype."""

    name = "task_arithmetic"


@register
class Ties(_TaskArithmeticFamily):
    """TIES: trim each `d_i` to its top `density` magnitudes, elect signs by the summed
    weighted deltas, average the agreeing ones: `b + lambda * sum_i m_i w_i top_k(d_i) /
    sum_i m_i w_i` (normalize defaults to true)."""

    name = "ties"


@register
class DareTies(_TaskArithmeticFamily):
    """DARE-TIES: Bernoulli(`density`) drop of each `d_i`, L1-rescaled (rescale defaults to
    true), then TIES' sign consensus; normalize defaults to false."""

    name = "dare_ties"


@register
class DareLinear(_TaskArithmeticFamily):
    """DARE: `b + lambda * sum_i w_i * dare(d_i)`, `dare` a Bernoulli(`density`) drop rescaled to
    the L1 norm of `d_i`; no consensus."""

    name = "dare_linear"


@register
class Breadcrumbs(_TaskArithmeticFamily):
    """Model Breadcrumbs: each `d_i` loses its `gamma` largest and its smallest magnitudes,
    keeping a fraction `density`; then `b + lambda * sum_i w_i * crumbs(d_i)`."""

    name = "breadcrumbs"


@register
class BreadcrumbsTies(_TaskArithmeticFamily):
    """Breadcrumbs sparsification followed by TIES' sign consensus."""

    name = "breadcrumbs_ties"


@register
class Della(_TaskArithmeticFamily):
    """DELLA: MagPrune (rank-dependent keep probability in `density +/- epsilon`, L1-rescaled)
    then TIES' sign consensus; normalize and rescale default to true."""

    name = "della"


@register
class DellaLinear(_TaskArithmeticFamily):
    """DELLA without consensus: `b + lambda * sum_i w_i * magprune(d_i)`."""

    name = "della_linear"


@register
class Slerp(MergeMethod):
    name = "slerp"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return m.slerp(float(shared["t"]), xs[base], xs[1 - base])


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return m.nuslerp_merge(xs, base, [p["weight"] for p in params], shared)


@register
class ModelStock(MergeMethod):
    name = "model_stock"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return m.model_stock(xs, base, bool(shared["filter_wise"]))


@register
class Passthrough(MergeMethod):
    name = "passthrough"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return m.passthrough(xs[0], params[0]["scale"])


@register
class Sce(MergeMethod):
    name = "sce"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return extra.sce(xs, base, shared)


@register
class Ram(MergeMethod):
    name = "ram"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return extra.ram(xs, base, shared)


@register
class RamPlusTensorLocal(MergeMethod):
    name = "ramplus_tl"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return extra.ramplus_tl(xs, base, shared)


@register
class MultiSlerp(MergeMethod):
    name = "multislerp"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return extra.multislerp(xs, base, [p["weight"] for p in params], shared)


@register
class Karcher(MergeMethod):
    name = "karcher"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return extra.karcher(xs, shared)


@register
class ArceeFusion(MergeMethod):
    name = "arcee_fusion"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return extra.arcee_fusion(xs, base, gens[0] if gens else None)


@register
class NearSwap(MergeMethod):
    name = "nearswap"

    def merge(self, xs, base, params, shared, gens):  # noqa: ANN001, ANN201
        return extra.nearswap(xs, base, shared)


_missing = set(m.SPECS) - set(REGISTRY)
if _missing:  # a spec without a class would fail only mid-merge: fail at import instead
    raise ImportError(f"merge methods without a registry class: {sorted(_missing)}")


def merge_tensor(
    method: str,
    xs: Tensors,
    base: int | None,
    params: Params,
    shared: dict[str, Any],
    generators: Generators = (),
) -> torch.Tensor:
    """Merge one whole output tensor with `method` (see the module docstring)."""
    return REGISTRY[method].merge(xs, base, params, shared, generators)
