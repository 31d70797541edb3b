"""The backend registry: lookup by array type, never importing a framework; registration by
`register_backend` and by the `implicitdiff.backends` entry-point group."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import implicitdiff as idf
from implicitdiff import _backend


def _run(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=False, **kw)


def test_import_and_numpy_call_load_no_framework():
    r = _run("""
        import json, sys
        import numpy as np
        import implicitdiff as idf

        def F(x, lam, A, b):
            return A.T @ (A @ x - b) + lam * x

        @idf.custom_root(F, solve=idf.CG(), tags={idf.symmetric, idf.positive_definite})
        def ridge(lam, A, b):
            return np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ b)

        rng = np.random.default_rng(0)
        A, b = rng.standard_normal((6, 3)), rng.standard_normal(6)
        x, vjp_fn = idf.vjp(ridge, 0.1, A, b)
        vjp_fn(np.ones_like(x))
        idf.jvp(ridge, (0.1, A, b), (1.0, 0 * A, 0 * b))
        idf.jacobian(ridge)(0.1, A, b)
        idf.list_backends()
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
              ("jax", "jaxlib", "torch", "implicitdiff_jax", "implicitdiff_torch"))))
    """)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_get_backend_numpy_and_scalars():
    bk = idf.get_backend(np.ones(3))
    assert isinstance(bk, idf.Backend) and bk.name == "numpy" and bk.framework == "numpy"
    for trees in [(1.0,), (3,), (True,), (), (None,), (np.float64(2.0),), (np.int32(1),),
                  ({"a": [np.ones(2), (np.zeros((2, 2)), 1.5)]}, 2),
                  (np.ones(2, dtype=np.float32), np.arange(3))]:
        assert idf.get_backend(*trees) is bk, trees


def test_list_backends():
    found = idf.list_backends()
    assert isinstance(found, dict)
    assert {"numpy", "jax", "torch"} <= set(found)
    assert found["numpy"] is True
    assert all(isinstance(v, bool) for v in found.values())
    assert found["jax"] == ("jax" in sys.modules) and found["torch"] == ("torch" in sys.modules)


def test_entry_point_group_name():
    assert _backend.ENTRY_POINT_GROUP == "implicitdiff.backends"


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_numpy_and_jax_arrays_in_one_call():
    import jax.numpy as jnp

    import implicitdiff_jax

    if not hasattr(implicitdiff_jax, "backend"):
        pytest.skip("implicitdiff_jax has no backend yet")
    # NumPy arrays beside JAX arrays are JAX constants (issue 10); a mix that is an error, and
    # its message, are checked with a third-party backend in test_register_backend_instance.
    assert idf.get_backend(np.ones(2), {"w": jnp.ones(2)}).name == "jax"
    assert idf.get_backend(jnp.ones(2), 1.0).name == "jax"
    assert idf.get_backend(np.ones(2), 1.0).name == "numpy"


# ---- registering a backend for a toy array type ------------------------------------------


class ToyArray:
    def __init__(self, data):
        self.data = np.asarray(data, dtype=np.float64)


class ToyBackend(idf.Backend):
    name = "toy"
    framework = "toy_framework"

    def owns(self, x):
        return isinstance(x, ToyArray)

    def linearize(self, F, x, args, *, derivatives=None, tags=frozenset()):
        raise NotImplementedError

    def call(self, fn, args, options):
        return ("toy call", fn.name, len(args), options)


class OtherToyArray:
    def __init__(self, data):
        self.data = np.asarray(data, dtype=np.float64)


class OtherToyBackend(ToyBackend):
    name = "othertoy"
    framework = "other_toy_framework"

    def owns(self, x):
        return isinstance(x, OtherToyArray)


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations and fake framework modules made by a test vanish after it."""
    monkeypatch.setattr(_backend, "_table", dict(_backend._table))
    monkeypatch.setattr(_backend, "_loaded", dict(_backend._loaded))
    return monkeypatch


