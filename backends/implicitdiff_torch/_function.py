"""The implicit rule as `torch.autograd.Function`s.

Two Functions carry everything:

- `ImplicitFn`: $\\theta \\mapsto x^*(\\theta)$. `forward` runs the user's solver untraced and
  checks the residual; `backward` is $\\bar\\theta = -B^\\top u$ with $A^\\top u = \\bar x$;
  `jvp` is $\\dot x = -A^{-1} B \\dot\\theta$; `vmap` runs one solve per batch element.
- `LinSolve`: $y = M(p)^{-1} r$ with $M = A = \\partial_x F(x^*, \\theta)$ or $M = A^\\top$ and
  $p = (x^*, \\theta)$. Its own `backward` is again a linear solve, with $M^\\top$, and its own
  `jvp` a solve with $M$, so derivatives of any order come out right (`gradgradcheck`,
  `hessian`).

All products with the Jacobians of `F` are reverse-mode (`torch.func.vjp`); forward products are
obtained by transposing a reverse-mode product ("double vjp"). That keeps them legal inside
`Function.jvp`, where forward-mode AD cannot nest, composable with every `torch.func` transform,
and differentiable again when `create_graph=True`.

Derivation of the `LinSolve` rules. With $y = M^{-1} r$: $dy = M^{-1}(dr - dM\\, y)$, so for a
cotangent $\\bar y$, with $w = M^{-\\top} \\bar y$: $\\bar r = w$ and
$\\bar p = -\\partial_p \\langle w, M(p)\\, y\\rangle$. Both cases reduce to one reverse product,
since $\\langle w, A^\\top y \\rangle = \\langle A^\\top y, w\\rangle$ and
$\\langle w, A y\\rangle = \\langle A^\\top w, y\\rangle$: it is
$\\partial_p\\langle A(p)^\\top a, b\\rangle$ with $(a, b) = (y, w)$ or $(w, y)$, the vjp with
cotangent $b$ of $p \\mapsto A(p)^\\top a$.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch._C import _functorch as _ft  # pyright: ignore
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as _torch_pytree

from implicitdiff import backend as core
from implicitdiff.backend import (
    ImplicitFunction,
    Linearization,
    Raveler,
    StructureError,
    capture_factorization,
    implicit_jvp,
    implicit_vjp,
    symmetric,
)

from ._host import physical

# ---- the problem: F, the structure of args, and which leaves are tensors ------------------------

class Problem:
    """What the Functions need to evaluate `F` from flat tensors: the condition, the structure of
    `args` and `options`, their non-tensor leaves (constants), and the structure of `x`.

    Passed to `Function.apply` as a non-tensor argument; one per call.
    """

    def __init__(self, F: Callable[..., Any], fn: ImplicitFunction | None, args: tuple,
                 options: dict | None = None, *, bk: Any):
        self.F = F
        self.bk = bk
        self.fn = fn
        # what the solver published for the backward pass (`run_forward`)
        self.factorization: Any = None
        self.tags: frozenset = fn.tags if fn is not None else frozenset()
        self.batch_dims: int = int(getattr(fn, "batch_dims", 0) or 0)
        leaves, self.args_def = core.tree_flatten(tuple(args))
        self.arg_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.arg_static = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self.float_th = [leaves[i].is_floating_point() for i in self.arg_pos]
        owner = []
        for a_i, a in enumerate(args):
            owner += [a_i] * len(core.tree_flatten(a)[0])
        self.th_arg = [owner[i] for i in self.arg_pos]
        self.n_args = len(args)
        self.n_th = len(self.arg_pos)
        oleaves, self.opt_def = core.tree_flatten(dict(options or {}))
        self.opt_pos = [i for i, leaf in enumerate(oleaves) if isinstance(leaf, torch.Tensor)]
        self.opt_static = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in oleaves]
        self.n_opt = len(self.opt_pos)
        self.x_def: Any = None
        self.n_x = 0
        self.aux_def: Any = None
        self.aux_pos: list[int] = []
        self.aux_static: list[Any] = []
        self.check_closure = False
        # closures (see `Closure`): `args` ends with the tuple of lifted tensors, F substitutes
        # them; `n_user` is the number of the user's own arguments (what the solver gets)
        self.n_user = len(args)
        self.closure: Closure | None = None
        self.guard = False  # refuse a functorch-wrapped tensor that F reads (`_Guard`)

    def user_args(self, args: tuple) -> tuple:
        """The user's own arguments (without the lifted closure tensors)."""
        return tuple(args)[:self.n_user]

    # -- args and options from flat tensors ---------------------------------------------------
    def tensors(self, args: tuple) -> list[torch.Tensor]:
        leaves = core.tree_flatten(tuple(args))[0]
        return [leaves[i] for i in self.arg_pos]

    def option_tensors(self, options: dict) -> list[torch.Tensor]:
        leaves = core.tree_flatten(dict(options))[0]
        return [leaves[i] for i in self.opt_pos]

    def args_from(self, ths: Sequence[Any]) -> tuple:
        leaves = list(self.arg_static)
        for p, t in zip(self.arg_pos, ths):
            leaves[p] = t
        return core.tree_unflatten(self.args_def, leaves)

    def options_from(self, opts: Sequence[Any]) -> dict:
        leaves = list(self.opt_static)
        for p, t in zip(self.opt_pos, opts):
            leaves[p] = t
        return core.tree_unflatten(self.opt_def, leaves)

    def tensor_tangents(self, args_dot: tuple) -> list[Any]:
        """Tangents aligned with the tensor leaves of args (None where none or not floating)."""
        tl = leaves_aligned(tuple(args_dot), self.args_def)
        return [tl[p] if self.float_th[j] and isinstance(tl[p], torch.Tensor) else None
                for j, p in enumerate(self.arg_pos)]

    def tangents_from(self, dots: Sequence[Any]) -> tuple:
        """A tuple like `args` of tangents from those of the tensor leaves (None: no tangent);
        every other leaf gets the constant tangent 0.0."""
        leaves: list[Any] = [0.0] * len(self.arg_static)
        for j, (p, d) in enumerate(zip(self.arg_pos, dots)):
            if d is not None and self.float_th[j]:
                leaves[p] = d
        return tuple(core.tree_unflatten(self.args_def, leaves))

    def tensor_cotangents(self, grads: tuple) -> list[Any]:
        """The cotangents of the tensor leaves from a tuple like `args` (None: no gradient)."""
        aligned = leaves_aligned(tuple(grads), self.args_def)
        return [aligned[p] for p in self.arg_pos]

    def x_from(self, xs: Sequence[Any]) -> Any:
        """The pytree x from its flat leaves."""
        return core.tree_unflatten(self.x_def, list(xs))

    def wanted(self, argnums: Sequence[int] | None) -> list[int]:
        keep = range(self.n_args) if argnums is None else set(argnums)
        return [j for j in range(self.n_th) if self.th_arg[j] in keep and self.float_th[j]]

    def args_cotangent(self, grads: Sequence[Any], wanted: Sequence[int]) -> tuple:
        """A tuple like `args` with the gradient of every tensor leaf, None elsewhere."""
        leaves: list[Any] = [None] * len(self.arg_static)
        for j, g in enumerate(grads):
            if j in wanted:
                leaves[self.arg_pos[j]] = g
        args = core.tree_unflatten(self.args_def, leaves)
        return tuple(args)

    # -- the condition on flat leaves ---------------------------------------------------------
    def F_flat(self, xs: Sequence[torch.Tensor], ths: Sequence[Any]) -> tuple:
        x = core.tree_unflatten(self.x_def, list(xs))
        r = self.F(x, *self.args_from(ths))
        return tuple(core.tree_flatten(r)[0])

    # -- aux -----------------------------------------------------------------------------------
    def split_aux(self, aux: Any) -> list[torch.Tensor]:
        leaves, self.aux_def = core.tree_flatten(aux)
        self.aux_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.aux_static = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        return [leaves[i] for i in self.aux_pos]

    def join_aux(self, tensors: Sequence[torch.Tensor]) -> Any:
        leaves = list(self.aux_static)
        for p, t in zip(self.aux_pos, tensors):
            leaves[p] = t
        return core.tree_unflatten(self.aux_def, leaves)

    def vmapped(self) -> Problem:
        """The same problem over a new leading batch dimension of every tensor (x and the
        tensor leaves of args): `F` mapped with `torch.func.vmap`, `batch_dims` one more."""
        return VmappedProblem(self)


