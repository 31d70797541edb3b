"""Structure tags for $A = \\partial_x F$: conditions that know their structure set them, and
`Auto` uses them to pick a linear solver."""

from __future__ import annotations

from collections.abc import Iterable


class Tag:
    """A named structural property of $\\partial_x F(x^*, \\theta)$."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"idf.{self.name}"

    def __reduce__(self):
        return self.name


symmetric = Tag("symmetric")
"""$\\partial_x F$ is symmetric, as for stationarity conditions $\\nabla_x f = 0$ (a Hessian)."""

positive_definite = Tag("positive_definite")
"""$\\partial_x F$ is positive definite, as for stationarity of a strongly convex objective."""

KNOWN_TAGS = frozenset({symmetric, positive_definite})

_fixed_point = Tag("_fixed_point")  # (the module attribute named like the tag: it pickles)
"""Set by `custom_fixed_point`, never by a user: $\\partial_x F = \\partial_x T - I$, the
condition of a fixed point $x = T(x, \\theta)$. `Auto` may then pick the fixed-point
iteration."""

fixed_point_form = _fixed_point

INTERNAL_TAGS = frozenset({fixed_point_form})


def as_tags(tags: Iterable[Tag] | Tag | None) -> frozenset[Tag]:
    """Normalize user input to a frozenset of known tags, or raise a clear error."""
    from ._errors import StructureError

    if tags is None:
        return frozenset()
    if isinstance(tags, Tag):
        tags = {tags}
    if isinstance(tags, str):
        raise StructureError(
            f"tags: expected a set of tags such as {{idf.symmetric, idf.positive_definite}}, got "
            f"the string {tags!r}. Pass the tag objects, not their names."
        )
    try:
        out = frozenset(tags)
    except TypeError:
        raise StructureError(
            f"tags: expected a set of tags such as {{idf.symmetric}}, got {type(tags).__name__}."
        ) from None
    unknown = [t for t in out if t not in KNOWN_TAGS and t not in INTERNAL_TAGS]
    if unknown:
        raise StructureError(
            f"tags: expected tags from {sorted(map(repr, KNOWN_TAGS))}, got {unknown!r}. "
            "Use idf.symmetric and idf.positive_definite."
        )
    if positive_definite in out and symmetric not in out:
        # positive definiteness without symmetry is not something any solver here can use.
        out = out | {symmetric}
    return out