def test_register_backend_instance(clean_registry):
    toy = ToyBackend()
    idf.register_backend("toy", toy)
    assert idf.list_backends()["toy"] is False
    # Its framework is not imported, so the backend is not considered: lookup never imports.
    with pytest.raises(idf.BackendNotFoundError, match="ToyArray"):
        idf.get_backend(ToyArray([1.0]))

    clean_registry.setitem(sys.modules, "toy_framework", types.ModuleType("toy_framework"))
    assert idf.list_backends()["toy"] is True
    assert idf.get_backend(ToyArray([1.0])) is toy
    assert idf.get_backend({"a": (ToyArray([1.0]), 2.0)}, 3) is toy
    assert idf.get_backend(np.ones(2)).name == "numpy"  # the others still work

    # A decorated solver called with toy arrays goes through the toy backend.
    fn = idf.custom_root(lambda x, t: x - t)(lambda t: t)
    assert fn(ToyArray([1.0]), opt=1) == ("toy call", "<lambda>", 1, {"opt": 1})

    # Arrays of two frameworks in one call.
    idf.register_backend("othertoy", OtherToyBackend())
    clean_registry.setitem(sys.modules, "other_toy_framework", types.ModuleType("otf"))
    with pytest.raises(idf.BackendNotFoundError, match=r"got several: toy at arg0.*othertoy"):
        idf.get_backend(ToyArray([1.0]), OtherToyArray([2.0]))
    with pytest.raises(idf.BackendNotFoundError, match="got several: numpy at arg0"):
        idf.get_backend(np.ones(2), ToyArray([1.0]))


def test_register_backend_by_module_path(clean_registry):
    mod = types.ModuleType("toy_backend_module")
    mod.backend = ToyBackend()
    clean_registry.setitem(sys.modules, "toy_backend_module", mod)
    clean_registry.setitem(sys.modules, "toy_framework", types.ModuleType("toy_framework"))
    idf.register_backend("toy", "toy_backend_module:backend", framework="toy_framework")
    assert idf.get_backend(ToyArray([0.0])) is mod.backend


@pytest.mark.parametrize("spec,named", [("toy_framework:no_such_attribute", "no_such_attribute"),
                                        ("no_such_module_xyz:backend", "no_such_module_xyz")])
def test_broken_backend_does_not_break_numpy(clean_registry, spec, named):
    clean_registry.setitem(sys.modules, "toy_framework", types.ModuleType("toy_framework"))
    idf.register_backend("broken", spec, framework="toy_framework")
    assert idf.list_backends()["broken"] is True
    assert idf.get_backend(np.ones(2)).name == "numpy"
    with pytest.raises(idf.BackendNotFoundError) as e:
        idf.get_backend(ToyArray([1.0]))
    assert "backend 'broken'" in str(e.value) and named in str(e.value)


def test_register_backend_bad_input(clean_registry):
    class Nameless(ToyBackend):
        framework = ""

    with pytest.raises(idf.ImplicitDiffError, match="expected the framework's module name"):
        idf.register_backend("nameless", Nameless())
    with pytest.raises(idf.ImplicitDiffError, match="expected a Backend instance or "
                                                    "'module:attribute'"):
        idf.register_backend("bad", "no_colon_here", framework="x")
    with pytest.raises(idf.ImplicitDiffError, match="expected framework='modname'"):
        idf.register_backend("bad", "mod:attr")
    assert "nameless" not in idf.list_backends() and "bad" not in idf.list_backends()


def test_entry_point_backend(tmp_path):
    """A third-party distribution declaring `[implicitdiff.backends] toyfw = toy_ep:backend`."""
    (tmp_path / "toyfw.py").write_text(textwrap.dedent("""
        class Array:
            def __init__(self, v):
                self.v = v
    """))
    (tmp_path / "toy_ep.py").write_text(textwrap.dedent("""
        import implicitdiff as idf

        class ToyFwBackend(idf.Backend):
            name = "toyfw"
            framework = "toyfw"

            def owns(self, x):
                import toyfw
                return isinstance(x, toyfw.Array)

            def linearize(self, F, x, args, *, derivatives=None, tags=frozenset()):
                raise NotImplementedError

            def call(self, fn, args, options):
                return "called by toyfw"

        backend = ToyFwBackend()
    """))
    dist = tmp_path / "toy_ep-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-ep\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[implicitdiff.backends]\ntoyfw = toy_ep:backend\n")
    r = _run("""
        import json, sys
        import implicitdiff as idf
        before = idf.list_backends()
        loaded_early = "toy_ep" in sys.modules or "toyfw" in sys.modules
        import toyfw
        fn = idf.custom_root(lambda x, t: x)(lambda t: t)
        out = fn(toyfw.Array(1.0))
        print(json.dumps([before, loaded_early, idf.list_backends()["toyfw"],
                          idf.get_backend(toyfw.Array(2.0)).name, out]))
    """, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    before, loaded_early, now, name, out = json.loads(r.stdout.strip().splitlines()[-1])
    assert before["toyfw"] is False and {"numpy", "jax", "torch"} <= set(before)
    assert loaded_early is False
    assert now is True and name == "toyfw" and out == "called by toyfw"
