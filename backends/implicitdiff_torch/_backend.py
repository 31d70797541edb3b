"""The PyTorch backend: `TorchBackend`, `TorchLinearization`, and the array namespace with the
workarounds the core's dense solvers need on this torch build."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch

from implicitdiff import backend as core
from implicitdiff.backend import (
    Backend,
    ImplicitDiffError,
    ImplicitFunction,
    StructureError,
    collecting,
    nan_where,
    symmetric,
)
from implicitdiff.backend import emit as _emit

from . import _host as _host_side
from ._function import (
    LinSolve,
    MatVec,
    Operator,
    SolveSpec,
    _batched,
    derivative_requested,
    differentiable_context,
    func_vjp,
    leaves_aligned,
)
from ._function import call as _call
from ._function import lift_closure as _lift_closure

# Batched LU (`torch.linalg.solve`, `lu_factor`, `inv`) in the CPU build of torch 2.13 with MKL
# and more than one thread fails for n >= 150 (hangs at n = 150; above, MKL prints "Parameter 6
# was incorrect on entry to DLASWP" to stdout and torch raises about invalid pivots). Unbatched
# LU is fine, so batched CPU solves at or above this size go one matrix at a time.
_BATCHED_LU_MAX = 127
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_LinAlgError: type[Exception] = torch.linalg.LinAlgError  # pyright: ignore[reportPrivateImportUsage]


def _upcast(*ts: torch.Tensor) -> tuple[list[torch.Tensor], torch.dtype | None]:
    """Half-precision dtypes have no LAPACK kernels: solve in float32, cast back."""
    dt = ts[0].dtype
    if dt in _LOW_PRECISION:
        return [t.float() for t in ts], dt
    return list(ts), None


class _Linalg:
    """`xp.linalg` for torch with per-element failure and the batched-LU workaround."""

    def __init__(self, base: Any):
        self._base = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    @staticmethod
    def vector_norm(x: torch.Tensor, axis: Any = None, keepdims: bool = False, ord: Any = 2
                    ) -> torch.Tensor:
        return torch.linalg.vector_norm(x, ord, dim=axis, keepdim=keepdims)

    def solve(self, M: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        (M, b), back = _upcast(M, b)
        n = M.shape[-1]
        batch = M.shape[:-2]
        if M.ndim > 2 and M.device.type == "cpu" and n > _BATCHED_LU_MAX and batch.numel() > 1:
            Mf = M.reshape(-1, n, n)
            bf = torch.broadcast_to(b, (*batch, *b.shape[-2:])).reshape(-1, *b.shape[-2:])
            with _one_thread():
                xs = [_solve_one(Mf[i], bf[i]) for i in range(Mf.shape[0])]
            x = torch.stack(xs).reshape(*batch, *b.shape[-2:])
        else:
            x = _solve_one(M, b)
        return x if back is None else x.to(back)

    def cholesky(self, M: torch.Tensor) -> torch.Tensor:
        (M,), back = _upcast(M)
        L, info = torch.linalg.cholesky_ex(M)
        bad = info != 0
        if bool(bad.any()):
            if M.ndim == 2:
                raise _LinAlgError("cholesky: the matrix is not positive definite")
            L = torch.where(bad[..., None, None], torch.full_like(L, float("nan")), L)
        return L if back is None else L.to(back)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for a loop of unbatched CPU LU solves: with two threads this torch
    build's MKL LU of a 226×226 matrix took 15-30 ms instead of 0.5 (a batch of 32: 0.5-0.9 s
    instead of 11-42 ms, on a 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _solve_one(M: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LU solve; an element whose factorization fails becomes NaN (the others are kept)."""
    x, info = torch.linalg.solve_ex(M, b)
    bad = info != 0
    if bool(bad.any()):
        x = torch.where(bad.reshape(*bad.shape, 1, 1), torch.full_like(x, float("nan")), x)
    return x


