"""Parametrizations (`spectral_norm`, `weight_norm`, ...) inside a PyTorch `DEQ`'s map: one
evaluation per forward pass, then the same fixed map in the solve, the residual check and the
backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn


def _parametrization_lists(f: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(qualified name, ParametrizationList)` of every parametrized tensor inside `f`."""
    from torch.nn.utils import parametrize

    out = []
    for name, m in f.named_modules():
        if parametrize.is_parametrized(m):
            plists = cast(Any, m.parametrizations)  # a ModuleDict of ParametrizationLists
            for t, plist in plists.items():
                out.append((f"{name}.parametrizations.{t}" if name else f"parametrizations.{t}",
                            plist))
    return out


def _step_parametrizations(f: Any) -> dict[str, torch.Tensor]:
    """Once per forward pass: evaluate each parametrization of `f` in its own mode (in
    training mode `spectral_norm` runs its power iteration here, updating $u, v$ in place),
    then return a snapshot (clones) of the parametrizations' buffers. Passed to
    `functional_call` with the parameters, they pin the state the map uses in the solve, the
    residual check and the backward, even if `f` is called again (e.g. by a regularizer)
    before `backward()`."""
    if not isinstance(f, nn.Module):
        return {}
    lists = _parametrization_lists(f)
    if not lists:
        return {}
    snap: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for prefix, plist in lists:
            plist()  # the state update of a training-mode parametrization, once
            for bname, buf in plist.named_buffers():
                snap[f"{prefix}.{bname}"] = buf.detach().clone()
    return snap


@contextlib.contextmanager
def _frozen_parametrizations(f: nn.Module) -> Iterator[None]:
    """Evaluate the parametrizations of `f` as fixed functions of their parameters: their
    modules in eval mode (no power iteration: `spectral_norm` uses its current $u, v$)."""
    mods = [m for _, plist in _parametrization_lists(f) for m in plist.modules() if m.training]
    for m in mods:
        m.training = False
    try:
        yield
    finally:
        for m in mods:
            m.training = True
