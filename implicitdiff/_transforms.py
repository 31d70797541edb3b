"""Framework-generic transforms, dispatched by the type of the arrays.

With JAX arrays they are `jax.jvp` / `jax.vjp`, with torch tensors `torch.func.jvp` /
`torch.func.vjp`; with NumPy arrays (no autodiff) they apply the implicit rule of a function
decorated with `custom_root` or `custom_fixed_point`.

A primal made of NumPy arrays beside JAX or torch primals is a constant of that framework: it is
converted to it and never differentiated (its tangent is ignored, its cotangent is None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._backend import Backend, convert_constants, get_backend, is_host_array
from ._errors import StructureError


def jvp(f: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any]
        ) -> tuple[Any, Any]:
    """Forward mode: `(f(*primals), J tangents)`.

    **Arguments:**

    - `f`: a function of the primals. With NumPy arrays it must be a decorated solver, or
      `functools.partial(solver, **options)` to pass keyword options.
    - `primals`: tuple of arguments.
    - `tangents`: tuple of tangents, one per primal, shaped like it.

    **Returns:** `(out, out_dot)`.
    """
    primals, tangents = _as_tuple(primals, "primals"), _as_tuple(tangents, "tangents")
    if len(primals) != len(tangents):
        raise StructureError(
            f"jvp: expected one tangent per primal ({len(primals)}), got {len(tangents)}."
        )
    bk = get_backend(primals)
    const = _constant_primals(bk, primals)
    if const:
        primals = tuple(convert_constants(bk, primals))
        tangents = tuple(_zero_tangent(bk, p, t) if i in const else t
                         for i, (p, t) in enumerate(zip(primals, tangents)))
    return bk.jvp(f, primals, tangents)


def vjp(f: Callable[..., Any], *primals: Any, argnums: int | Sequence[int] | None = None
        ) -> tuple[Any, Callable[[Any], tuple]]:
    """Reverse mode: `(f(*primals), vjp_fn)` with `vjp_fn(cotangent)` a tuple of one cotangent per
    primal.

    **Arguments:**

    - `f`: a function of the primals. With NumPy arrays it must be a decorated solver, or
      `functools.partial(solver, **options)` to pass keyword options.
    - `primals`: the arguments.
    - `argnums`: (keyword) the primals to differentiate; the others get None. Saves work in the
      NumPy reference, which builds $\\partial_\\theta F^\\top$ column by column.

    **Returns:** `(out, vjp_fn)`. For a solver with `has_aux=True`, `out` is `(x, aux)` and
    `vjp_fn` takes the cotangent of `x` alone.
    """
    if isinstance(argnums, int):
        argnums = (argnums,)
    if argnums is not None:
        bad = [i for i in argnums if not -len(primals) <= i < len(primals)]
        if bad:
            raise StructureError(
                f"vjp: argnums {bad} out of range for {len(primals)} primals."
            )
        argnums = tuple(i % len(primals) for i in argnums)
    bk = get_backend(primals)
    const = _constant_primals(bk, primals)
    if const:
        primals = convert_constants(bk, tuple(primals))
        wanted = range(len(primals)) if argnums is None else argnums
        argnums = tuple(i for i in wanted if i not in const)
    return bk.vjp(f, tuple(primals), argnums)


def jacobian(f: Callable[..., Any], argnums: int = 0) -> Callable[..., Any]:
    """The Jacobian of `f` with respect to argument `argnums`, as a function of the primals.

    The result has shape `out.shape + arg.shape` (for array `out` and `arg`). It is built from
    JVPs in the directions of the argument's entries (forward mode), or from VJPs along the
    output's entries when the output is smaller.
    """
    if not isinstance(argnums, int):
        raise TypeError(f"jacobian: expected an int argnums, got {argnums!r}.")

    def jac(*primals: Any) -> Any:
        bk = get_backend(primals)
        const = _constant_primals(bk, primals)
        if const:
            if argnums % len(primals) in const:
                raise StructureError(
                    f"jacobian: argument {argnums} holds NumPy arrays beside {bk.name} arrays, "
                    f"so it is a constant and has no Jacobian. Convert it to a {bk.name} array "
                    "to differentiate with respect to it."
                )
            primals = convert_constants(bk, primals)
        return bk.jacobian(f, tuple(primals), argnums)

    return jac


def _constant_primals(bk: Backend, primals: Sequence[Any]) -> set[int]:
    """The primals made only of NumPy arrays (and scalars) that `bk` does not own: constants."""
    out = set()
    for i, p in enumerate(primals):
        leaves = [leaf for leaf in bk.tree_flatten(p)[0] if hasattr(leaf, "dtype")]
        if leaves and all(is_host_array(leaf) and not bk.owns(leaf) for leaf in leaves):
            out.add(i)
    return out


def _zero_tangent(bk: Backend, primal: Any, tangent: Any) -> Any:
    """Zeros for the floating leaves of a constant primal (already converted to `bk`); the
    user's tangent leaves elsewhere."""
    leaves, treedef = bk.tree_flatten(primal)
    try:
        t_leaves = bk.tree_flatten(tangent)[0]
    except (TypeError, ValueError):
        t_leaves = [None] * len(leaves)
    if len(t_leaves) != len(leaves):
        t_leaves = [None] * len(leaves)
    out = [bk.namespace(p).zeros_like(p) if hasattr(p, "dtype") and bk.is_float(p) else t
           for p, t in zip(leaves, t_leaves)]
    return bk.tree_unflatten(treedef, out)


def _as_tuple(x: Any, what: str) -> tuple:
    if not isinstance(x, (tuple, list)):
        raise StructureError(f"{what}: expected a tuple, got {type(x).__name__}.")
    return tuple(x)