def leaves_aligned(tangents: Any, treedef: Any) -> list[Any]:
    """The leaves of `tangents` aligned with those of the pytree whose structure is `treedef`;
    None (for a whole subtree or a leaf) means no tangent there."""
    if treedef.kind == "leaf":
        return [tangents]
    if treedef.kind == "none":
        return []
    if tangents is None:
        return [None] * treedef.num_leaves
    kids = ([tangents[k] for k in treedef.meta] if treedef.kind == "dict" else list(tangents))
    return [leaf for k, c in zip(kids, treedef.children) for leaf in leaves_aligned(k, c)]


class VmappedProblem(Problem):
    """`Problem.vmapped()`: every tensor leaf has a new leading dimension, one problem each."""

    def __init__(self, base: Problem):
        self.__dict__.update(base.__dict__)
        self.base = base
        self.batch_dims = base.batch_dims + 1

    def F_flat(self, xs: Sequence[torch.Tensor], ths: Sequence[Any]) -> tuple:
        base = self.base
        return torch.func.vmap(lambda xs_, ths_: base.F_flat(xs_, ths_))(list(xs), list(ths))


# ---- products with the Jacobians of F -----------------------------------------------------------

def func_vjp(f: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    """`torch.func.vjp` without aux (typed as the pair it returns)."""
    return cast(tuple[Any, Callable[..., Any]], torch.func.vjp(f, *primals))


def _zeros_like(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t)


def jvp_by_vjp(f: Callable[..., tuple], primals: Sequence[torch.Tensor],
               tangents: Sequence[Any]) -> list[torch.Tensor]:
    """$J \\dot p$ of `f` (returning a tuple) by reverse mode twice: $c \\mapsto J^\\top c$ is
    linear, its vjp with cotangent $\\dot p$ is $J \\dot p$."""
    out, vjp_fn = func_vjp(f, *primals)
    zeros = tuple(_zeros_like(o) for o in out)
    _, vjp2 = func_vjp(lambda *c: vjp_fn(c), *zeros)
    tans = tuple(_zeros_like(p) if t is None else t.to(p.dtype)
                 for p, t in zip(primals, tangents))
    return list(vjp2(tans))


class Operator(Linearization):
    """The `Linearization` of the torch backend: products with $A = \\partial_x F$, $A^\\top$,
    $B = \\partial_\\theta F$, $B^\\top$ at `(xs, ths)`, the flat tensor leaves of $x^*$ and of
    the tensor leaves of $\\theta$.

    The `Linearization` methods take and return pytrees (shaped like `x`, or a tuple like
    `args`); the `*_leaves` methods do the same on lists of leaves, which is what the
    differentiable linear solve (`LinSolve`) rebuilds at other points. Products are reverse-mode
    (`torch.func.vjp`); $A v$ and $B \\dot\\theta$ are their transposes, taken by reverse mode
    again (the "double vjp"), so they work inside `autograd.Function.jvp` too.

    `wanted`: the tensor leaves of $\\theta$ whose cotangent $B^\\top u$ may be asked for
    (default: every floating one).
    """

    method = "autodiff"
    fast = False  # products batch over several vectors at once (see `MatVec`)

    def __init__(self, problem: Problem, xs: Sequence[torch.Tensor], ths: Sequence[Any],
                 wanted: Sequence[int] | None = None):
        self.p = problem
        self.xs = list(xs)
        self.ths = list(ths)
        self.wanted = [j for j in (range(len(self.ths)) if wanted is None else wanted)
                       if problem.float_th[j]]
        self._vx: Any = None
        self._ax: Any = None
        self._raveler: Raveler | None = None

    @classmethod
    def at(cls, bk: Any, F: Callable[..., Any], x: Any, args: tuple,
           tags: frozenset = frozenset()) -> Operator:
        """The linearization of `F` at `(x, args)` (what `TorchBackend.linearize` returns)."""
        problem = Problem(F, None, tuple(args), bk=bk)
        problem.tags = tags
        xs, problem.x_def = core.tree_flatten(x)
        problem.n_x = len(xs)
        return cls(problem, xs, problem.tensors(tuple(args)))

    # -- raveling: the core's, batch-aware ---------------------------------------------------
    @property
    def raveler(self) -> Raveler:
        """Flat leaves of x (possibly with extra leading dimensions) to `(..., *batch, n)`."""
        if self._raveler is None:
            self._raveler = Raveler(self.p.bk, self.xs, self.p.batch_dims)
        return self._raveler

    def ravel(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        """x-shaped leaves to a vector `(..., *batch, n)`."""
        return self.raveler.ravel(list(leaves))

    def unravel(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of `ravel`."""
        return self.raveler.unravel(flat)

    # -- the Linearization, on pytrees ---------------------------------------------------------
    def A(self, v: Any) -> Any:
        return core.tree_unflatten(self.p.x_def, self.A_leaves(core.tree_flatten(v)[0]))

    def AT(self, u: Any) -> Any:
        return core.tree_unflatten(self.p.x_def, self.AT_leaves(core.tree_flatten(u)[0]))

    def B(self, args_dot: tuple) -> Any:
        dots = self.p.tensor_tangents(tuple(args_dot))
        return core.tree_unflatten(self.p.x_def, self.B_leaves(dots))

    def BT(self, u: Any, argnums: Sequence[int] | None = None) -> tuple:
        wanted = [j for j in self.p.wanted(argnums) if j in self.wanted]
        grads = self.BT_leaves(core.tree_flatten(u)[0], wanted)
        return self.p.args_cotangent(grads, wanted)

    # -- products on lists of leaves -----------------------------------------------------------
    def _vjp_x(self) -> Any:
        if self._vx is None:
            ths = self.ths
            self._vx = func_vjp(lambda *x: self.p.F_flat(x, ths), *self.xs)
        return self._vx

    def AT_leaves(self, u: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """$A^\\top u$ on x-shaped leaves."""
        r, f = self._vjp_x()
        return list(f(tuple(ui.to(ri.dtype) for ui, ri in zip(u, r))))

    def A_leaves(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """$A v$ on x-shaped leaves."""
        if symmetric in self.p.tags:
            return self.AT_leaves(v)
        vs = tuple(vi.to(xi.dtype) for vi, xi in zip(v, self.xs))
        if self._ax is None:
            r, f = self._vjp_x()
            zeros = tuple(_zeros_like(t) for t in r)
            try:
                self._ax = func_vjp(lambda *c: f(c), *zeros)[1]
            except RuntimeError as e:
                # reverse mode twice fails where the products are asked for at another
                # torch.func level than the linearization's (diagnostics inside idf.vjp of
                # a condition nonlinear in x): forward mode then, which such F support
                if "level" not in str(e):
                    raise
                ths = self.ths
                self._ax = lambda t: torch.func.jvp(lambda *x: self.p.F_flat(x, ths),
                                                    tuple(self.xs), t)[1]
        return list(self._ax(vs))

    def _with(self, idx: Sequence[int], sub: Sequence[Any]) -> list[Any]:
        return _with(self.ths, idx, sub)

    def B_leaves(self, dots: Sequence[Any]) -> list[torch.Tensor]:
        """$B \\dot\\theta$, `dots` aligned with the tensor leaves of args (None: no tangent)."""
        idx = [i for i, d in enumerate(dots) if d is not None and self.p.float_th[i]]
        if not idx:
            return [_zeros_like(x) for x in self.xs]
        xs = self.xs
        return jvp_by_vjp(lambda *sub: self.p.F_flat(xs, self._with(idx, sub)),
                          [self.ths[i] for i in idx], [dots[i] for i in idx])

    def BT_leaves(self, u: Sequence[torch.Tensor], wanted: Sequence[int]) -> list[Any]:
        """$B^\\top u$ for the tensor leaves `wanted` of args (None elsewhere)."""
        idx = [i for i in wanted if self.p.float_th[i]]
        out: list[Any] = [None] * len(self.ths)
        if not idx:
            return out
        xs = self.xs
        r, f = func_vjp(lambda *sub: self.p.F_flat(xs, self._with(idx, sub)),
                        *[self.ths[i] for i in idx])
        for i, g in zip(idx, f(tuple(ui.to(ri.dtype) for ui, ri in zip(u, r)))):
            out[i] = g
        return out


class FastOperator(Operator):
    """`Operator` for a first-order backward pass outside any transform: one recorded evaluation
    of `F` at detached `(xs, ths)` serves every product, through `torch.autograd.grad` (which
    runs only the branches leading to the inputs it is asked for). Not differentiable again;
    $A^\\top$ (and $A$ when symmetric) takes several vectors at once (`MatVec`)."""

    fast = True

    def __init__(self, problem: Problem, xs: Sequence[torch.Tensor], ths: Sequence[Any],
                 wanted: Sequence[int]):
        super().__init__(problem, xs, ths, wanted)
        with torch.enable_grad():
            self.xd = [x.detach().requires_grad_() for x in self.xs]
            self.thd = [t.detach().requires_grad_() if i in self.wanted else t
                        for i, t in enumerate(self.ths)]
            self.r = problem.F_flat(self.xd, self.thd)
        self._c: Any = None

    def _grad(self, inputs: Sequence[torch.Tensor], u: Sequence[torch.Tensor],
              retain: bool = True) -> list[torch.Tensor]:
        u = [ui.to(ri.dtype) for ui, ri in zip(u, self.r)]
        batched = u[0].ndim > self.r[0].ndim  # several cotangents at once (materializing)
        if batched:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                gs = torch.autograd.grad(self.r, inputs, u, retain_graph=retain,
                                         allow_unused=True, is_grads_batched=True)
        else:  # (a catch_warnings block costs more than a small product)
            gs = torch.autograd.grad(self.r, inputs, u, retain_graph=retain, allow_unused=True)
        lead = u[0].shape[:1] if batched else ()
        return [i.new_zeros(*lead, *i.shape) if g is None else g for i, g in zip(inputs, gs)]

    def AT_leaves(self, u: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self._grad(self.xd, u)

    def A_leaves(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if symmetric in self.p.tags:
            return self.AT_leaves(v)
        if v[0].ndim > self.xs[0].ndim:  # several vectors: one at a time
            return [torch.stack(c) for c in zip(*(self.A_leaves([vi[j] for vi in v])
                                                  for j in range(v[0].shape[0])))]
        with torch.enable_grad():
            if self._c is None:
                c = [torch.zeros_like(ri).requires_grad_() for ri in self.r]
                gs = torch.autograd.grad(self.r, self.xd, c, retain_graph=True,
                                         create_graph=True, allow_unused=True)
                self._c = (c, [torch.zeros_like(x) if g is None else g
                               for x, g in zip(self.xd, gs)])
            c, g = self._c
            out = torch.autograd.grad(g, c, [vi.to(xi.dtype) for vi, xi in zip(v, self.xs)],
                                      retain_graph=True, allow_unused=True)
        return [torch.zeros_like(ci) if o is None else o for ci, o in zip(c, out)]

    def BT_leaves(self, u: Sequence[torch.Tensor], wanted: Sequence[int]) -> list[Any]:
        out: list[Any] = [None] * len(self.ths)
        idx = [i for i in wanted if i in self.wanted]
        if idx:
            for i, g in zip(idx, self._grad([self.thd[i] for i in idx], u)):
                out[i] = g
        return out


def _matrix_only(derivatives: Any) -> Any:
    """The user's `Derivatives` when it gives `jacobian_x` (the one field autodiff backends
    use), else None."""
    return derivatives if getattr(derivatives, "jacobian_x", None) is not None else None


class MatVec:
    """A product on raveled vectors, `(*batch, n) -> (*batch, n)`. When `several` is true it
    also takes `(m, *batch, n)` (m vectors at once), so `materialize` builds the matrix in one
    batched product instead of n."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], several: bool):
        self.f, self.several = f, several

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.f(v)

    def materialize(self, b: torch.Tensor) -> torch.Tensor | None:
        """The matrix `(*batch, n, n)` of this product, or None if it cannot batch."""
        given = getattr(self.f, "materialize", None)
        if given is not None:  # `Derivatives.jacobian_x`
            return given(b)
        if not self.several:
            return None
        n = b.shape[-1]
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        basis = eye.reshape(n, *([1] * (b.ndim - 1)), n).expand(n, *b.shape)
        return torch.movedim(self.f(basis), 0, -1)


class SolveSpec:
    """What `LinSolve` needs to solve with $A$ or $A^\\top$ at any point: the problem (to rebuild
    the products there), the core's resolved linear solver, and the core's checks (diagnostics
    and `on_failure`) for each orientation, `checks[transpose]`."""

    def __init__(self, problem: Problem, solver: Any, tags: frozenset,
                 checks: dict[bool, Callable[[Any, Any], Any]]):
        self.problem, self.solver, self.tags, self.checks = problem, solver, tags, checks

    def vmapped(self) -> SolveSpec:
        """The same over a new leading batch dimension (see `Problem.vmapped`)."""
        return SolveSpec(self.problem.vmapped(), self.solver, self.tags, self.checks)

    def solve(self, transpose: bool, rhs: torch.Tensor, params: Sequence[torch.Tensor],
              rtol: torch.Tensor | None = None) -> torch.Tensor:
        """$M^{-1}$ rhs at `params = (*xs, *ths)`, $M = A^\\top$ if `transpose` else $A$;
        `rtol`, where given, is the tolerance the core chose from the forward's accuracy."""
        nx = self.problem.n_x
        ops = Operator(self.problem, params[:nx], params[nx:])

        def A(v: torch.Tensor) -> torch.Tensor:
            return ops.ravel(ops.A_leaves(ops.unravel(v)))

        def AT(u: torch.Tensor) -> torch.Tensor:
            return ops.ravel(ops.AT_leaves(ops.unravel(u)))

        matvec, rmatvec = (AT, A) if transpose else (A, AT)
        solver = self.solver if rtol is None else self.solver._with_rtol(rtol)
        sol, info = solver.solve(matvec, rhs, rmatvec=rmatvec, tags=self.tags,
                                 backend=self.problem.bk)
        return self.checks[transpose](sol, info)


def _refuse_forward_over_forward(problem: Problem) -> None:
    """Forward mode over forward mode through any `autograd.Function` loses the outer tangent of
    the saved tensors in torch (pytorch/pytorch#197867: `jacfwd(jacfwd(f))` gives zero or wrong
    second derivatives). Raise instead of returning a silently wrong derivative."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    jvps = [i for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp]
    if len(jvps) > 1:
        name = problem.fn.name if problem.fn is not None else "F"
        raise NotImplementedError(
            f"{name}: forward mode over forward mode (torch.func.jvp of torch.func.jvp, "
            "jacfwd(jacfwd(f))) through a torch.autograd.Function gives wrong second derivatives "
            "in PyTorch (pytorch/pytorch#197867), so implicitdiff refuses it. Expected at most "
            "one forward-mode transform; got nested ones. Use reverse mode for one of the two: "
            "torch.func.hessian (jacfwd(jacrev)), jacrev(jacfwd) or jacrev(jacrev)."
        )


def _select(t: Any, d: int | None, i: int) -> Any:
    return t if d is None or not isinstance(t, torch.Tensor) else t.select(d, i)


def _loop_vmap(apply: Callable[..., Any], info: Any, in_dims: Sequence[Any],
               args: Sequence[Any]) -> tuple[Any, Any]:
    """A vmap rule: one call per batch element, outputs stacked along dimension 0."""
    outs = [apply(*[_select(a, d, i) for a, d in zip(args, in_dims)])
            for i in range(info.batch_size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = tuple(torch.stack([o[j] for o in outs]) for j in range(len(outs[0])))
    return stacked, (0,) * len(stacked)


# ---- the differentiable linear solve ------------------------------------------------------------

class LinSolve(torch.autograd.Function):
    """$y = M(p)^{-1} r$, $M = \\partial_x F(x^*, \\theta)$ (`transpose=False`) or its transpose,
    $p$ = `(*xs, *ths)`. Differentiable in $r$ and $p$ to any order. This is what
    `TorchBackend.linear_solve` wraps around the core's solve when the result must be
    differentiable, as JAX's backend wraps `lax.custom_linear_solve`."""

    @staticmethod
    def forward(spec: SolveSpec, transpose: bool, rhs: torch.Tensor, rtol: torch.Tensor | None,
                *params: torch.Tensor) -> torch.Tensor:
        return spec.solve(transpose, rhs, params, rtol)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        spec, transpose, _rhs, rtol, *params = inputs
        ctx.spec, ctx.transpose, ctx.rtol = spec, transpose, rtol
        ctx.save_for_backward(output, *params)
        ctx.save_for_forward(output, *params)

    @staticmethod
    def backward(ctx: Any, ybar: torch.Tensor) -> tuple:
        spec, transpose = ctx.spec, ctx.transpose
        problem = spec.problem
        y, *params = ctx.saved_tensors
        nx = problem.n_x
        w = LinSolve.apply(spec, not transpose, ybar, ctx.rtol, *params)
        needs = ctx.needs_input_grad[4:]
        idx = [j for j in range(len(params)) if needs[j] and
               (j < nx or problem.float_th[j - nx])]
        grads: list[Any] = [None] * len(params)
        if idx:
            a, b = (y, w) if transpose else (w, y)
            for j, g in zip(idx, _d_AT(problem, params, idx, a, b)):
                grads[j] = -g
        return (None, None, w, None, *grads)

    @staticmethod
    def jvp(ctx: Any, _p: Any, _t: Any, rhs_dot: torch.Tensor | None, _r: Any,
            *param_dots: Any) -> torch.Tensor:
        spec, transpose = ctx.spec, ctx.transpose
        problem = spec.problem
        _refuse_forward_over_forward(problem)
        y, *params = ctx.saved_tensors
        nx = problem.n_x
        idx = [j for j, d in enumerate(param_dots) if d is not None and
               (j < nx or problem.float_th[j - nx])]
        rhs = torch.zeros_like(y) if rhs_dot is None else rhs_dot
        if idx:
            def My(*sub: torch.Tensor) -> tuple:
                q = _with(params, idx, sub)
                ops = Operator(problem, q[:nx], q[nx:])
                yy = ops.unravel(y)
                return (ops.ravel(ops.AT_leaves(yy) if transpose else ops.A_leaves(yy)),)

            (dMy,) = jvp_by_vjp(My, [params[j] for j in idx], [param_dots[j] for j in idx])
            rhs = rhs - dMy
        return LinSolve.apply(spec, transpose, rhs, ctx.rtol, *params)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, spec: SolveSpec, transpose: bool,
             *rest: torch.Tensor) -> tuple[Any, Any]:
        # One batched solve instead of one per element: the vmapped dimension goes first (an
        # unbatched input is expanded, a view), F is vmapped over it, and the core's solvers
        # treat it as one more batch dimension (each element stops on its own).
        def front(t: torch.Tensor | None, d: int | None) -> torch.Tensor | None:
            if t is None:  # no tolerance from the forward
                return None
            if d is None:
                return t.unsqueeze(0).expand(info.batch_size, *t.shape)
            return t.movedim(d, 0)

        moved = [front(t, d) for t, d in zip(rest, in_dims[2:])]
        return LinSolve.apply(spec.vmapped(), transpose, *moved), 0


def _with(params: Sequence[Any], idx: Sequence[int], sub: Sequence[Any]) -> list[Any]:
    q = list(params)
    for j, s in zip(idx, sub):
        q[j] = s
    return q


def _d_AT(problem: Problem, params: Sequence[torch.Tensor], idx: Sequence[int],
          a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """$\\partial_p \\langle A(p)^\\top a, b\\rangle$ for the params `idx`; `a`, `b` raveled."""
    nx = problem.n_x

    def h(*sub: torch.Tensor) -> tuple:
        q = _with(params, idx, sub)
        ops = Operator(problem, q[:nx], q[nx:])
        return (ops.ravel(ops.AT_leaves(ops.unravel(a))),)

    _, f = func_vjp(h, *[params[j] for j in idx])
    return list(f((b,)))


# ---- the implicit function ----------------------------------------------------------------------

class ImplicitFn(torch.autograd.Function):
    """$\\theta \\mapsto x^*(\\theta)$: inputs `(problem, *ths, *option_tensors)`, outputs
    `(*x_leaves, *aux_tensor_leaves)`."""

    @staticmethod
    def forward(problem: Problem, *inputs: torch.Tensor) -> tuple:
        ths, opts = inputs[:problem.n_th], inputs[problem.n_th:]
        args = problem.args_from(ths)
        x, aux = run_forward(problem, args, problem.options_from(opts))
        xs, problem.x_def = core.tree_flatten(x)
        problem.n_x = len(xs)
        aux_t = problem.split_aux(aux) if problem.fn is not None and problem.fn.has_aux else []
        outs = [_unalias(t, inputs) for t in (*xs, *aux_t)]
        return tuple(outs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        problem = inputs[0]
        ctx.problem = problem
        ths = inputs[1:1 + problem.n_th]
        xs = output[:problem.n_x]
        ctx.save_for_backward(*xs, *ths)
        ctx.save_for_forward(*xs, *ths)
        aux = output[problem.n_x:]
        if aux:
            ctx.mark_non_differentiable(*aux)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        problem = ctx.problem
        nx, n_th = problem.n_x, problem.n_th
        saved = ctx.saved_tensors
        xs, ths = saved[:nx], saved[nx:]
        needs = ctx.needs_input_grad[1:1 + n_th]
        wanted = [j for j in range(n_th) if needs[j] and problem.float_th[j]]
        none_opts = (None,) * problem.n_opt
        if not wanted:
            return (None, *([None] * n_th), *none_opts)
        trivial = _shape_only(xs, ths)
        if trivial is not None:
            return (None, *[trivial(ths[j]) if j in wanted else None for j in range(n_th)],
                    *none_opts)
        xs, xbar = _drop_failed(problem, xs, grads[:nx])
        factorization = None
        if not differentiable_context():
            # first order, outside any transform: nothing records this pass
            lin: Operator = FastOperator(problem, xs, ths, wanted)
            factorization = problem.factorization
        else:
            lin = Operator(problem, xs, ths, wanted)
        fn = problem.fn
        assert fn is not None
        g = implicit_vjp(problem.F, problem.x_from(xs), problem.args_from(ths),
                         problem.x_from(xbar), solve=fn.solve, tags=fn.tags,
                         on_failure=fn.on_failure, backend=problem.bk, name=fn.name,
                         linearization=lin, batch_dims=problem.batch_dims,
                         kink_probe=fn.kink_probe, derivatives=_matrix_only(fn.derivatives),
                         factorization=factorization)
        return (None, *problem.tensor_cotangents(g), *none_opts)

    @staticmethod
    def jvp(ctx: Any, _p: Any, *tangents: Any) -> tuple:
        problem = ctx.problem
        _refuse_forward_over_forward(problem)
        nx, n_th = problem.n_x, problem.n_th
        saved = ctx.saved_tensors
        xs, ths = saved[:nx], saved[nx:]
        fn = problem.fn
        assert fn is not None
        trivial = _shape_only(xs, ths)
        if trivial is not None:
            return (*[trivial(x) for x in xs], *([None] * len(problem.aux_pos)))
        xdot = implicit_jvp(problem.F, problem.x_from(xs), problem.args_from(ths),
                            problem.tangents_from(tangents[:n_th]), solve=fn.solve,
                            tags=fn.tags, on_failure=fn.on_failure, backend=problem.bk,
                            name=fn.name, linearization=Operator(problem, xs, ths),
                            batch_dims=problem.batch_dims, kink_probe=fn.kink_probe,
                            derivatives=_matrix_only(fn.derivatives))
        n_aux = len(problem.aux_pos)
        return (*core.tree_flatten(xdot)[0], *([None] * n_aux))

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem: Problem, *inputs: torch.Tensor
             ) -> tuple[Any, Any]:
        def one(*a: Any) -> Any:
            return ImplicitFn.apply(problem, *a)

        return _loop_vmap(one, info, in_dims[1:], inputs)


def _shape_only(xs: Sequence[torch.Tensor], ths: Sequence[torch.Tensor]
                ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Derivatives that need no linear solve: on the `meta` device there are no values, only
    shapes (an empty tensor like each one: shape propagation, as torch's own meta kernels do);
    if x has no elements, $A$ is 0×0 and every derivative is zero. None otherwise."""
    if any(t.device.type == "meta" for t in (*xs, *ths)):
        return torch.empty_like
    if all(x.numel() == 0 for x in xs):
        return torch.zeros_like
    return None


def _drop_failed(problem: Problem, xs: Sequence[torch.Tensor], xbar: Sequence[torch.Tensor]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """With `batch_dims > 0` and `on_failure="nan"`, batch elements whose forward solve failed
    (x* is NaN there) contribute nothing to the gradient: their x* and cotangent become zero,
    so one failed element does not spoil the gradient of the arguments the batch shares."""
    k = problem.batch_dims
    if not k or problem.fn is None or problem.fn.on_failure != "nan":
        return list(xs), list(xbar)
    ok = None
    for x in xs:
        f = torch.isfinite(x).reshape(*x.shape[:k], -1).all(dim=-1)
        ok = f if ok is None else ok & f
    assert ok is not None

    def keep(t: torch.Tensor) -> torch.Tensor:
        m = ok.reshape(*ok.shape, *([1] * (t.ndim - k)))
        return torch.where(m, t, torch.zeros_like(t))

    return [keep(x) for x in xs], [keep(g) for g in xbar]


def _unalias(t: torch.Tensor, inputs: Sequence[Any]) -> torch.Tensor:
    """A Function must not return its input (or a view of it) as an output: copy those."""
    for inp in inputs:
        if isinstance(inp, torch.Tensor) and t.data_ptr() == inp.data_ptr() and t.numel():
            return t.clone()
    return t


# ---- closures: tensors F reads that are not its arguments ---------------------------------------
#
# Under a `torch.func` transform a tensor that F reads from its closure (a closure cell, a
# default, a global, a bound method's module, `functools.partial`, a module whose parameters
# `torch.func.functional_call` swapped) is wrapped by the transform. The Function's forward and
# backward run below every transform (functorch unwraps their inputs), so such a tensor would be
# read there as a constant and its derivative would be silently zero. As the JAX backend's
# closure conversion does, `Closure` finds those tensors, the call passes them to the Function
# as extra inputs (one more argument of F, a tuple), and `Closure.substitute` makes F (and the
# solver) read those inputs instead: by identity, through a `TorchFunctionMode`, of what the
# closure holds when F runs (`functional_call` has put a module's own parameters back by the
# time the backward pass runs; the substitution covers both). What it cannot find, `_Guard`
# refuses by name in the forward pass, where no transform may track anything F reads.

_MAX_DEPTH = 8
_MAX_ITEMS = 256
_LIBRARIES = ("torch", "numpy", "implicitdiff", "builtins", "functools", "typing")
"""Code whose globals hold no user tensors: its closures are walked, its globals not."""


def _batched(t: torch.Tensor) -> bool:
    """Whether `torch.func.vmap` maps over `t` (at any level)."""
    while _ft.is_functorch_wrapped_tensor(t):
        if _ft.is_batchedtensor(t):
            return True
        t = _ft.get_unwrapped(t)
    return False


def _needs_lift(t: torch.Tensor) -> bool:
    """Whether a tensor F closes over must become an input: a `torch.func` transform wraps it
    (it tracks derivatives through it, or maps over it), forward AD gives it a tangent, or it
    requires grad with grad mode on."""
    if _ft.is_functorch_wrapped_tensor(t):
        return True
    if _forward_ad_active() and fwAD.unpack_dual(t).tangent is not None:
        return True
    return torch.is_grad_enabled() and t.requires_grad


def _tracked(t: torch.Tensor) -> bool:
    """Whether derivatives through `t` may be asked for (a grad or jvp transform wraps it,
    forward AD gives it a tangent, or it requires grad with grad mode on)."""
    u = t
    while _ft.is_functorch_wrapped_tensor(u):
        if _ft.is_gradtrackingtensor(u):
            return True
        u = _ft.get_unwrapped(u)
    if _forward_ad_active() and fwAD.unpack_dual(u).tangent is not None:
        return True
    return torch.is_grad_enabled() and u.requires_grad


def _cell_getter(cell: Any) -> Callable[[], Any]:
    return lambda: cell.cell_contents


def _attr_getter(obj: Any, name: str) -> Callable[[], Any]:
    return lambda: functools.reduce(getattr, name.split("."), obj)


def _item_getter(obj: Any, key: Any) -> Callable[[], Any]:
    return lambda: obj[key]


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names += _global_names(c)
    return names


def _library(obj: Any) -> bool:
    mod = getattr(obj, "__module__", None) or type(obj).__module__ or ""
    return mod.split(".")[0] in _LIBRARIES


class Closure:
    """The tensors a condition reads from its closure that must become inputs of the implicit
    function (`_needs_lift`): where F holds them (closure cells, defaults, globals it names,
    bound methods and their `nn.Module`, `functools.partial`, lists, tuples, dicts, attributes
    of plain objects and modules), found by walking F without calling it.

    The solver's own closure adds the tensors `torch.func.vmap` maps over (the vmap rule runs
    the solver once per element, which must read that element); their derivative is zero, as
    the theorem says of anything only the solver reads."""

    def __init__(self, F: Callable[..., Any], solver: Callable[..., Any] | None = None):
        self.names: list[str] = []
        self.values: list[torch.Tensor] = []
        self.getters: list[list[Callable[[], Any]]] = []
        self._index: dict[int, int] = {}
        self._seen: set[int] = set()
        self._lift: Callable[[torch.Tensor], bool] = _needs_lift
        self._walk(F, getattr(F, "__name__", "F"), None, 0)
        if solver is not None:
            self._seen.clear()
            self._lift = _batched
            self._walk(solver, getattr(solver, "__name__", "solver"), None, 0)

    def _add(self, t: torch.Tensor, name: str, get: Callable[[], Any] | None) -> None:
        k = self._index.get(id(t))
        if k is None:
            if not self._lift(t):
                return
            k = self._index[id(t)] = len(self.values)
            self.values.append(t)
            self.names.append(name)
            self.getters.append([])
        if get is not None:
            self.getters[k].append(get)

    def _walk(self, obj: Any, name: str, get: Callable[[], Any] | None, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            self._add(obj, name, get)
            return
        if (depth > _MAX_DEPTH or obj is None or id(obj) in self._seen
                or isinstance(obj, (str, bytes, int, float, complex, type, types.ModuleType))):
            return
        self._seen.add(id(obj))
        d = depth + 1
        if isinstance(obj, torch.nn.Module):
            for n, t in (*obj.named_parameters(), *obj.named_buffers()):
                self._add(t, f"{name}.{n}", _attr_getter(obj, n))
            for mod_name, mod in obj.named_modules():
                for n, v in vars(mod).items():
                    if not n.startswith("_"):
                        path = f"{mod_name}.{n}" if mod_name else n
                        self._walk(v, f"{name}.{path}", _attr_getter(obj, path), d)
        elif isinstance(obj, types.MethodType):
            self._walk(obj.__self__, "self", None, d)
            self._walk(obj.__func__, name, None, d)
        elif isinstance(obj, functools.partial):
            self._walk(obj.func, name, None, d)
            for i, v in enumerate(obj.args):
                self._walk(v, f"{name} partial argument {i}", _item_getter(obj.args, i), d)
            for k, v in obj.keywords.items():
                self._walk(v, f"{name} partial keyword {k!r}", _item_getter(obj.keywords, k), d)
        elif isinstance(obj, types.FunctionType):
            code = obj.__code__
            for var, cell in zip(code.co_freevars, obj.__closure__ or ()):
                try:
                    v = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                self._walk(v, var, _cell_getter(cell), d)
            for i, v in enumerate(obj.__defaults__ or ()):
                var = code.co_varnames[code.co_argcount - len(obj.__defaults__ or ()) + i]
                self._walk(v, f"{var} (default of {obj.__name__})", None, d)
            for k, v in (obj.__kwdefaults__ or {}).items():
                self._walk(v, f"{k} (default of {obj.__name__})", None, d)
            g = {} if _library(obj) else obj.__globals__
            for var in _global_names(code):
                if var in g:
                    self._walk(g[var], var, _item_getter(g, var), d)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj[:_MAX_ITEMS]):
                self._walk(v, f"{name}[{i}]", _item_getter(obj, i), d)
        elif isinstance(obj, dict):
            for k, v in list(obj.items())[:_MAX_ITEMS]:
                self._walk(v, f"{name}[{k!r}]", _item_getter(obj, k), d)
        elif not _library(obj):
            attrs = getattr(obj, "__dict__", None)
            if isinstance(attrs, dict):
                for n, v in list(attrs.items())[:_MAX_ITEMS]:
                    self._walk(v, f"{name}.{n}", _attr_getter(obj, n), d)

    def substitute(self, subs: Sequence[torch.Tensor]) -> _ClosureMode:
        """A mode in which F reads `subs[k]` wherever it reads the k-th closed-over tensor (the
        one found, or what its place in the closure holds now)."""
        table: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, sub in enumerate(subs):
            table[id(self.values[k])] = (self.values[k], sub)
            for get in self.getters[k]:
                try:
                    now = get()
                except (AttributeError, LookupError, ValueError):
                    continue
                if isinstance(now, torch.Tensor):
                    table[id(now)] = (now, sub)  # held: its id stays its own
        return _ClosureMode(table)

    def condition(self, F: Callable[..., Any], n_user: int) -> Callable[..., Any]:
        """`F` with one more argument, the tuple of the closed-over tensors' stand-ins."""
        def F_lifted(x: Any, *args: Any) -> Any:
            with self.substitute(args[n_user]):
                return F(x, *args[:n_user])

        F_lifted.__name__ = getattr(F, "__name__", "F")
        return F_lifted


_CONTAINERS = (list, tuple, dict)


class _ClosureMode(TorchFunctionMode):
    """Every torch function F calls gets `sub` for a tensor argument `t` where
    `table[id(t)] == (t, sub)`."""

    def __init__(self, table: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.table = table

    def _sub(self, t: Any) -> Any:
        hit = self.table.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else t

    def __torch_function__(self, func: Any, types_: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        if kwargs or any(isinstance(a, _CONTAINERS) for a in args):
            args, kwargs = _torch_pytree.tree_map_only(torch.Tensor, self._sub,
                                                       (tuple(args), dict(kwargs or {})))
        else:  # the common case, flat positional arguments
            args, kwargs = tuple(self._sub(a) for a in args), {}
        return func(*args, **kwargs)


class _GuardError(StructureError):
    """`_Guard`'s refusal (a `StructureError`): told apart from one `F` raises itself."""


class _Guard(TorchFunctionMode):
    """Refuses a tensor F reads that a `torch.func` transform wraps. Active where F is evaluated
    in the Function's forward pass, below every transform, where F's own inputs are unwrapped:
    such a tensor is one F holds in a closure that `Closure` could not find. (Not inside a
    transform that F itself runs: there its own tensors are wrapped too.)"""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __torch_function__(self, func: Any, types_: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        # Only at F's own level: a transform F runs itself (a gradient inside F) wraps its own
        # tensors, with levels that reuse those of the lowered outer transforms.
        if _ft.peek_interpreter_stack() is None:
            flat = (_torch_pytree.tree_leaves((args, kwargs))
                    if kwargs or any(isinstance(a, _CONTAINERS) for a in args) else args)
            for t in flat:
                if isinstance(t, torch.Tensor) and _ft.is_functorch_wrapped_tensor(t):
                    raise self._error(t, getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def _error(self, t: torch.Tensor, what: str) -> StructureError:
        return _GuardError(
            f"{self.name}: F reads a tensor of shape {tuple(t.shape)} and dtype {t.dtype} (in "
            f"{what}) that a torch.func transform tracks but that is not one of its arguments, "
            "and implicitdiff could not find where F holds it (it looks in closure cells, "
            "defaults, globals, bound methods, nn.Module parameters, buffers and attributes, "
            "functools.partial, lists, tuples, dicts and plain objects' attributes). Expected "
            "every tensor to differentiate (or to vmap over) to be passed as an argument, so "
            "the implicit rule can return its derivative; got a closure over it, whose "
            "derivative would be silently zero. Pass it as an argument of the solver (for an "
            "nn.Module: dict(module.named_parameters()) with torch.func.functional_call), or "
            "detach it inside F if it needs none."
        )


def _solver_reads_mapped_tensor(name: str) -> StructureError:
    return StructureError(
        f"{name}: the solver reads a tensor that torch.func.vmap maps over but that is not one "
        "of its arguments, and implicitdiff could not find where it holds it (torch: the "
        "tensor 'escaped from inside a function being vmapped'). Expected the solver to read "
        "mapped tensors from its arguments or from where F's closure holds them (the vmap "
        "rule runs it once per batch element); got a closure over one. Pass it as an "
        "argument of the solver."
    )


def _plain(x: Any) -> Any:
    """`x`'s leaves as plain tensors of no transform level, detached (a trial evaluation's
    inputs)."""
    def leaf(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = physical(t)
        return fwAD.unpack_dual(t).primal.detach() if _forward_ad_active() else t.detach()

    return _torch_pytree.tree_map(leaf, x)


def _escaped(g: Callable[..., Any], example: tuple, values: tuple) -> bool:
    """Whether `g` on plain copies of `example` (and `values`, where given) still carries a
    derivative: it read a tensor that a transform wraps (`_Guard`, at the level it watches:
    with the transforms' interpreter stack cleared, where an operation on plain tensors stays
    plain), that requires grad, or that has a forward-AD tangent."""
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    try:
        with temporarily_clear_interpreter_stack():
            trial = _plain(example) if not values else (*_plain(example), _plain(values))
            with _Guard("trial"), torch.enable_grad():
                out = g(*trial)
    except _GuardError:
        return True
    for t in _torch_pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and (
                t.requires_grad
                or (_forward_ad_active() and fwAD.unpack_dual(t).tangent is not None)):
            return True
    return False


def lift_closure(f: Callable[..., Any], example: tuple, name: str
                 ) -> tuple[Callable[..., Any], tuple]:
    """`TorchBackend.lift_closure`: the tensors `f` holds (`Closure`: closure cells, bound
    `nn.Module`s and their parameters, partials, containers) that need derivatives become
    inputs, read through `Closure.substitute`; then one trial evaluation of `f` on plain
    inputs refuses a derivative still reaching `f` from elsewhere."""
    if not differentiable_context():
        return f, ()
    closure = Closure(f)
    values = tuple(closure.values)

    def lifted(*a: Any) -> Any:
        with closure.substitute(a[-1]):
            return f(*a[:-1])

    g: Callable[..., Any] = lifted if values else f
    if _escaped(g, example, values):
        raise StructureError(
            f"{name}: the vector field reads a tensor that needs a derivative (it requires "
            "grad, a torch.func transform tracks it, or it has a forward-AD tangent) but that "
            "is not one of its arguments, and implicitdiff could not find where it holds it "
            "(it looks in closure cells, defaults, globals, bound methods, nn.Module "
            "parameters, buffers and attributes, functools.partial, lists, tuples, dicts and "
            "plain objects' attributes). This gradient mode's rule returns derivatives for "
            "its arguments only, so that tensor's would be silently wrong. Pass it as an "
            "argument (for an nn.Module: its parameters with torch.func.functional_call), "
            "detach it inside f if it needs none, or use grad='direct', which differentiates "
            "through whatever f reads.")
    return g, values


def _refuse_complex(name: str, args: tuple, closure: Closure | None) -> None:
    """A complex tensor whose derivative is asked for: refused (the implicit rule here is for
    real floating θ; its gradient would otherwise be silently missing)."""
    bad = []
    if any(isinstance(leaf, torch.Tensor) and leaf.is_complex()
           for leaf in core.tree_flatten(tuple(args))[0]):
        bad = [path for path, leaf in core.tree_leaves_with_path(tuple(args), "args")
               if isinstance(leaf, torch.Tensor) and leaf.is_complex() and _tracked(leaf)]
    if closure is not None:
        bad += [n for n, t in zip(closure.names, closure.values) if t.is_complex()]
    if bad:
        raise StructureError(
            f"{name}: a derivative is asked for through the complex tensor {bad[0]}. Expected "
            "real floating arguments (float32/float64) where derivatives flow; got a complex "
            "dtype, which the implicit rule of the torch backend does not support (its "
            "derivative would be silently missing). Pass the real and imaginary parts as two "
            "real arguments (torch.view_as_real(z) or z.real, z.imag) and build the complex "
            "value inside F and the solver."
        )


# ---- the forward solve ---------------------------------------------------------------------------

def _to_tensors(x: Any, args: tuple) -> Any:
    """NumPy results of an external solver become tensors on the arguments' device and dtype."""
    ref = [t for t in core.tree_flatten(tuple(args))[0] if isinstance(t, torch.Tensor)]
    floats = [t for t in ref if t.is_floating_point()]
    device = ref[0].device if ref else None
    dtype = None
    for t in floats:
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)

    def conv(leaf: Any) -> Any:
        if isinstance(leaf, (np.ndarray, np.generic)) and np.issubdtype(leaf.dtype, np.floating):
            t = torch.as_tensor(np.array(leaf))
            return t.to(device=device, dtype=dtype or t.dtype)
        return leaf

    return core.tree_map(conv, x)


def _det(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t


def _residual_checking_closure(problem: Problem, x: Any, args: tuple) -> Any:
    """F at detached `(x, args)`, with grad enabled, raising if the residual requires grad: then
    F reads a tensor that requires grad from its closure, whose gradient the implicit rule could
    not deliver. Returns the (detached) residual, for the residual check."""
    xd = core.tree_map(_det, x)
    ad = tuple(core.tree_map(_det, a) for a in args)
    with torch.enable_grad():
        r = problem.F(xd, *ad)
    bad = [path for path, leaf in core.tree_leaves_with_path(r, "F(x, *args)")
           if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    if bad:
        name = problem.fn.name if problem.fn is not None else "F"
        found = Closure(problem.F).names
        where = f" (found in F's closure: {', '.join(found)})" if found else ""
        raise StructureError(
            f"{name}: F uses a tensor that requires grad but is not one of its arguments{where} "
            f"(its output {bad[0]} requires grad with x and every argument detached). "
            "Expected every tensor to differentiate, such as a module's parameters, to be "
            "passed as an argument, so the implicit rule can return its gradient; got a "
            "closure over it. "
            "Pass it as an argument (for an nn.Module: dict(module.named_parameters()) with "
            "torch.func.functional_call), or detach it inside F if it needs no gradient."
        )
    return core.tree_map(_det, r)


def run_forward(problem: Problem, args: tuple, options: dict) -> tuple[Any, Any]:
    """Run the solver untraced, bring NumPy results back, check the residual."""
    fn = problem.fn
    assert fn is not None
    user = problem.user_args(args)
    closure = problem.closure
    try:
        with torch.no_grad(), (closure.substitute(args[-1]) if closure is not None
                               else contextlib.nullcontext()), capture_factorization() as published:
            x, aux = fn.run_solver(user, options)
        # a factorization the solver offers its backward pass (`implicitdiff._factored`)
        problem.factorization = published[-1] if published else None
    except RuntimeError as e:
        if problem.guard and "escaped from inside a function being vmapped" in str(e):
            raise _solver_reads_mapped_tensor(fn.name) from e
        raise
    x = _to_tensors(x, user)
    F: Callable[..., Any] | None = problem.F if closure is not None else None
    if problem.check_closure and fn.residual_tol != math.inf:
        r = _residual_checking_closure(problem, x, args)
        x_checked = x

        def residual(xx: Any, *a: Any) -> Any:  # the check reuses this evaluation of F
            return r if xx is x_checked else problem.F(xx, *a)

        F = residual
    guard = _Guard(fn.name) if problem.guard else contextlib.nullcontext()
    with torch.no_grad(), guard:
        x = _check(problem, x, args, F)
    return x, aux


def _check(problem: Problem, x: Any, args: tuple, F: Callable[..., Any] | None) -> Any:
    """`fn.check`, with leaves of x that have no elements left out of the residual (there is
    nothing to check there; the core's reductions need at least one element)."""
    fn = problem.fn
    assert fn is not None
    leaves, xdef = core.tree_flatten(x)
    keep = [i for i, leaf in enumerate(leaves)
            if not (isinstance(leaf, torch.Tensor) and leaf.numel() == 0)]
    if len(keep) == len(leaves) or fn.residual_tol == math.inf:
        return fn.check(problem.bk, x, args, F=F)
    Fu = F or problem.F
    r = core.tree_flatten(Fu(x, *args))[0]
    if len(r) != len(leaves) or any(
            not isinstance(ri, torch.Tensor) or ri.shape != xi.shape or ri.dtype != xi.dtype
            for ri, xi in zip(r, leaves)):
        raise StructureError(
            f"{fn.name}: F(x, *args) must return leaves with the shapes and dtypes of x "
            f"({[(tuple(t.shape), t.dtype) for t in leaves]}); got "
            f"{[(tuple(getattr(t, 'shape', ())), getattr(t, 'dtype', type(t))) for t in r]}. "
            "Return a residual shaped like x."
        )
    if not keep:
        return x

    def full(xk: Sequence[Any]) -> list[Any]:
        out = list(leaves)
        for i, leaf in zip(keep, xk):
            out[i] = leaf
        return out

    def F_kept(xk: Any, *a: Any) -> list[Any]:
        rr = core.tree_flatten(Fu(core.tree_unflatten(xdef, full(xk)), *a))[0]
        return [rr[i] for i in keep]

    xk = fn.check(problem.bk, [leaves[i] for i in keep], args, F=F_kept)
    return core.tree_unflatten(xdef, full(xk))


def _transforms_active() -> bool:
    from torch._C._functorch import peek_interpreter_stack  # pyright: ignore

    return peek_interpreter_stack() is not None


def _forward_ad_active() -> bool:
    return getattr(fwAD, "_current_level", -1) >= 0


def derivative_requested() -> bool:
    """Forward AD, or a `torch.func` derivative transform (`grad`, `jvp`; not `vmap` alone),
    is active."""
    from torch._C._functorch import TransformType  # pyright: ignore
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return _forward_ad_active() or any(
        i.key() in (TransformType.Grad, TransformType.Jvp)
        for i in retrieve_all_functorch_interpreters())


def differentiable_context(recording: bool = True) -> bool:
    """Whether derivatives of what is computed now may be asked for: a `torch.func` transform
    or forward AD is active, or (with `recording`) grad mode records a graph."""
    return (recording and torch.is_grad_enabled()) or _transforms_active() \
        or _forward_ad_active()


def _call(bk: Any, fn: ImplicitFunction, args: tuple, options: dict) -> Any:
    """`fn(*args, **options)` for tensors: untraced when nothing needs a derivative, else through
    `ImplicitFn`. Runs eagerly under `torch.compile` (a graph break). Under a `torch.func`
    transform or forward AD, tensors F reads from its closure become inputs (`Closure`)."""
    transforms = _transforms_active()
    forward_ad = _forward_ad_active()
    closure = Closure(fn.F, fn.solver) if transforms or forward_ad else None
    _refuse_complex(fn.name, args, closure)
    if closure is not None and closure.values:
        problem = Problem(closure.condition(fn.F, len(args)), fn,
                          (*args, tuple(closure.values)), options, bk=bk)
        problem.n_user, problem.closure = len(args), closure
    else:
        problem = Problem(fn.F, fn, args, options, bk=bk)
    problem.guard = transforms
    all_args = args if problem.closure is None else (*args, tuple(problem.closure.values))
    ths = problem.tensors(all_args)
    problem.check_closure = torch.is_grad_enabled() and not transforms
    traced = transforms or forward_ad or any(
        t.requires_grad for j, t in enumerate(ths) if problem.float_th[j])
    if not traced:
        x, aux = run_forward(problem, args, options)
        return (x, aux) if fn.has_aux else x
    outs = ImplicitFn.apply(problem, *ths, *problem.option_tensors(options))
    x = core.tree_unflatten(problem.x_def, list(outs[:problem.n_x]))
    if fn.has_aux:
        return x, problem.join_aux(outs[problem.n_x:])
    return x


call = cast(Callable[[Any, ImplicitFunction, tuple, dict], Any], torch.compiler.disable(_call))
