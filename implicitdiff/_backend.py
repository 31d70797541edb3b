"""The backend protocol and the registry that picks a backend from the type of the arrays.

A backend tells the core how to flatten pytrees, run loops (`while_loop`), linearize $F$ with
its framework's autodiff, register the implicit rule where its framework finds it, and report
failures. Lookup never imports a framework: a backend is considered only when its framework's
top-level module is already in `sys.modules`.
"""

from __future__ import annotations

import abc
import importlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import _tree
from ._errors import BackendNotFoundError, ImplicitDiffError

# name -> (framework module that must already be imported, "module:attribute" of the backend)
_BUILTINS: dict[str, tuple[str, str]] = {
    "numpy": ("numpy", "implicitdiff_numpy:backend"),
    "jax": ("jax", "implicitdiff_jax:backend"),
    "torch": ("torch", "implicitdiff_torch:backend"),
}
ENTRY_POINT_GROUP = "implicitdiff.backends"

_lock = threading.Lock()
_table: dict[str, tuple[str, str | Backend]] = dict(_BUILTINS)
_loaded: dict[str, Backend] = {}
_entry_points_read = False


class Linearization(abc.ABC):
    """Products with $A = \\partial_x F(x^*, \\theta)$, $A^\\top$, $B = \\partial_\\theta F$ and
    $B^\\top$ at one point, on pytrees shaped like `x` (for $A$, $A^\\top$, the output of $B$) and
    like `args` (the input of $B$, the output of $B^\\top$).

    `method` names where the products come from ("autodiff", "user", "complex-step",
    "central-difference"), for the diagnostics.
    """

    method: str = "autodiff"

    @abc.abstractmethod
    def A(self, v: Any) -> Any:
        """$\\partial_x F \\, v$."""

    @abc.abstractmethod
    def AT(self, u: Any) -> Any:
        """$\\partial_x F^\\top u$."""

    @abc.abstractmethod
    def B(self, args_dot: tuple) -> Any:
        """$\\partial_\\theta F \\, \\dot\\theta$, `args_dot` a tuple like `args`."""

    @abc.abstractmethod
    def BT(self, u: Any, argnums: Sequence[int] | None = None) -> tuple:
        """$\\partial_\\theta F^\\top u$, a tuple like `args` (None where no gradient)."""


