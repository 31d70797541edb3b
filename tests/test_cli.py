"""The `implicitdiff` command: `check` on the gallery and on user problems, and `demo`."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from implicitdiff import _gallery
from implicitdiff import cli as _cli

pytest.importorskip("array_api_compat")

ROW = re.compile(r"^(\S+)\s+(numpy|jax|torch)\s+(jvp|vjp)\s+(\S+)\s+(\S+|ref bad)\s+(\S+)\s+(\S+)"
                 r"\s+(ok|FAIL vs FD\+ref|FAIL vs FD|FAIL vs ref|ERROR)$")


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
    assert rows[name, "numpy", "jvp"][-1] == "FAIL vs FD"
    assert rows[name, "numpy", "vjp"][-1] == "FAIL vs FD"
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
    with pytest.raises(SystemExit):
        _cli.main(["check", "--step", "0"])
    capsys.readouterr()
    assert _cli.main(["check", "ridge", "--argnums", "0,x"]) == 2
    assert _cli.main(["check", "ridge", "--argnums", "7"]) == 2
    err = capsys.readouterr().err
    assert "--argnums" in err and "argnums: expected positions" in err


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


# ---- the checker on third-party solvers and on what it must catch, on every backend ----------

BACKENDS = _cli.installed_backends()

CATCH_MODULE = textwrap.dedent('''
    import numpy as np
    import array_api_compat
    import implicitdiff as idf

    FACTOR = {factor}  # the user's derivative of sin, times this: 1.0 is right
    NUMPY_FACTOR = {numpy_factor}  # the same in the NumPy reference's idf.Derivatives


    def user_sin(t):
        """sin with a user-written derivative in each framework (FACTOR * cos)."""
        if isinstance(t, np.ndarray):
            return np.sin(t)
        if type(t).__module__.startswith("jax"):
            return _jax_sin()(t)
        return _torch_sin().apply(t)


    def _jax_sin():
        import jax, jax.numpy as jnp

        @jax.custom_jvp
        def s(t):
            return jnp.sin(t)

        @s.defjvp
        def s_jvp(primals, tangents):
            (t,), (dt,) = primals, tangents
            return jnp.sin(t), FACTOR * jnp.cos(t) * dt

        return s


    def _torch_sin():
        import torch

        class S(torch.autograd.Function):
            @staticmethod
            def forward(t):
                return torch.sin(t)

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.save_for_backward(inputs[0])
                ctx.save_for_forward(inputs[0])

            @staticmethod
            def backward(ctx, g):
                (t,) = ctx.saved_tensors
                return FACTOR * torch.cos(t) * g

            @staticmethod
            def jvp(ctx, dt):
                (t,) = ctx.saved_tensors
                return FACTOR * torch.cos(t) * dt

        return S


    def F(x, theta):
        return x - user_sin(theta)


    # the NumPy reference takes a user derivative from idf.Derivatives (the others ignore it)
    numpy_products = idf.Derivatives(
        jvp_args=lambda t, x, theta: -NUMPY_FACTOR * np.cos(theta) * t[0],
        vjp_args=lambda u, x, theta: (-NUMPY_FACTOR * np.cos(theta) * u,),
    )


    @idf.custom_root(F, derivatives=numpy_products)
    def sine(theta):
        xp = array_api_compat.array_namespace(theta)
        return xp.sin(theta)   # exact: the residual is 0, only the derivative can be wrong


    sine_args = (np.linspace(0.1, 1.0, 4),)


    def G(x, theta, n_iter):
        return x ** 3 + x - theta


    def newton(theta, n_iter):
        x = 0 * theta
        for _ in range(n_iter):
            x = x - G(x, theta, n_iter) / (3 * x ** 2 + 1)
        return x


    # stopped early: 2 Newton steps; the residual check raises (default) or, with
    # on_failure="warn", lets the unconverged x and its derivative through
    early_raise = idf.custom_root(G)(newton)
    early_raise_args = (np.linspace(-1.0, 1.0, 4), {n_early})
    early_warn = idf.custom_root(G, on_failure="warn")(newton)
    early_warn_args = (np.linspace(-1.0, 1.0, 4), {n_early})


    # a condition that detaches theta: float() makes it a constant for autodiff
    @idf.custom_root(lambda x, theta: x ** 3 + x - float(theta))
    def detached(theta):
        return newton(theta, 40)


    detached_args = (0.3,)
''')


def _catch(factor: float = 1.0, numpy_factor: float | None = None, n_early: int = 2) -> str:
    return (CATCH_MODULE.replace("{factor}", repr(factor))
            .replace("{numpy_factor}", repr(factor if numpy_factor is None else numpy_factor))
            .replace("{n_early}", str(n_early)))


def _module(tmp_path, monkeypatch, name: str, text: str) -> str:
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return name


def _run(argv, capsys):
    code = _cli.main(argv)
    out = capsys.readouterr().out
    return code, table(out), out


@pytest.mark.parametrize("factor,expected", [(2.0, "FAIL vs FD"), (1.0, "ok")])
def test_check_user_derivative_on_every_backend(tmp_path, monkeypatch, capsys, factor, expected):
    mod = _module(tmp_path, monkeypatch, f"idf_catch_{int(factor)}",
                  _catch(factor))
    code, rows, out = _run(["check", f"{mod}:sine", "--backends", ",".join(BACKENDS)], capsys)
    assert code == (0 if expected == "ok" else 1), out
    assert set(rows) == {(f"{mod}:sine", b, m) for b in BACKENDS for m in ("jvp", "vjp")}
    for key, row in rows.items():
        assert row[-1] == expected, (key, out)
        assert float(row[2]) == 0.0  # the residual is exact: the residual check cannot see it
        if factor == 2.0:
            # d/dθ is twice the truth: the JVP error against finite differences is 1
            assert abs(float(row[0]) - 1.0) < 1e-6 or key[2] == "vjp", (key, out)


def test_check_solver_stopped_early_on_every_backend(tmp_path, monkeypatch, capsys):
    mod = _module(tmp_path, monkeypatch, "idf_catch_early",
                  _catch())
    backends = ",".join(BACKENDS)
    code, rows, out = _run(["check", f"{mod}:early_raise", "--backends", backends], capsys)
    assert code == 1
    assert {r[-1] for r in rows.values()} == {"ERROR"}, out
    assert out.count("NonConvergenceError") == 2 * len(BACKENDS), out
    with pytest.warns(RuntimeWarning, match="stopped far from the root"):
        code, rows, out = _run(["check", f"{mod}:early_warn", "--backends", backends], capsys)
    assert code == 1
    assert len(rows) == 2 * len(BACKENDS)
    assert {r[-1] for r in rows.values()} == {"FAIL vs FD"}, out
    assert all(float(r[0]) > 1e-3 for r in rows.values()), out
    # the same solver run to convergence passes: what failed was stopping early
    mod2 = _module(tmp_path, monkeypatch, "idf_catch_converged",
                   _catch(n_early=40))
    code, rows, out = _run(["check", f"{mod2}:early_warn", "--backends", backends], capsys)
    assert code == 0 and {r[-1] for r in rows.values()} == {"ok"}, out


@pytest.mark.filterwarnings("ignore:.*(not complex-safe|requires_grad=True to a scalar)")
def test_check_detached_condition(tmp_path, monkeypatch, capsys):
    # F = x³ + x − float(θ): float() cuts θ out of autodiff. JAX refuses to trace it (ERROR),
    # PyTorch differentiates a constant (derivative 0: error 1 against finite differences). The
    # NumPy reference differentiates F by the complex step, falling back to central differences
    # when F is not complex-safe, where float(θ) loses nothing: its derivative is right.
    mod = _module(tmp_path, monkeypatch, "idf_catch_detach",
                  _catch())
    code, rows, out = _run(["check", f"{mod}:detached", "--backends", ",".join(BACKENDS)], capsys)
    name = f"{mod}:detached"
    assert rows[name, "numpy", "jvp"][-1] == "ok", out
    if "jax" in BACKENDS:
        assert rows[name, "jax", "jvp"][-1] == "ERROR" and rows[name, "jax", "vjp"][-1] == "ERROR"
    if "torch" in BACKENDS:
        for mode in ("jvp", "vjp"):
            assert rows[name, "torch", mode][-1] == "FAIL vs FD+ref", out
            assert abs(float(rows[name, "torch", mode][0]) - 1.0) < 1e-9
    assert code == (1 if len(BACKENDS) > 1 else 0)


def test_check_wrong_numpy_products_do_not_fail_other_backends(tmp_path, monkeypatch, capsys):
    # idf.Derivatives' products are the NumPy reference's only: with a wrong one (and right
    # derivatives in JAX and PyTorch) NumPy's rows fail against finite differences, the other
    # backends' rows pass and show the reference as not compared ("ref bad")
    mod = _module(tmp_path, monkeypatch, "idf_catch_numpy", _catch(1.0, numpy_factor=2.0))
    code, rows, out = _run(["check", f"{mod}:sine", "--backends", ",".join(BACKENDS)], capsys)
    assert code == 1
    name = f"{mod}:sine"
    for mode in ("jvp", "vjp"):
        assert rows[name, "numpy", mode][-1] == "FAIL vs FD"
        for b in BACKENDS[1:]:
            assert rows[name, b, mode][-1] == "ok", out
            assert rows[name, b, mode][1] == "ref bad"
            assert float(rows[name, b, mode][0]) < 1e-9
    if len(BACKENDS) > 1:
        assert "not compared with the NumPy reference" in out


THIRD_PARTY = textwrap.dedent('''
    import numpy as np
    import array_api_compat
    from sklearn.linear_model import Ridge
    import implicitdiff as idf
    import implicitdiff.scipy as isc
    from implicitdiff.cli import Constant

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)), rng.normal(size=30)


    def ridge_F(w, alpha, X, y):
        return X.T @ (X @ w - y) + alpha * w


    @isc.wrap_solver(ridge_F, tags={idf.symmetric, idf.positive_definite})  # no result_shape
    def sk_ridge(alpha, X, y):
        m = Ridge(alpha=float(alpha), fit_intercept=False, solver="cholesky").fit(X, y)
        return m.coef_.astype(np.float64)


    sk_ridge_args = (0.5, X, y)


    def logreg(w, lam, X, y):
        xp = array_api_compat.array_namespace(w)
        return xp.mean(xp.log1p(xp.exp(-y * (X @ w)))) + 0.5 * lam * xp.sum(w * w)


    def logreg_grad(w, lam, X, y):
        xp = array_api_compat.array_namespace(w)
        return -(X.T @ (y / (1 + xp.exp(y * (X @ w))))) / y.shape[0] + lam * w


    labels = np.sign(X @ np.ones(4) + rng.normal(size=30))


    def drop_in():  # the minimizer as the root of the gradient (hybr: to machine precision)
        g = isc.implicit_function(isc.root, logreg_grad, np.zeros(4), args=(0.1, X, labels),
                                  method="hybr", tol=1e-12)
        return g, (0.1, X, labels)


    # a solver holding its data elsewhere: A is factorized once, here; the A it is passed only
    # feeds the condition, so perturbing A moves F but not the solver's output
    A = rng.normal(size=(4, 4)) + 4.0 * np.eye(4)
    A_inv = np.linalg.inv(A)


    def lin_F(x, b, A):
        return A @ x - b


    @isc.wrap_solver(lin_F)
    def held(b, A):
        return A_inv @ b


    held_args = (np.ones(4), A)
    held_const_args = (np.ones(4), Constant(A))
''')


def test_check_third_party_solvers_every_backend(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    mod = _module(tmp_path, monkeypatch, "idf_third_party",
                  THIRD_PARTY)
    backends = ",".join(BACKENDS)
    names = [f"{mod}:sk_ridge", f"{mod}:drop_in"]
    code, rows, out = _run(["check", *names, "--backends", backends], capsys)
    assert code == 0, out
    assert set(rows) == {(n, b, m) for n in names for b in BACKENDS for m in ("jvp", "vjp")}
    assert {r[-1] for r in rows.values()} == {"ok"}, out


def test_check_held_data_argnums_and_constant(tmp_path, monkeypatch, capsys):
    # `held` uses its own factorization of A: perturbing A moves F but not the solver, so the
    # check must hold A fixed (argnums, or Constant in the example arguments)
    pytest.importorskip("sklearn")
    mod = _module(tmp_path, monkeypatch, "idf_held", THIRD_PARTY)
    code, rows, out = _run(["check", f"{mod}:held", "--backends", "numpy"], capsys)
    assert code == 1 and {r[-1] for r in rows.values()} == {"ERROR"}, out
    assert "at the perturbed ones" in out and "--argnums" in out
    code, rows, out = _run(["check", f"{mod}:held", "--backends", "numpy", "--argnums", "0"],
                           capsys)
    assert code == 0, out
    from importlib import import_module

    m = import_module(mod)
    report = _cli.check(m.held, *m.held_const_args, backends=BACKENDS, out=__import__("io")
                        .StringIO())
    assert report.passed and len(report) == 2 * len(BACKENDS)
    report = _cli.check(m.held, *m.held_args, argnums=0, backends="numpy",
                        out=__import__("io").StringIO())
    assert report.passed
    report = _cli.check(m.held, *m.held_args, backends="numpy", out=__import__("io").StringIO())
    assert not report.passed and report.failed[0].status == "ERROR"
    assert "Constant" in report.summary()
    with pytest.raises(ValueError, match="argnums"):
        _cli.check(m.held, *m.held_args, argnums=5, backends="numpy")


def test_check_step_option(capsys):
    # a step far too small for float64: the finite differences are noise, and the message says so
    code, rows, out = _run(["check", "ridge", "--backends", "numpy", "--step", "1e-11"], capsys)
    assert code == 1 and rows["ridge", "numpy", "jvp"][-1] == "FAIL vs FD", out
    assert "finite differences themselves are uncertain" in out
    assert "finite-difference step 1e-11" in out
    code, rows, out = _run(["check", "ridge", "--backends", "numpy", "--step", "1e-2"], capsys)
    assert code == 0, out


NOT_DECORATED = textwrap.dedent('''
    import numpy as np

    def plain(theta):
        return np.sin(theta)

    plain_args = (np.ones(3),)

    def factory():
        return plain, (np.ones(3),)
''')


def test_check_not_a_decorated_solver(tmp_path, monkeypatch, capsys):
    mod = _module(tmp_path, monkeypatch, "idf_plain", NOT_DECORATED)
    for name in ("plain", "factory"):
        assert _cli.main(["check", f"{mod}:{name}", "--backends", "numpy"]) == 2
        err = capsys.readouterr().err
        assert "is not a decorated solver" in err and "idf.custom_root" in err, err
    import idf_plain

    with pytest.raises(TypeError, match="is not a decorated solver"):
        _cli.check(idf_plain.plain, np.ones(3), backends="numpy")


TORCH_ONLY = textwrap.dedent('''
    import numpy as np
    import torch
    import implicitdiff as idf


    def F(x, theta):
        return x + 0.5 * torch.tanh(x) - theta


    @idf.custom_root(F)
    def solve(theta):                     # torch operations only: it cannot run on NumPy arrays
        x = torch.zeros_like(theta)
        for _ in range(60):
            x = x - F(x, theta) / (1 + 0.5 / torch.cosh(x) ** 2)
        return x


    solve_args = (np.linspace(-1.0, 1.0, 3),)
''')


def test_check_framework_only_solver(tmp_path, monkeypatch, capsys):
    # a solver that runs only on PyTorch: the finite differences are taken with torch tensors,
    # the NumPy reference is not compared ("ref bad"), and the rows pass
    pytest.importorskip("torch")
    if "torch" not in BACKENDS:
        pytest.skip("the torch backend is not usable")
    mod = _module(tmp_path, monkeypatch, "idf_torch_only", TORCH_ONLY)
    code, rows, out = _run(["check", f"{mod}:solve", "--backends", "torch"], capsys)
    assert code == 0, out
    for mode in ("jvp", "vjp"):
        row = rows[f"{mod}:solve", "torch", mode]
        assert row[-1] == "ok" and row[1] == "ref bad" and float(row[0]) < 1e-9, out
