"""The backend contract: adapters reach the core only through public names, the contract module
documents what it exports, and the IFT rule is assembled in one place."""

from __future__ import annotations

import ast
import inspect
import pathlib

import numpy as np
import pytest

import implicitdiff as idf
import implicitdiff.backend as contract

ROOT = pathlib.Path(__file__).resolve().parents[1]
ADAPTERS = sorted((ROOT / "backends").rglob("*.py"))


def _private_imports(path: pathlib.Path) -> list[str]:
    """`from implicitdiff._x import ...`, `from implicitdiff import _x`, `import implicitdiff._x`
    and `implicitdiff._x` attribute chains in one file."""
    bad = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "implicitdiff":
                if any(p.startswith("_") for p in parts[1:]):
                    bad.append(f"{path.name}:{node.lineno} from {node.module}")
                elif len(parts) == 1:
                    bad += [f"{path.name}:{node.lineno} from implicitdiff import {a.name}"
                            for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            bad += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names
                    if a.name.startswith("implicitdiff.") and
                    any(p.startswith("_") for p in a.name.split(".")[1:])]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("idf", "implicitdiff"):
                bad.append(f"{path.name}:{node.lineno} {base.id}.{node.attr}")
    return bad


def test_adapters_import_no_private_core_names():
    assert ADAPTERS, "no adapter found under backends/"
    bad = [b for path in ADAPTERS for b in _private_imports(path)]
    assert not bad, "adapters must use implicitdiff.backend, not private modules:\n" + \
        "\n".join(bad)


def test_the_scan_catches_private_imports(tmp_path):
    # the check above can fail: each spelling of a private import is caught
    src = ("from implicitdiff._ift import implicit_vjp\nfrom implicitdiff import _tree\n"
           "import implicitdiff._root\nimport implicitdiff as idf\nidf._root.x\n"
           "from implicitdiff.backend import Backend\n")
    p = tmp_path / "adapter.py"
    p.write_text(src)
    assert len(_private_imports(p)) == 4


def test_contract_exports_exist_and_are_documented():
    for name in contract.__all__:
        obj = getattr(contract, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"implicitdiff.backend.{name} has no docstring"
    assert set(contract.__all__) >= {"Backend", "Linearization", "implicit_jvp", "implicit_vjp",
                                     "Raveler", "register_backend", "ImplicitFunction"}


def test_no_adapter_assembles_the_rule():
    # -A^{-1} B and -B^T u are written in the core only: an adapter calls implicit_jvp/vjp
    for path in ADAPTERS:
        text = path.read_text()
        assert "_solve_checked" not in text, path.name
        assert "resolve_solver(" not in text or path.name == "__init__.py", path.name


@pytest.mark.parametrize("batch_dims", [0, 1])
def test_raveler_round_trip_with_batch_and_extra_dims(batch_dims):
    bk = idf.get_backend(np.zeros(1))
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(3, 2, 2)), "b": rng.normal(size=(3, 4)).astype(np.float32)}
    r = contract.Raveler(bk, x, batch_dims)
    v = r.ravel(x)
    n = 8 if batch_dims else 24
    assert v.shape == ((3, n) if batch_dims else (n,)) and v.dtype == np.float64
    back = r.unravel(v)
    assert back["b"].dtype == np.float32
    np.testing.assert_array_equal(back["a"], x["a"])
    np.testing.assert_allclose(back["b"], x["b"])
    # several vectors at once: an extra leading dimension is kept
    many = {k: np.stack([leaf, 2 * leaf]) for k, leaf in x.items()}
    vv = r.ravel(many)
    assert vv.shape == (2, *v.shape)
    np.testing.assert_allclose(vv[1], 2 * v)
    np.testing.assert_allclose(r.unravel(vv)["a"][1], 2 * x["a"])


def test_conditions_export_every_public_condition():
    # `proximal_gradient` was missing from the hand-written list: now it is derived
    import implicitdiff.conditions as cond

    public = {n for n, v in vars(cond).items() if not n.startswith("_") and callable(v)}
    assert public <= set(cond.__all__) and "proximal_gradient" in cond.__all__
