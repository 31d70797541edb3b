"""The `implicitdiff` command: `check` on the gallery and on user problems, and `demo`."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from implicitdiff import _gallery
from implicitdiff import cli as _cli

pytest.importorskip("array_api_compat")

ROW = re.compile(r"^(\S+)\s+(numpy|jax|torch)\s+(jvp|vjp)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+"
                 r"(ok|FAIL|ERROR)$")


def table(text: str) -> dict[tuple[str, str, str], tuple[str, ...]]:
    """The rows of a `check` table: (problem, backend, mode) -> (err FD, err ref, residual,
    iterations, status)."""
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows[m.group(1), m.group(2), m.group(3)] = m.groups()[3:]
    return rows


def test_check_gallery_every_installed_backend(capsys):
    backends = _cli.installed_backends()
    assert backends[0] == "numpy"
    assert _cli.main(["check"]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    expected = {(p, b, m) for p in _gallery.GALLERY for b in backends for m in ("jvp", "vjp")}
    assert set(rows) == expected
    for key, (err_fd, err_ref, residual, iterations, status) in rows.items():
        assert status == "ok", (key, out)
        assert float(err_fd) < 1e-8, key
        if key[1] == "numpy":
            assert err_ref == "(ref)"
            assert float(residual) < 1e-12
            # the Krylov backward solves iterate; qp's is a dense solve (0 iterations)
            assert int(iterations) > 0 or key[0] == "qp", key
        else:
            assert float(err_ref) < 1e-10, key
    assert f"all {len(expected)} checks passed." in out


def test_check_subprocess_numpy():
    proc = subprocess.run([sys.executable, "-m", "implicitdiff", "check", "--backends", "numpy"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table(proc.stdout)
    assert set(rows) == {(p, "numpy", m) for p in _gallery.GALLERY for m in ("jvp", "vjp")}
    assert all(r[-1] == "ok" for r in rows.values())


USER_MODULE = textwrap.dedent('''
    import numpy as np
    import implicitdiff as idf


    def F(x, theta):
        return x - np.sin(theta)


    # Deliberately wrong: dF/dtheta is -cos(theta), these products use -2 cos(theta). The forward
    # solve is exact (residual 0), so only the derivative checks can catch it.
    wrong_derivatives = idf.Derivatives(
        jvp_args=lambda t, x, theta: -2.0 * np.cos(theta) * t[0],
        vjp_args=lambda u, x, theta: (-2.0 * np.cos(theta) * u,),
    )


    @idf.custom_root(F, derivatives=wrong_derivatives)
    def wrong(theta):
        return np.sin(theta)


    wrong_args = (np.linspace(0.1, 1.0, 4),)


    @idf.custom_root(F)
    def right(theta):
        return np.sin(theta)


    right.example_args = (np.linspace(0.1, 1.0, 4),)


    def cubic():
        def G(x, theta, scale, n_iter):
            return x ** 3 + scale * x - theta

        @idf.custom_root(G)
        def solve(theta, scale, n_iter):
            x = 0.0 * theta
            for _ in range(n_iter):
                x = x - G(x, theta, scale, n_iter) / (3 * x ** 2 + scale)
            return x

        return solve, ({"theta": np.linspace(-1.0, 1.0, 5)}["theta"], 2.0, 60)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "idf_user_problems.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "idf_user_problems"
    sys.modules.pop("idf_user_problems", None)


def test_check_wrong_user_problem_fails(user_module, capsys):
    code = _cli.main(["check", f"{user_module}:wrong", "--backends", "numpy"])
    out = capsys.readouterr().out
    assert code == 1, out
    rows = table(out)
    name = f"{user_module}:wrong"
    assert rows[name, "numpy", "jvp"][-1] == "FAIL"
    assert rows[name, "numpy", "vjp"][-1] == "FAIL"
    assert float(rows[name, "numpy", "jvp"][2]) == 0.0  # the residual check cannot see it
    assert "error vs finite differences" in out


def test_check_right_user_problems_pass(user_module, capsys):
    code = _cli.main(["check", f"{user_module}:right", f"{user_module}:cubic", "ridge",
                      "--backends", "numpy"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = table(out)
    assert {k[0] for k in rows} == {f"{user_module}:right", f"{user_module}:cubic", "ridge"}
    assert all(r[-1] == "ok" for r in rows.values())


def test_check_user_problem_by_path(tmp_path, capsys):
    path = tmp_path / "problems_file.py"
    path.write_text(USER_MODULE)
    assert _cli.main(["check", f"{path}:right", "--backends", "numpy"]) == 0
    assert _cli.main(["check", f"{path}:wrong", "--backends", "numpy"]) == 1
    capsys.readouterr()


def test_check_bad_arguments(user_module, capsys):
    assert _cli.main(["check", "no_such_problem"]) == 2
    assert _cli.main(["check", f"{user_module}:missing"]) == 2
    assert _cli.main(["check", "idf_no_such_module_xyz:f"]) == 2
    assert _cli.main(["check", "--backends", "numpy,nonsense"]) == 2
    err = capsys.readouterr().err
    assert "no_such_problem" in err and "missing" in err and "nonsense" in err
    assert _cli.main([]) == 2
    with pytest.raises(SystemExit):
        _cli.main(["check", "--rtol", "-1"])
    capsys.readouterr()


def test_check_list_and_help(capsys):
    assert _cli.main(["check", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in _gallery.GALLERY)
    with pytest.raises(SystemExit) as e:
        _cli.main(["check", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "MODULE:NAME" in out
    # the help says plainly that checking MODULE:NAME runs MODULE's code
    assert "code runs with your permissions" in out and "executed" in out


@pytest.mark.parametrize("problem", list(_gallery.GALLERY.values()), ids=list(_gallery.GALLERY))
def test_gallery_make_args(problem):
    args = problem.make_args("numpy")
    x = problem.solver(*args)
    if problem.solver.has_aux:  # qp: ((x, y, z, ok), stats)
        x = x[0]
    leaves = x if isinstance(x, tuple) else (x,)
    assert all(leaf.dtype.name == "float64" for leaf in leaves)
    r = problem.solver.F(x, *args)
    assert max(float(abs(leaf).max(initial=0.0)) for leaf in
               (r if isinstance(r, tuple) else (r,))) < 1e-12
    args32 = problem.make_args(__import__("numpy"), "float32")
    assert all(a.dtype.name == "float32" for a in args32)


def test_demo_writes_plot(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "x.png"
    assert _cli.main(["demo", "--steps", "5", "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    data = out_png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    for fw in _cli.installed_backends():
        assert re.search(rf"^{fw}\s+\d\.\d+e[-+]\d+\s+\d+\.\d+", out, re.M), out
    if len(_cli.installed_backends()) > 1:
        assert "frameworks agree" in out