class Backend(abc.ABC):
    """What a framework provides to the core. Subclass it to add a framework.

    Required: `name`, `framework`, `owns`, `linearize`, `call`. The rest has working defaults for
    eager frameworks (Python loops, the core's own pytrees).
    """

    name: str = ""
    framework: str = ""
    linalg_errors: tuple[type[BaseException], ...] = ()

    # ---- arrays -------------------------------------------------------------------------------
    @abc.abstractmethod
    def owns(self, x: Any) -> bool:
        """Whether `x` is an array of this backend's framework."""

    def namespace(self, *arrays: Any) -> Any:
        """The array-API namespace for `arrays`."""
        import array_api_compat

        return array_api_compat.array_namespace(*arrays)

    def is_float(self, x: Any) -> bool:
        """Whether leaf `x` is a real floating array or Python float (gets a derivative)."""
        if isinstance(x, bool) or isinstance(x, int):
            return False
        if isinstance(x, float):
            return True
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            return False
        try:
            xp = self.namespace(x)
            return bool(xp.isdtype(dtype, "real floating"))
        except (TypeError, ValueError):
            return False

    # ---- pytrees ------------------------------------------------------------------------------
    def tree_flatten(self, tree: Any) -> tuple[list[Any], Any]:
        """Leaves and structure of a pytree."""
        return _tree.tree_flatten(tree)

    def tree_unflatten(self, treedef: Any, leaves: Sequence[Any]) -> Any:
        """Inverse of `tree_flatten`."""
        return _tree.tree_unflatten(treedef, list(leaves))

    def tree_leaves_with_path(self, tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
        """Leaves with readable key paths, for error messages."""
        return _tree.tree_leaves_with_path(tree, prefix)

    # ---- control flow -------------------------------------------------------------------------
    def while_loop(self, cond: Callable[[Any], Any], body: Callable[[Any], Any], init: Any) -> Any:
        """`while cond(state): state = body(state)`; `lax.while_loop` under JAX."""
        state = init
        while bool(cond(state)):
            state = body(state)
        return state

    def known_all(self, mask: Any) -> bool:
        """Whether every entry of the boolean array `mask` is known, now, to be true.

        Eager backends look (one host synchronization); tracing backends (JAX) return False.
        The solvers use it to skip masked selects that would be the identity: a False answer
        is always safe, it only costs the select."""
        return bool(self.namespace(mask).all(mask))

    def ring_write(self, hist: Any, slot: Any, row: Any, mask: Any, everyone: bool) -> Any:
        """A solver's history buffer with `hist[..., slot, :] = row` for the batch elements where
        `mask`; returns the new buffer. Shapes: `hist` `(..., m, n)`, `slot` `(..., 1)` (an
        integer array) or a Python int (the same slot for every element), `row` `(..., n)`,
        `mask` `(..., 1)`; `everyone`: `mask` is known to be all true.

        This default is functional, a masked select over the whole buffer (what JAX compiles
        into an in-place update). Eager backends may write into `hist` in place instead: the
        solvers own their buffers and never read an old version after the write."""
        xp = self.namespace(hist)
        m = hist.shape[-2]
        slots = xp.reshape(xp.arange(m, device=_device(hist)), (m, 1))
        at = slots == (slot if isinstance(slot, int) else xp.astype(slot, slots.dtype)[..., None])
        if not everyone:
            at = at & mask[..., None]
        return xp.where(at, row[..., None, :], hist)

    def materialize(self, matvec: Callable[[Any], Any], b: Any) -> Any:
        """The matrix $M$ with $M e_j$ = `matvec(e_j)`, batched like `b` (shape `(..., n, n)`)."""
        xp = self.namespace(b)
        n = b.shape[-1]
        eye = xp.eye(n, dtype=b.dtype, device=_device(b))
        cols = [matvec(xp.broadcast_to(eye[j, :], b.shape)) for j in range(n)]
        return xp.stack(cols, axis=-1)

    def solve_triangular(self, L: Any, b: Any, *, lower: bool) -> Any:
        """Solve $L x = b$ for triangular `L` (`b` of shape `(..., n)`)."""
        xp = self.namespace(L, b)
        return xp.linalg.solve(L, b[..., None])[..., 0]

    # ---- failures and diagnostics --------------------------------------------------------------
    def handle_failure(self, value: Any, ok: Any, on_failure: str,
                       make_error: Callable[..., ImplicitDiffError], *data: Any) -> Any:
        """Apply `on_failure` where `ok` is false: raise `make_error(*data)`, warn, or fill the
        failed entries of `value` with NaN. `ok` is a boolean array (one flag per batch element)."""
        xp = self.namespace(ok)
        if bool(xp.all(ok)):
            return value
        if on_failure == "raise":
            raise make_error(*data)
        if on_failure == "warn":
            warnings.warn(str(make_error(*data)), RuntimeWarning, stacklevel=4)
            return value
        return nan_where(self, value, ok)

    def record(self, make_record: Callable[..., Any], *data: Any) -> None:
        """Hand a diagnostics record to the active `idf.diagnostics()` collectors."""
        from ._diagnostics import _emit

        _emit(make_record(*data))

    # ---- differentiation ---------------------------------------------------------------------
    @abc.abstractmethod
    def linearize(self, F: Callable[..., Any], x: Any, args: tuple, *,
                  derivatives: Any = None, tags: frozenset = frozenset()) -> Linearization:
        """Products with $\\partial_x F$ and $\\partial_\\theta F$ at `(x, args)`."""

    @abc.abstractmethod
    def call(self, fn: Any, args: tuple, options: dict) -> Any:
        """Call the decorated solver `fn` (an `ImplicitFunction`) so that this framework's autodiff
        sees the implicit rule."""

    def linear_solve(self, solver: Any, matvec: Callable, b: Any, *, rmatvec: Callable | None,
                     tags: frozenset, check: Callable[[Any, Any], Any],
                     check_transpose: Callable[[Any, Any], Any],
                     linearization: Linearization | None = None,
                     transpose: bool = False) -> Any:
        """Solve $A x = b$ with `solver` and return `check(x, info)`.

        `check` records the diagnostics and applies `on_failure`; `check_transpose` does the same
        for a solve with $A^\\top$, for backends (JAX) that register the transpose solve so
        reverse mode can run it later. `linearization` is the `Linearization` whose products
        `matvec` and `rmatvec` are, and `transpose` says whether `matvec` is the product with
        $A^\\top$ (a VJP) rather than $A$ (a JVP): backends whose autodiff differentiates the
        solve itself (PyTorch) rebuild the products from it at other points.
        """
        return check(*solver.solve(matvec, b, rmatvec=rmatvec, tags=tags, backend=self))

    def jvp(self, f: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        """Forward-mode derivative of `f` (see `implicitdiff.jvp`)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement jvp")

    def vjp(self, f: Callable, primals: tuple, argnums: Sequence[int] | None) -> tuple[Any, Any]:
        """Reverse-mode derivative of `f` (see `implicitdiff.vjp`)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement vjp")

    def jacobian(self, f: Callable, primals: tuple, argnums: int) -> Any:
        """Jacobian of `f` in argument `argnums` (see `implicitdiff.jacobian`)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement jacobian")

    def __repr__(self) -> str:
        return f"<implicitdiff backend {self.name!r}>"


def _device(x: Any) -> Any:
    import array_api_compat

    return array_api_compat.device(x)


def nan_where(bk: Backend, value: Any, ok: Any) -> Any:
    """Replace the entries of every floating leaf of `value` by NaN where `ok` is false.

    `ok` has the batch shape of the problem (a scalar for an unbatched one); it broadcasts
    against the leading dimensions of each leaf.
    """
    leaves, treedef = bk.tree_flatten(value)
    out = []
    for leaf in leaves:
        if not bk.is_float(leaf) or not hasattr(leaf, "dtype"):
            out.append(leaf)
            continue
        xp = bk.namespace(leaf, ok)
        mask = ok
        while mask.ndim < leaf.ndim:
            mask = mask[..., None]
        nan = xp.asarray(float("nan"), dtype=leaf.dtype, device=_device(leaf))
        out.append(xp.where(mask, leaf, nan))
    return bk.tree_unflatten(treedef, out)


# ---- the registry ------------------------------------------------------------------------------

def register_backend(name: str, backend: Backend | str, *, framework: str | None = None) -> None:
    """Register a backend for a framework.

    **Arguments:**

    - `name`: the backend's name, as `list_backends()` shows it.
    - `backend`: a `Backend` instance, or `"module:attribute"` naming one, imported on first use.
    - `framework`: the top-level module of the framework (`"cupy"`); the backend is only
      considered once that module is in `sys.modules`. Defaults to `backend.framework`.

    Third-party packages can instead declare an entry point in the `implicitdiff.backends` group,
    `name = "package.module:backend"`, with the entry point's name being the framework module.
    """
    if isinstance(backend, Backend):
        fw = framework or backend.framework
        if not fw:
            raise ImplicitDiffError(
                f"register_backend({name!r}): expected the framework's module name, got none. "
                "Pass framework='modname' or set the backend's `framework` attribute."
            )
        with _lock:
            _table[name] = (fw, backend)
            _loaded[name] = backend
        return
    if not isinstance(backend, str) or ":" not in backend:
        raise ImplicitDiffError(
            f"register_backend({name!r}): expected a Backend instance or 'module:attribute', "
            f"got {backend!r}."
        )
    if not framework:
        raise ImplicitDiffError(
            f"register_backend({name!r}, {backend!r}): expected framework='modname' (the module "
            "whose presence in sys.modules makes this backend eligible), got none."
        )
    with _lock:
        _table[name] = (framework, backend)
        _loaded.pop(name, None)


def _read_entry_points() -> None:
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _table:
            _table[ep.name] = (ep.name, ep.value)


def list_backends() -> dict[str, bool]:
    """The registered backends, each mapped to whether its framework is imported right now."""
    _read_entry_points()
    return {name: fw in sys.modules for name, (fw, _) in _table.items()}


def _load(name: str) -> Backend:
    if name in _loaded:
        return _loaded[name]
    _, spec = _table[name]
    if isinstance(spec, Backend):
        bk = spec
    else:
        mod, _, attr = spec.partition(":")
        try:
            bk = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise BackendNotFoundError(
                f"backend {name!r}: expected module {mod!r} to be importable, got {e}. "
                "Reinstall implicitdiff or the package that registered this backend."
            ) from e
    _loaded[name] = bk
    return bk


def _candidates(failures: list[str]) -> Iterator[Backend]:
    # Lazily, in table order: a leaf found by an earlier backend (numpy first) never loads a
    # later one, and a backend that cannot load is skipped (its error kept in `failures`), so
    # one broken backend does not break the others.
    _read_entry_points()
    for name, (fw, _) in list(_table.items()):
        if fw in sys.modules:
            try:
                bk = _load(name)
            except BackendNotFoundError as e:
                failures.append(str(e))
                continue
            yield bk


def backend_of_leaf(x: Any) -> Backend | None:
    """The backend owning one leaf; None for Python scalars and None."""
    if x is None or isinstance(x, (bool, int, float, complex)):
        return None
    failures: list[str] = []
    for bk in _candidates(failures):
        if bk.owns(x):
            return bk
    raise BackendNotFoundError(
        f"expected arrays of a registered framework ({', '.join(list_backends())}), got an "
        f"object of type {type(x).__module__}.{type(x).__qualname__}. Convert it to a NumPy, JAX "
        "or PyTorch array, or register a backend for it with idf.register_backend."
        + "".join(f" Also: {f}" for f in failures)
    )


def find_backend(*trees: Any) -> Backend | None:
    """Like `get_backend`, but None when the trees hold no arrays (only Python scalars)."""
    found: dict[str, tuple[Backend, str]] = {}
    for i, tree in enumerate(trees):
        for path, leaf in _generic_paths(tree, f"arg{i}"):
            bk = backend_of_leaf(leaf)
            if bk is not None and bk.name not in found:
                found[bk.name] = (bk, path)
    if len(found) > 1:
        desc = ", ".join(f"{name} at {path}" for name, (_, path) in found.items())
        raise BackendNotFoundError(
            f"expected the arrays of one framework in a call, got several: {desc}. Convert them "
            "to one framework first."
        )
    return next(iter(found.values()))[0] if found else None


def get_backend(*trees: Any) -> Backend:
    """The backend for the arrays in `trees`.

    **Arguments:**

    - `trees`: pytrees of arrays (and Python scalars, which fit any backend).

    **Returns:** the `Backend` owning the arrays; the NumPy reference when there are only Python
    scalars. Raises `BackendNotFoundError` for an unknown array type or a mix of frameworks.
    """
    bk = find_backend(*trees)
    return bk if bk is not None else _load("numpy")


def _generic_paths(tree: Any, prefix: str) -> list[tuple[str, Any]]:
    # The core's pytree first. Only a leaf that is neither a scalar nor an array may be a node
    # registered with jax.tree_util (an equinox module, ...): then, with jax loaded, flatten with
    # jax. (Tensors and NumPy arrays never go through jax.tree_util, which torch.compile cannot
    # trace.)
    paths = _tree.tree_leaves_with_path(tree, prefix)
    if "jax" in sys.modules and not all(_plain_leaf(leaf) for _, leaf in paths):
        import jax

        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return [(prefix + jax.tree_util.keystr(p), leaf) for p, leaf in leaves]
    return paths


def _plain_leaf(x: Any) -> bool:
    """A scalar, a string or an array (anything with a dtype and a shape): not a pytree node."""
    return x is None or isinstance(x, (bool, int, float, complex, str)) or (
        hasattr(x, "dtype") and hasattr(x, "shape"))