class _Namespace:
    """The array-API namespace for torch, with `linalg` replaced by `_Linalg`, and `where` and
    `matmul` by torch's own (the core's operands already share a dtype; the compat wrappers'
    promotion logic costs more than the operation on small arrays)."""

    def __init__(self, base: Any):
        self._base = base
        self.linalg = _Linalg(base.linalg)
        self.where = torch.where
        self.matmul = torch.matmul

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._base, name)
        setattr(self, name, value)  # cached: later lookups skip __getattr__
        return value


_namespace: _Namespace | None = None


def _float_leaf(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    return type(x) is float


TorchLinearization = Operator
"""The torch backend's `Linearization` (`TorchBackend.linearize`): products from `torch.func`."""


class TorchBackend(Backend):
    """The backend for `torch.Tensor`: the implicit rule is a `torch.autograd.Function`."""

    name = "torch"
    framework = "torch"
    linalg_errors = (_LinAlgError,)

    def owns(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def is_float(self, x: Any) -> bool:
        return _float_leaf(x)

    def namespace(self, *arrays: Any) -> Any:
        global _namespace
        if _namespace is None:
            import array_api_compat.torch as base

            _namespace = _Namespace(base)
        return _namespace

    def stop_gradient(self, x: Any) -> Any:
        return x.detach() if isinstance(x, torch.Tensor) else x

    def bounded_while_loop(self, cond: Callable[[Any], Any],
                           body: Callable[[Any], tuple[Any, Any]], init: Any,
                           max_steps: int) -> tuple[Any, Any]:
        # Under torch.func.vmap the predicate is batched: the loop runs while it holds for any
        # element, looked at below the transforms (a body whose finished elements stand still,
        # as odeint's, then gives each element its own result).
        return super().bounded_while_loop(
            lambda s: torch.any(_host_side.physical(cond(s))), body, init, max_steps)

    def known_all(self, mask: Any) -> bool:
        # On an accelerator, looking is a host synchronization that stalls the queue of kernels;
        # the masked selects it would save are cheap there. Only CPU tensors look.
        if mask.device.type != "cpu":
            return False
        # under torch.func.vmap the answer differs per mapped element: not known as one bool
        if _batched(mask):
            return False
        return bool(mask.all())

    def ring_write(self, hist: Any, slot: Any, row: Any, mask: Any, everyone: bool) -> Any:
        if torch.is_grad_enabled() and (hist.requires_grad or row.requires_grad):
            # a solver run on the tape (differentiated through its iterations): no in-place
            return super().ring_write(hist, slot, row, mask, everyone)
        # in place: a write of one row per batch element, not a select over the whole buffer
        if isinstance(slot, int):
            hist[..., slot, :] = row if everyone else torch.where(mask, row, hist[..., slot, :])
            return hist
        idx = slot.long()[..., None].expand(*row.shape[:-1], 1, row.shape[-1])
        new = row[..., None, :]
        if not everyone:
            new = torch.where(mask[..., None], new, hist.gather(-2, idx))
        return hist.scatter_(-2, idx, new)

    def materialize(self, matvec: Callable[[Any], Any], b: Any) -> Any:
        whole = getattr(matvec, "materialize", None)
        M = whole(b) if whole is not None else None
        if M is not None:  # one batched product (the backend's own first-order products)
            return M
        n = b.shape[-1]
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        cols = [matvec(eye[j].expand(b.shape)) for j in range(n)]
        return torch.stack(cols, dim=-1)

    def solve_triangular(self, L: Any, b: Any, *, lower: bool) -> Any:
        (L, b), back = _upcast(L, b)
        x = torch.linalg.solve_triangular(L, b[..., None], upper=not lower)[..., 0]
        return x if back is None else x.to(back)

    # ---- failures and diagnostics: host data, no device sync unless needed ------------------
    def handle_failure(self, value: Any, ok: Any, on_failure: str,
                       make_error: Callable[..., ImplicitDiffError], *data: Any) -> Any:
        if on_failure == "nan":  # no host sync: a where on the flags
            return nan_where(self, value, ok)
        if ok.device.type == "meta":  # shapes only, no values to check (shape propagation)
            return value
        # under torch.func.vmap the flags are batched: look at every element at once
        if bool(torch.all(_host_side.physical(ok))):
            return value
        err = make_error(*[_host_side.to_host_leaf(d) for d in data])
        if on_failure == "raise":
            raise err
        warnings.warn(str(err), RuntimeWarning, stacklevel=2)
        return value

    def record(self, make_record: Callable[..., Any], *data: Any) -> None:
        if collecting() and not any(isinstance(d, torch.Tensor) and d.device.type == "meta"
                                    for d in data):
            _emit(make_record(*[_host_side.to_host_leaf(d) for d in data]))

    def linearize(self, F, x, args, *, derivatives=None, tags=frozenset()):
        return Operator.at(self, F, x, tuple(args), tags)

    def linear_solve(self, solver, matvec, b, *, rmatvec, tags, check, check_transpose,
                     linearization=None, transpose=False):
        # Where the result must be differentiable (a transform, forward AD, or a graph being
        # recorded), the solve is the autograd.Function `LinSolve`, whose derivatives are again
        # solves at the linearization's point; otherwise the core's solve runs as it is.
        lin = linearization
        if isinstance(lin, Operator) and not lin.fast and _differentiable(b, lin):
            checks = {transpose: check, not transpose: check_transpose}
            spec = SolveSpec(lin.p, solver, tags, checks)
            # the tolerance the core chose from the forward (a tensor computed at this
            # transform level) goes in as an input, so vmap moves its mapped dimension too
            rtol = getattr(solver, "_rtol_forward", None)
            if isinstance(rtol, torch.Tensor):
                rtol = rtol.detach()
            return LinSolve.apply(spec, transpose, b, rtol, *lin.xs, *lin.ths)
        if isinstance(lin, Operator) and lin.fast and rmatvec is not None:
            # products that take several vectors at once
            sym = symmetric in tags
            matvec, rmatvec = (MatVec(matvec, True), MatVec(rmatvec, sym)) if transpose else \
                (MatVec(matvec, sym), MatVec(rmatvec, True))
        return check(*solver.solve(matvec, b, rmatvec=rmatvec, tags=tags, backend=self))

    def call(self, fn: ImplicitFunction, args: tuple, options: dict) -> Any:
        return _call(self, fn, args, options)

    # ---- transforms: torch.func ---------------------------------------------------------------
    def jvp(self, f, primals, tangents):
        has_aux = isinstance(f, ImplicitFunction) and f.has_aux
        leaves, treedef = core.tree_flatten(tuple(primals))
        tleaves = leaves_aligned(tuple(tangents), treedef)
        idx = [i for i, (p, t) in enumerate(zip(leaves, tleaves))
               if _float_tensor(p) and t is not None]
        g = _rebuild(f, leaves, treedef, idx)
        sub_p = tuple(leaves[i] for i in idx)
        sub_t = tuple(_as_tangent(tleaves[i], leaves[i]) for i in idx)
        if has_aux:
            out, out_dot, aux = cast(tuple, torch.func.jvp(g, sub_p, sub_t, has_aux=True))
            return (out, aux), (out_dot, None)
        return torch.func.jvp(g, sub_p, sub_t)

    def vjp(self, f, primals, argnums):
        has_aux = isinstance(f, ImplicitFunction) and f.has_aux
        wanted = set(range(len(primals)) if argnums is None else argnums)
        leaves, treedef = core.tree_flatten(tuple(primals))
        owner = [i for i, p in enumerate(primals) for _ in core.tree_flatten(p)[0]]
        idx = [j for j, leaf in enumerate(leaves) if owner[j] in wanted and _float_tensor(leaf)]
        g = _rebuild(f, leaves, treedef, idx)
        sub_p = tuple(leaves[j] for j in idx)
        if has_aux:
            out, inner, aux = cast(tuple, torch.func.vjp(g, *sub_p, has_aux=True))
            out = (out, aux)
        else:
            out, inner = func_vjp(g, *sub_p)

        def vjp_fn(cotangent: Any) -> tuple:
            grads = inner(cotangent) if sub_p else ()
            res: list[Any] = [None] * len(leaves)
            for j, g_ in zip(idx, grads):
                res[j] = g_
            return tuple(core.tree_unflatten(treedef, res))

        return out, vjp_fn

    def jacobian(self, f, primals, argnums):
        arg = primals[argnums]
        if not (isinstance(arg, torch.Tensor) and arg.is_floating_point()):
            raise StructureError(
                f"jacobian: expected argument {argnums} to be a floating tensor, got "
                f"{type(arg).__name__} {getattr(arg, 'dtype', '')}. For pytree arguments use "
                "idf.jvp/idf.vjp or torch.func.jacrev."
            )
        has_aux = isinstance(f, ImplicitFunction) and f.has_aux
        g = (lambda *p: f(*p)[0]) if has_aux else f
        return torch.func.jacrev(g, argnums=argnums % len(primals))(*primals)

    def custom_vjp(self, fwd, bwd, primals, *, unsupported, jvp=None):
        leaves, treedef = core.tree_flatten(tuple(primals))
        idx = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        if any(_batched(leaves[i]) for i in idx):  # torch.func.vmap: the rule's loops decide
            raise unsupported("vmap")              # on values, which a vmap rule cannot
        spec = _VjpSpec(fwd, bwd, leaves, treedef, idx, unsupported, jvp)
        outs = _CustomVjp.apply(spec, *[leaves[i] for i in idx])
        return core.tree_unflatten(spec.out_def, list(outs[:spec.n_out]))

    def may_differentiate(self, tree):
        if derivative_requested():
            return True
        return torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in core.tree_flatten(tree)[0])

    def lift_closure(self, f, example, *, name):
        return _lift_closure(f, example, name)

    def loop_vjp(self, f, primals):
        if differentiable_context():  # a transform or a recorded graph: torch.func's vjp
            return self.vjp(f, primals, None)
        leaves, treedef = core.tree_flatten(tuple(primals))
        idx = [j for j, leaf in enumerate(leaves) if _float_tensor(leaf)]
        full = list(leaves)
        with torch.enable_grad():
            sub = [leaves[j].detach().requires_grad_() for j in idx]
            for j, s_ in zip(idx, sub):
                full[j] = s_
            out = f(*core.tree_unflatten(treedef, full))

        def vjp_fn(cotangent: Any) -> tuple:
            outs = core.tree_flatten(out)[0]
            cts = core.tree_flatten(cotangent)[0]
            pairs = [(o, c) for o, c in zip(outs, cts)
                     if isinstance(o, torch.Tensor) and o.requires_grad and c is not None]
            grads: Sequence[Any] = [None] * len(sub)
            if pairs and sub:
                grads = torch.autograd.grad([o for o, _ in pairs], sub, [c for _, c in pairs],
                                            allow_unused=True)
            res: list[Any] = [None] * len(leaves)
            for j, g, s_ in zip(idx, grads, sub):
                res[j] = torch.zeros_like(s_) if g is None else g
            return tuple(core.tree_unflatten(treedef, res))

        return core.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out), \
            vjp_fn

    # ---- autodiff of user functions, host arrays (see implicitdiff.Backend) ------------------
    autodiff = True

    def grad(self, f, x, args, *, who="grad"):
        return torch.func.grad(f)(x, *args)

    def residual_grad(self, fun, x, args, *, who="residual_grad"):
        # J^T r as the gradient of ½‖r‖², all inside one transform (a vjp_fn called after
        # torch.func.vjp returns works on tensors of a level already left, which the closure
        # guard would take for a closed-over tensor)
        def half_sq(z: Any) -> Any:
            r = fun(z, *args)
            return 0.5 * sum((leaf * leaf).sum() for leaf in self.tree_flatten(r)[0])

        return torch.func.grad(half_sq)(x)

    def to_host(self, tree):
        leaves, treedef = self.tree_flatten(tree)
        return self.tree_unflatten(treedef, [_host_side.to_host_leaf(a) for a in leaves])

    def from_host(self, tree, *, like=None, device=None):
        leaves, treedef = self.tree_flatten(tree)
        return self.tree_unflatten(treedef, _host_side.from_host_leaves(leaves, like, device))

    def host_array(self, x, *, like=None):
        return _host_side.host_array(x, like)

    def host_function(self, f, theta, *, like=None, scalar=False):
        return _host_side.host_function(f, theta, like, scalar)

    def host_derivative(self, f, theta, kind, *, like=None):
        return _host_side.host_derivative(f, theta, kind, like)


