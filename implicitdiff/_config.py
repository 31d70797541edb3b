"""Process-wide defaults: `idf.config`.

Only `on_failure` for now. A decorator or layer given `on_failure=None` (the default everywhere)
takes `idf.config.on_failure` when it is *called* (when it is traced, under `jax.jit`), so a
training loop switches every implicit function at once::

    import implicitdiff as idf
    idf.config.on_failure = "nan"          # process-wide, from here on
    with idf.config.override(on_failure="warn"):
        ...                                # only inside the block

The starting value is `"raise"`, or the environment variable `IMPLICITDIFF_ON_FAILURE` when it
is set (one of `"raise"`, `"warn"`, `"nan"`; anything else raises `ValueError` at import).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ._array import ON_FAILURE, check_on_failure

ENV_ON_FAILURE = "IMPLICITDIFF_ON_FAILURE"
"""The environment variable that sets the starting `idf.config.on_failure`."""


class Config:
    """The process-wide defaults of implicitdiff (the one instance is `idf.config`).

    Attributes:
        on_failure: what a failed solve does wherever `on_failure` was left at `None`:
            `"raise"` an `ImplicitDiffError`, `"warn"`, or return `"nan"` where it failed. Setting
            it validates the value. Under `jax.jit` it is read when the function is traced, so
            a change takes effect for new traces (a new `jit`, or new shapes) only.
    """

    __slots__ = ("_on_failure",)
    _on_failure: str

    def __init__(self) -> None:
        env = os.environ.get(ENV_ON_FAILURE)
        if env is not None:
            check_on_failure(env, f"environment variable {ENV_ON_FAILURE}")
        object.__setattr__(self, "_on_failure", env if env is not None else "raise")

    @property
    def on_failure(self) -> str:
        """The default `on_failure` (one of `"raise"`, `"warn"`, `"nan"`)."""
        return self._on_failure

    @on_failure.setter
    def on_failure(self, value: str) -> None:
        check_on_failure(value, "idf.config")
        object.__setattr__(self, "_on_failure", value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "on_failure":
            raise AttributeError(f"idf.config has no setting {name!r} (settings: on_failure).")
        object.__setattr__(self, name, value)

    @contextlib.contextmanager
    def override(self, *, on_failure: str | None = None) -> Iterator[Config]:
        """Set the defaults inside a `with` block only (process-wide while the block runs)."""
        if on_failure is not None:
            check_on_failure(on_failure, "idf.config.override")
        old = self._on_failure
        try:
            if on_failure is not None:
                self.on_failure = on_failure
            yield self
        finally:
            object.__setattr__(self, "_on_failure", old)

    def __repr__(self) -> str:
        return f"idf.config(on_failure={self._on_failure!r})"


config = Config()
"""The process-wide defaults (see `Config`)."""


def resolve_on_failure(on_failure: str | None, who: str = "") -> str:
    """`on_failure` itself when given (validated), else the process-wide `config.on_failure`.

    Every decorator and layer calls this when it runs, not when it is built."""
    if on_failure is None:
        return config.on_failure
    check_on_failure(on_failure, who)
    return on_failure


__all__ = ["ENV_ON_FAILURE", "ON_FAILURE", "Config", "config", "resolve_on_failure"]
