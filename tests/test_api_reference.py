"""The API reference cannot fall behind the code (issue 14, item 4).

Every public module has an `__all__` of names it defines, and every one of those names is in
docs/api.md: as a mkdocstrings entry (`::: module.name`), or as a link from docs/api.md to the
page that holds that entry (`[...](page.md#module.name)` with `::: module.name` on that page), or,
for a class or function re-exported under a second path, as the same object documented under its
first. Every public name has a docstring, read as mkdocstrings reads it (griffe, attribute
docstrings included).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"

# The public modules; the second element names a framework/library the module needs.
PUBLIC_MODULES = [
    ("implicitdiff", None),
    ("implicitdiff.conditions", None),
    ("implicitdiff.solvers", None),
    ("implicitdiff.scipy", "scipy"),
    ("implicitdiff.qp", None),
    ("implicitdiff.cvxpy", "cvxpy"),
    ("implicitdiff.ode", None),
    ("implicitdiff.deq", None),
    ("implicitdiff.backend", None),
    ("implicitdiff.cli", None),
    ("implicitdiff_numpy", None),
    ("implicitdiff_jax", "jax"),
    ("implicitdiff_torch", "torch"),
    ("implicitdiff_array_api", "array_api_strict"),
]

# Public names kept out of `__all__` on purpose, documented all the same: the lazy submodules of
# `implicitdiff` (so that `from implicitdiff import *` imports no CVXPY), and `implicitdiff_jax.DEQ`
# (it needs equinox, an optional dependency).
LAZY = {
    "implicitdiff": ["conditions", "solvers", "deq", "backend", "qp", "cvxpy", "ode"],
    "implicitdiff_jax": ["DEQ"],
}

# Public names without a docstring, in files owned elsewhere (reported; the test below fails
# once one gets its docstring, so that it leaves this list).
KNOWN_UNDOCSTRINGED: set[str] = set()

_ENTRY = re.compile(r"^::: ([\w.]+)\s*$", re.M)
_LINK = re.compile(r"\]\(([\w-]+\.md)#([\w.]+)\)")


def _module(name: str, needs: str | None):
    if needs is not None:
        pytest.importorskip(needs)
    return importlib.import_module(name)


def _resolve(path: str):
    """The object at a dotted path (module, then attributes), or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj
    return None


def documented_paths() -> set[str]:
    """The dotted paths docs/api.md documents: its own `:::` entries, and those of other pages
    that it links to by their anchor."""
    api = API.read_text(encoding="utf-8")
    paths = set(_ENTRY.findall(api))
    for page, anchor in _LINK.findall(api):
        target = ROOT / "docs" / page
        assert target.is_file(), f"docs/api.md links to a missing page {page}"
        if anchor in _ENTRY.findall(target.read_text(encoding="utf-8")):
            paths.add(anchor)
    return paths


def _identifiable(obj) -> bool:
    """Whether `obj is other` says that two paths name one thing: not for values that Python
    shares between unrelated names (small ints, interned strings, None, containers)."""
    return obj is not None and not isinstance(
        obj, (bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset))


def _public(modname: str, needs: str | None) -> list[str]:
    mod = _module(modname, needs)
    return [*mod.__all__, *LAZY.get(modname, [])]


@pytest.mark.parametrize("modname,needs", PUBLIC_MODULES, ids=[m for m, _ in PUBLIC_MODULES])
def test_all_lists_the_public_names(modname, needs):
    mod = _module(modname, needs)
    names = getattr(mod, "__all__", None)
    assert isinstance(names, list), f"{modname} has no __all__"
    assert len(set(names)) == len(names), f"{modname}.__all__ repeats a name"
    for name in names:
        assert not name.startswith("_"), f"{modname}.__all__ lists the private {name}"
        assert name not in ("Any", "TYPE_CHECKING", "annotations"), f"{modname}.__all__: {name}"
        assert hasattr(mod, name), f"{modname}.__all__ lists {name}, which it does not define"


@pytest.mark.parametrize("modname,needs", PUBLIC_MODULES, ids=[m for m, _ in PUBLIC_MODULES])
def test_every_public_name_is_in_the_api_reference(modname, needs):
    paths = documented_paths()
    documented_objects = [obj for obj in map(_resolve, paths) if _identifiable(obj)]
    missing = []
    for name in _public(modname, needs):
        path = f"{modname}.{name}"
        if path in paths:
            continue
        obj = getattr(importlib.import_module(modname), name)
        if inspect.ismodule(obj) and obj.__name__ in paths | {m for m, _ in PUBLIC_MODULES}:
            continue  # a lazy submodule: a public module of its own, checked by its own name
        if _identifiable(obj) and any(obj is d for d in documented_objects):
            continue  # a re-export of an object documented under another path
        missing.append(path)
    assert not missing, ("public names missing from docs/api.md (add `::: NAME` entries, or a "
                         f"link to the page that has them): {missing}")


def test_api_reference_entries_exist():
    # every entry of docs/api.md names an object that exists (mkdocs would fail later, unclearly)
    for path in _ENTRY.findall(API.read_text(encoding="utf-8")):
        top = path.split(".")[0]
        if top in ("implicitdiff_jax", "implicitdiff_torch"):
            pytest.importorskip(top.split("_")[1])
        if path.startswith("implicitdiff.cvxpy"):
            pytest.importorskip("cvxpy")
        assert _resolve(path) is not None, f"docs/api.md: ::: {path} names nothing"


def test_every_public_name_has_a_docstring():
    griffe = pytest.importorskip("griffe")
    loader = griffe.GriffeLoader(search_paths=[str(ROOT), str(ROOT / "backends")])
    tops = sorted({m.split(".")[0] for m, _ in PUBLIC_MODULES})
    for top in tops:
        loader.load(top)
    loader.resolve_aliases(implicit=False, external=False)
    coll = loader.modules_collection
    missing, stale = [], []
    for modname, needs in PUBLIC_MODULES:
        for name in _public(modname, needs):
            path = f"{modname}.{name}"
            doc = coll[path].docstring
            has = doc is not None and doc.value.strip() != ""
            if not has and path not in KNOWN_UNDOCSTRINGED:
                missing.append(path)
            if has and path in KNOWN_UNDOCSTRINGED:
                stale.append(path)
    assert not missing, f"public names without a docstring: {missing}"
    assert not stale, f"these have a docstring now: remove them from KNOWN_UNDOCSTRINGED: {stale}"