def _differentiable(b: torch.Tensor, lin: Operator) -> bool:
    """Whether a linear solve's result must carry derivatives."""
    if differentiable_context(recording=False):
        return True
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (b, *lin.xs, *lin.ths))


def _float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _rebuild(f: Callable[..., Any], leaves: list, treedef: Any, idx: Sequence[int]
             ) -> Callable[..., Any]:
    """`f` as a function of the leaves at `idx` (the other leaves fixed)."""
    def g(*sub: Any) -> Any:
        full = list(leaves)
        for i, s_ in zip(idx, sub):
            full[i] = s_
        return f(*core.tree_unflatten(treedef, full))

    return g


def _as_tangent(t: Any, p: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(dtype=p.dtype, device=p.device)
    return torch.full_like(p, float(t))


def _in_forward_ad() -> bool:
    """Inside a `torch.autograd.forward_ad.dual_level` and no `torch.func` transform. An
    `autograd.Function`'s forward-mode rule called there for dual tensors cannot run forward
    mode itself (it does not nest: `torch.func.jvp` refuses, and dual tensors made inside the
    rule silently carry no tangent), so a rule that needs it refuses."""
    import torch.autograd.forward_ad as fwAD
    from torch._C import _functorch as _ft  # pyright: ignore

    return (getattr(fwAD, "_current_level", -1) >= 0
            and _ft.get_dynamic_layer_stack_depth() == 0)


class _VjpSpec:
    """One `TorchBackend.custom_vjp` call: the core's `fwd`/`bwd`, where the tensors sit among
    the primals' leaves, and the structures of the output and residuals (set by `forward`)."""

    def __init__(self, fwd: Callable[..., Any], bwd: Callable[..., Any], leaves: list,
                 treedef: Any, idx: list[int], unsupported: Callable[[str], Exception],
                 jvp: Callable[[tuple, tuple], Any] | None = None):
        self.fwd, self.bwd, self.leaves, self.treedef = fwd, bwd, leaves, treedef
        self.idx, self.unsupported, self.jvp = idx, unsupported, jvp
        self.out_def: Any = None
        self.res_def: Any = None
        self.n_out = 0
        self.out_meta: list[tuple] = []
        self.res_meta: list[tuple] = []

    def primals(self, tensors: Sequence[torch.Tensor]) -> tuple:
        full = list(self.leaves)
        for i, t in zip(self.idx, tensors):
            full[i] = t
        return tuple(core.tree_unflatten(self.treedef, full))

    def cotangents(self, cts: tuple) -> list[Any]:
        """The cotangents `bwd` returned (one pytree or None per primal, None at leaves), as
        one entry per tensor input."""
        flat: list[Any] = []
        for p, ct in zip(core.tree_unflatten(self.treedef, list(range(len(self.leaves)))),
                         cts):
            n = core.tree_flatten(p)[1].num_leaves
            got = [None] * n if ct is None else _leaves_with_none(ct)
            flat.extend(got if len(got) == n else [None] * n)
        return [flat[i] for i in self.idx]


def _leaves_with_none(tree: Any) -> list[Any]:
    if tree is None:
        return [None]
    if isinstance(tree, (tuple, list)):
        return [leaf for t in tree for leaf in _leaves_with_none(t)]
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in _leaves_with_none(tree[k])]
    return [tree]


