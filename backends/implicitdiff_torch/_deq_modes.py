"""The backward modes of the PyTorch `DEQ`: how the gradient of $z^* = f(z^*, x)$ is computed.

- `IFT(solve=...)` (default, **exact**): `idf.custom_fixed_point(..., batch_dims=1)`; the
  parameters of `f` are passed to it as a positional dict (through
  `torch.func.functional_call`), so they get their gradients by the implicit function theorem,
  as does `x`. Differentiable again (`create_graph=True`, `gradgradcheck`), composable with
  `torch.func`.
- `Neumann(terms=k)` (approximation): the same implicit rule with the linear solve replaced by
  $k$ terms of the Neumann series $(I - J)^{-\\top}\\bar z \\approx \\sum_{j<k} (J^\\top)^j \\bar z$
  (`NeumannSolve`, a core linear solver that runs a fixed number of steps).
- `Phantom(steps=k, damping=λ)` (approximation, Geng et al. 2021): backpropagation through
  $k$ damped steps $z \\leftarrow (1-\\lambda) z + \\lambda f(z, x)$ started at the detached $z^*$.
- `JFB()` (approximation, Fung et al. 2022): backpropagation through one application of $f$ at
  the detached $z^*$, i.e. $\\partial f/\\partial z \\approx 0$ in the implicit rule.

See `docs/deq.md` for the error of each approximation against the exact gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import implicitdiff as idf
from implicitdiff._linear_solve import AbstractLinearSolver, NeumannSolve

__all__ = ["IFT", "JFB", "Neumann", "NeumannSolve", "Phantom"]


@dataclass(frozen=True)
class IFT:
    """Exact implicit gradient: solve $(I - J)^\\top u = \\bar z$ with `solve`.

    `solve`: a core linear solver; default `idf.BiCGStab()` (tolerance $10^{-6}$ relative in
    float32, $10^{-12}$ in float64). `idf.Richardson(omega=-1.0, maxiter=...)` is the classic
    DEQ fixed-point backward (least memory; needs a contraction). Exact up to the solve's
    tolerance; a solve that does not converge raises (per the layer's `on_failure`)."""

    solve: AbstractLinearSolver = field(default_factory=idf.BiCGStab)
    exact = True


@dataclass(frozen=True)
class Neumann:
    """Approximate: the implicit rule with $k$ = `terms` terms of the Neumann series
    (`NeumannSolve`). Relative error about $\\|J\\|^k$; `terms=1` equals `JFB`. Memory flat
    (no tape), differentiable again."""

    terms: int = 5
    exact = False

    @property
    def solve(self) -> NeumannSolve:
        return NeumannSolve(terms=self.terms)


@dataclass(frozen=True)
class Phantom:
    """Approximate (Geng et al. 2021, "phantom gradients"): backpropagate through `steps`
    damped iterations $z \\leftarrow (1-\\lambda) z + \\lambda f(z, x)$ ($\\lambda$ = `damping`)
    from the detached $z^*$. With `damping=1` this is `Neumann(steps)` with the Jacobians
    taken along the (nearly constant) trajectory. Memory grows with `steps` (a tape of `steps`
    applications of `f`), not with the forward solver's iterations."""

    steps: int = 5
    damping: float = 1.0
    exact = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Phantom: expected steps a positive int, got {self.steps!r}.")
        if not 0 < self.damping <= 1:
            raise ValueError(f"Phantom: expected 0 < damping <= 1, got {self.damping!r}.")


@dataclass(frozen=True)
class JFB:
    """Approximate (Jacobian-free backprop, Fung et al. 2022): backpropagate through one
    application of $f$ at the detached $z^*$, i.e. drop $\\partial f/\\partial z$ from the
    implicit rule. Relative error about $\\|J\\|$; the cheapest mode."""

    exact = False


_MODES = (IFT, Neumann, Phantom, JFB)


def _as_mode(backward: Any) -> Any:
    if isinstance(backward, _MODES):
        return backward
    if isinstance(backward, str):
        named = {"ift": IFT(), "exact": IFT(), "jfb": JFB(), "phantom": Phantom(),
                 "neumann": Neumann()}
        if backward.lower() in named:
            return named[backward.lower()]
    if isinstance(backward, AbstractLinearSolver):
        return IFT(solve=backward)
    raise ValueError(
        "DEQ: backward: expected IFT(...), Neumann(...), Phantom(...), JFB(), a linear solver "
        f"(exact IFT with it), or one of 'ift', 'neumann', 'phantom', 'jfb'; got {backward!r}."
    )
