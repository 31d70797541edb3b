"""Decorated solvers and DEQ layers survive pickling and copying (process pools, `torch.save`,
`copy.deepcopy`): a copy is a working, independent object, never one bound to the original."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest

import implicitdiff as idf


def F(x, a):
    return x * x * x + x - a


@idf.custom_root(F, solve=idf.Dense())
def cubic(a):
    x = np.zeros_like(a)
    for _ in range(60):                       # Newton on x^3 + x = a
        x = x - (x**3 + x - a) / (3 * x**2 + 1)
    return x


def test_module_level_solver_pickles_by_reference():
    # before: PicklingError "not the same object as test_pickling.cubic"
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(cubic, protocol=protocol))
        assert back is cubic
    a = np.array([0.5, 2.0])
    x, vjp_fn = idf.vjp(back, a)
    (g,) = vjp_fn(np.ones(2))
    np.testing.assert_allclose(g, 1 / (3 * x**2 + 1), rtol=1e-9)


def test_a_solver_made_at_run_time_still_pickles_by_value_or_fails_loudly():
    local = idf.custom_root(F)(lambda a: a)   # a lambda cannot be pickled: pickle says so
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(local)


def test_deq_copies_are_independent_and_save_load():
    torch = pytest.importorskip("torch")
    from torch_cells import Cell

    from implicitdiff_torch import DEQ

    torch.manual_seed(0)
    deq = DEQ(Cell(6, 3, 0.5), z_shape=(6,), solver_options=dict(tol=1e-12, maxiter=200))
    x = torch.randn(4, 3, dtype=torch.float32)
    z = deq(x)
    twin = copy.deepcopy(deq)
    with torch.no_grad():
        twin.f.U.bias.add_(1.0)                # the copy's own parameters
    z_twin = twin(x)
    assert not torch.allclose(z_twin, z)
    torch.testing.assert_close(deq(x), z)      # the original is untouched
    assert twin.stats is not deq.stats
    # gradients of the copy reach the copy's parameters only
    twin.zero_grad(set_to_none=True)
    deq.zero_grad(set_to_none=True)
    twin(x).sum().backward()
    assert twin.f.W.weight.grad is not None and deq.f.W.weight.grad is None
    # torch.save / torch.load of the whole module (before: a pickling error)
    buf = io.BytesIO()
    torch.save(deq, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), z)