class _CustomVjp(torch.autograd.Function):
    """`TorchBackend.custom_vjp`: the forward runs the core's `fwd` untraced and returns the
    residuals as extra, non-differentiable outputs, kept on `ctx` as the list `bwd` consumes
    (so the states it pops are freed during the backward pass)."""

    @staticmethod
    def forward(spec: _VjpSpec, *tensors: torch.Tensor) -> tuple:  # pyright: ignore[reportIncompatibleMethodOverride]
        out, res = spec.fwd(*spec.primals(tensors))
        out_leaves, spec.out_def = core.tree_flatten(out)
        res_leaves, spec.res_def = core.tree_flatten(res)
        spec.n_out = len(out_leaves)
        spec.out_meta = [(t.shape, t.dtype, t.device) for t in out_leaves]
        spec.res_meta = [(t.shape, t.dtype, t.device) for t in res_leaves]
        # an input returned as is (the last stored state of a short checkpointed solve) goes
        # out as a view: torch.func refuses an input both returned and saved for backward
        ins = {id(t) for t in tensors}
        return tuple(t.view_as(t) if id(t) in ins else t for t in (*out_leaves, *res_leaves))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        spec = inputs[0]
        ctx.spec = spec
        ctx.save_for_backward(*inputs[1:])
        if spec.jvp is not None:
            ctx.save_for_forward(*inputs[1:])
        res = output[spec.n_out:]
        if res:
            ctx.mark_non_differentiable(*res)
        ctx.residuals = core.tree_unflatten(spec.res_def, list(res))

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:  # pyright: ignore[reportIncompatibleMethodOverride]
        spec: _VjpSpec = ctx.spec
        out_bar = [torch.zeros(s, dtype=d, device=dev) if g is None else g
                   for g, (s, d, dev) in zip(grads[:spec.n_out], spec.out_meta)]
        cts = spec.bwd(spec.primals(ctx.saved_tensors), ctx.residuals,
                       core.tree_unflatten(spec.out_def, out_bar))
        flat = spec.cotangents(tuple(cts))
        if torch.is_grad_enabled():  # create_graph, or a torch.func transform: not twice
            live = [i for i, g in enumerate(flat) if isinstance(g, torch.Tensor)]
            wrapped = _NoSecondOrder.apply(spec, *[flat[i] for i in live])
            for i, g in zip(live, wrapped):
                flat[i] = g
        return (None, *flat)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        spec: _VjpSpec = ctx.spec
        if spec.jvp is None:
            raise spec.unsupported("forward")
        if _in_forward_ad():
            raise spec.unsupported("forward_ad")
        saved = ctx.saved_tensors
        dots = [torch.zeros_like(p) if t is None else t for p, t in zip(saved, tangents[1:])]
        out_dot = core.tree_flatten(spec.jvp(spec.primals(saved), spec.primals(dots)))[0]
        # integer outputs (counts) and the residuals: not differentiable
        out_dot = [t if d.is_floating_point else None
                   for t, (_, d, _) in zip(out_dot, spec.out_meta)]
        return (*out_dot, *[None] * len(spec.res_meta))


class _NoSecondOrder(torch.autograd.Function):
    """The identity on the cotangents `_CustomVjp.backward` returns while a graph is recorded
    (`create_graph=True`, `torch.func.grad`): differentiating them raises the core's error
    instead of giving a silently wrong second derivative."""

    @staticmethod
    def forward(spec: _VjpSpec, *gs: torch.Tensor) -> tuple:  # pyright: ignore[reportIncompatibleMethodOverride]
        return tuple(g.view_as(g) for g in gs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.spec = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:  # pyright: ignore[reportIncompatibleMethodOverride]
        raise ctx.spec.unsupported("second")

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise ctx.spec.unsupported("second")


backend = TorchBackend()
"""The backend instance for PyTorch tensors, registered with implicitdiff."""
