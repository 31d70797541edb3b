"""Framework-generic transforms, dispatched by the type of the arrays.

With JAX arrays they are `jax.jvp` / `jax.vjp`, with torch tensors `torch.func.jvp` /
`torch.func.vjp`; with NumPy arrays (no autodiff) they apply the implicit rule of a function
decorated with `custom_root` or `custom_fixed_point`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._backend import get_backend
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
    return get_backend(primals).jvp(f, primals, tangents)


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
    return get_backend(primals).vjp(f, tuple(primals), argnums)


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
        return bk.jacobian(f, tuple(primals), argnums)

    return jac


def _as_tuple(x: Any, what: str) -> tuple:
    if not isinstance(x, (tuple, list)):
        raise StructureError(f"{what}: expected a tuple, got {type(x).__name__}.")
    return tuple(x)
