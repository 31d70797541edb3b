"""Bad input fails loudly and specifically: the exception class, and a message that says what
was expected, what was got (by key path) and what to do."""

from __future__ import annotations

import math

import numpy as np
import pytest

import implicitdiff as idf

SPD = {idf.symmetric, idf.positive_definite}
THETA = np.array([1.0, -2.0, 0.5])


def identity_F(x, theta):
    return x - theta


def copy_solver(theta):
    return theta.copy()


def _spd(n=5, seed=0):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    return M @ M.T + np.eye(n), rng.standard_normal(n)


# ---- F's output versus x ----------------------------------------------------------------------


def test_error_hierarchy():
    for cls in (idf.StructureError, idf.NonConvergenceError, idf.LinearSolveError,
                idf.SingularJacobianError, idf.BackendNotFoundError):
        assert issubclass(cls, idf.ImplicitDiffError)
    assert issubclass(idf.SingularJacobianError, idf.LinearSolveError)
    assert issubclass(idf.StructureError, ValueError)
    assert issubclass(idf.BackendNotFoundError, TypeError)


@pytest.mark.parametrize("F,solver,where", [
    # tuple x, F drops the second leaf
    (lambda x, t: (x[0] - t,), lambda t: (t.copy(), t.copy()), "x[1]"),
    # tuple x, F nests where x has a leaf
    (lambda x, t: (x[0] - t, (x[1] - t, x[1] - t)), lambda t: (t.copy(), t.copy()), "x[1]"),
    # dict x, F renames a key
    (lambda x, t: {"a": x["a"] - t, "c": x["b"] - t},
     lambda t: {"a": t.copy(), "b": t.copy()}, "x['b']"),
])
def test_F_output_structure_differs(F, solver, where):
    fn = idf.custom_root(F)(solver)
    with pytest.raises(idf.StructureError) as e:
        fn(THETA)
    msg = str(e.value)
    assert "expected a residual with the structure of x" in msg
    assert where in msg  # names the key path of the first difference
    assert "got" in msg and "F must return a residual shaped like x" in msg


def test_F_output_node_type_differs():
    fn = idf.custom_root(lambda x, t: [x[0] - t, x[1] - t])(lambda t: (t.copy(), t.copy()))
    with pytest.raises(idf.StructureError, match=r"structure of x \(\(\*, \*\)\), got \[\*, \*\]"):
        fn(THETA)


def test_F_output_shape_differs():
    fn = idf.custom_root(lambda x, t: (x[0] - t, x[1][:2] - t[:2]))(
        lambda t: (t.copy(), t.copy()))
    with pytest.raises(idf.StructureError) as e:
        fn(THETA)
    msg = str(e.value)
    assert "at x[1]" in msg and "expected shape (3,)" in msg and "got (2,)" in msg
    assert "shaped like x" in msg


def test_F_output_dtype_differs():
    fn = idf.custom_root(lambda x, t: {"a": x["a"] - t, "b": (x["b"] - t).astype(np.float32)})(
        lambda t: {"a": t.copy(), "b": t.copy()})
    with pytest.raises(idf.StructureError) as e:
        fn(THETA)
    msg = str(e.value)
    assert "at x['b']" in msg and "expected dtype float64" in msg and "got float32" in msg
    assert "Cast" in msg


def test_fixed_point_map_output_differs():
    fn = idf.custom_fixed_point(lambda x, t: x[:2])(copy_solver)
    with pytest.raises(idf.StructureError, match=r"expected shape \(3,\).*got \(2,\)"):
        fn(THETA)


def test_solver_returning_integers():
    fn = idf.custom_root(identity_F)(lambda t: np.array([1, 2, 3]))
    with pytest.raises(idf.StructureError, match=r"floating arrays, got ndarray int64 at x"):
        fn(THETA)


# ---- the forward solve -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_solver_returning_nan_or_inf(bad):
    fn = idf.custom_root(identity_F)(lambda t: np.where(t > 0, bad, t))
    with pytest.raises(idf.NonConvergenceError) as e:
        fn(THETA)
    assert "NaN or inf" in str(e.value) and "Expected a finite root" in str(e.value)
    with pytest.raises(idf.NonConvergenceError, match="NaN or inf"):
        idf.vjp(fn, THETA)


def far_solver(theta):
    return theta + 0.1  # max|F| = 0.1, far above the default tolerance


def test_forward_far_from_root_raise():
    fn = idf.custom_root(identity_F, on_failure="raise")(far_solver)
    with pytest.raises(idf.NonConvergenceError) as e:
        fn(THETA)
    msg = str(e.value)
    assert "stopped far from the root" in msg
    assert "max|F(x*, θ)| = 0.1" in msg and "residual_tol = 1.49e-07" in msg
    assert "Tighten the solver's tolerance" in msg and "residual_tol" in msg
    assert e.value.residual_norm == pytest.approx(0.1)
    assert e.value.tolerance == pytest.approx(10 * math.sqrt(np.finfo(np.float64).eps))
    with pytest.raises(idf.NonConvergenceError):
        idf.jvp(fn, (THETA,), (np.ones(3),))


def test_forward_far_from_root_warn():
    fn = idf.custom_root(identity_F, on_failure="warn")(far_solver)
    with pytest.warns(RuntimeWarning, match="stopped far from the root"):
        x = fn(THETA)
    np.testing.assert_array_equal(x, THETA + 0.1)
    with pytest.warns(RuntimeWarning, match="stopped far from the root"):
        _, x_dot = idf.jvp(fn, (THETA,), (np.ones(3),))
    np.testing.assert_allclose(x_dot, np.ones(3), rtol=1e-12)


def test_forward_far_from_root_nan():
    fn = idf.custom_root(identity_F, on_failure="nan")(far_solver)
    x = fn(THETA)
    assert x.shape == (3,) and np.all(np.isnan(x))
    x, _ = idf.vjp(fn, THETA)
    assert np.all(np.isnan(x))


def test_residual_tol_is_respected():
    assert idf.custom_root(identity_F, residual_tol=0.2)(far_solver)(THETA) is not None
    assert idf.custom_root(identity_F, residual_tol=math.inf)(far_solver)(THETA) is not None
    with pytest.raises(ValueError, match="residual_tol: expected a positive number"):
        idf.custom_root(identity_F, residual_tol=-1.0)


def test_residual_tol_inf_skips_F_but_checks_finiteness():
    calls = []

    def counting_F(x, theta):
        calls.append(1)
        return x - theta

    def half_nan(theta):
        return np.where(theta > 0, theta, np.nan)

    batch = np.array([[1.0, 2.0], [-1.0, 3.0]])
    fn = idf.custom_root(counting_F, residual_tol=math.inf, batch_dims=1)
    assert np.array_equal(fn(copy_solver)(batch), batch) and not calls  # F never evaluated
    with idf.diagnostics() as d:
        x = idf.custom_root(counting_F, residual_tol=math.inf, batch_dims=1,
                            on_failure="nan")(half_nan)(batch)
    assert np.array_equal(x[0], batch[0]) and np.all(np.isnan(x[1])) and not calls
    assert d.forward == []  # no residual, no record
    with pytest.raises(idf.NonConvergenceError, match="NaN or inf"):
        idf.custom_root(counting_F, residual_tol=math.inf)(half_nan)(np.array([1.0, -1.0]))


# ---- the linear solve with dF/dx --------------------------------------------------------


M_SING = np.diag([1.0, 0.0, 2.0])  # rank-deficient: F(x, θ) = M (x − θ) has A = M singular


def singular_F(x, theta):
    return M_SING @ x - M_SING @ theta


@pytest.mark.parametrize("solve", [idf.Auto(), idf.Dense()])
def test_singular_jacobian_names_ridge(solve):
    fn = idf.custom_root(singular_F, solve=solve)(copy_solver)
    with pytest.raises(idf.LinearSolveError) as e:
        idf.jvp(fn, (THETA,), (np.ones(3),))
    assert isinstance(e.value, idf.SingularJacobianError)
    msg = str(e.value)
    assert "copy_solver" in msg and "jvp" in msg and "dF/dx" in msg
    assert "singular" in msg and "Expected a non-singular Jacobian" in msg
    assert "ridge" in msg and "(ridge=1e-8)" in msg
    with pytest.raises(idf.SingularJacobianError, match="ridge"):
        idf.vjp(fn, THETA)[1](np.ones(3))


def test_singular_jacobian_fixed_by_ridge():
    fn = idf.custom_root(singular_F, solve=idf.Dense(ridge=1e-6))(copy_solver)
    _, x_dot = idf.jvp(fn, (THETA,), (np.ones(3),))
    # (M + 1e-6 I) ẋ = M θ̇: the regular directions are (nearly) exact, the null one is 0.
    np.testing.assert_allclose(x_dot, [1 / (1 + 1e-6), 0.0, 2 / (2 + 1e-6)], rtol=1e-12)
    (g,) = idf.vjp(fn, THETA)[1](np.ones(3))
    assert np.all(np.isfinite(g))


def test_linear_solve_not_converging_raises():
    Q, t = _spd()
    fn = idf.custom_root(lambda x, t: Q @ x - t, solve=idf.CG(maxiter=1), tags=SPD)(
        lambda t: np.linalg.solve(Q, t))
    with idf.diagnostics() as d, pytest.raises(idf.LinearSolveError) as e:
        idf.vjp(fn, t)[1](np.ones(5))
    assert not isinstance(e.value, idf.SingularJacobianError)
    msg = str(e.value)
    assert "vjp linear solve" in msg and "CG(" in msg and "maxiter=1" in msg
    assert "did not converge" in msg and "after 1 iterations" in msg
    assert "Raise maxiter" in msg
    assert d.backward[-1].converged == np.False_ and int(d.backward[-1].iterations) == 1
    with pytest.raises(idf.LinearSolveError, match="jvp linear solve"):
        idf.jvp(fn, (t,), (np.ones(5),))


def test_linear_solve_not_converging_nan_and_warn():
    Q, t = _spd()
    nan_fn = idf.custom_root(lambda x, t: Q @ x - t, solve=idf.CG(maxiter=1), tags=SPD,
                             on_failure="nan")(lambda t: np.linalg.solve(Q, t))
    (g,) = idf.vjp(nan_fn, t)[1](np.ones(5))
    assert g.shape == (5,) and np.all(np.isnan(g))
    _, x_dot = idf.jvp(nan_fn, (t,), (np.ones(5),))
    assert np.all(np.isnan(x_dot))
    # The forward solve itself was fine: x is not NaN.
    assert np.all(np.isfinite(nan_fn(t)))

    warn_fn = idf.custom_root(lambda x, t: Q @ x - t, solve=idf.CG(maxiter=1), tags=SPD,
                              on_failure="warn")(lambda t: np.linalg.solve(Q, t))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        (g,) = idf.vjp(warn_fn, t)[1](np.ones(5))
    assert np.all(np.isfinite(g))


# ---- wrong arguments to the transforms and decorators --------------------------------------


class NotAnArray:
    pass


def test_unknown_array_type():
    fn = idf.custom_root(identity_F)(copy_solver)
    with pytest.raises(idf.BackendNotFoundError) as e:
        fn(NotAnArray())
    msg = str(e.value)
    assert "expected arrays of a registered framework" in msg
    assert "NotAnArray" in msg and "register_backend" in msg
    with pytest.raises(idf.BackendNotFoundError, match="NotAnArray"):
        idf.vjp(fn, NotAnArray())
    with pytest.raises(idf.BackendNotFoundError, match="NotAnArray"):
        idf.get_backend({"a": np.ones(2), "b": [NotAnArray()]})


def test_wrong_tangents():
    fn = idf.custom_root(identity_F)(copy_solver)
    with pytest.raises(idf.StructureError, match=r"expected one tangent per primal \(1\), got 2"):
        idf.jvp(fn, (THETA,), (np.ones(3), np.ones(3)))
    with pytest.raises(idf.StructureError, match=r"expected one tangent per primal \(1\), got 0"):
        idf.jvp(fn, (THETA,), ())
    with pytest.raises(idf.StructureError, match=r"args\[0\].*expected shape \(3,\), got \(2,\)"):
        idf.jvp(fn, (THETA,), (np.ones(2),))
    with pytest.raises(idf.StructureError, match="tangents: expected a tuple"):
        idf.jvp(fn, (THETA,), np.ones(3))


def test_wrong_tangent_structure():
    fn = idf.custom_root(lambda x, p: x - p["a"])(lambda p: p["a"].copy())
    with pytest.raises(idf.StructureError, match=r"tangents\[0\]: expected the structure"):
        idf.jvp(fn, ({"a": THETA},), ({"b": np.ones(3)},))


def test_wrong_cotangent():
    fn = idf.custom_root(identity_F)(copy_solver)
    _, vjp_fn = idf.vjp(fn, THETA)
    with pytest.raises(idf.StructureError) as e:
        vjp_fn(np.ones(4))
    msg = str(e.value)
    assert "cotangent: expected the structure and shapes of x" in msg
    assert "(3,)" in msg and "(4,)" in msg
    with pytest.raises(idf.StructureError, match="cotangent"):
        vjp_fn((np.ones(3), np.ones(3)))
    with pytest.raises(idf.StructureError, match="argnums"):
        idf.vjp(fn, THETA, argnums=3)


@pytest.mark.parametrize("bad", ["cg", idf.CG, None, lambda mv, b: b])
def test_solve_not_a_linear_solver(bad):
    with pytest.raises(idf.StructureError) as e:
        idf.custom_root(identity_F, solve=bad)
    msg = str(e.value)
    assert "solve: expected a linear solver such as idf.CG()" in msg
    assert f"got {type(bad).__name__}" in msg and "forward solver is the decorated function" in msg
    with pytest.raises(idf.StructureError):
        idf.custom_fixed_point(lambda x, t: t, solve=bad)
    with pytest.raises(idf.StructureError):
        idf.implicit_jvp(identity_F, THETA, (THETA,), (THETA,), solve=bad)


def test_bad_on_failure():
    with pytest.raises(ValueError, match=r"on_failure: expected one of .*'raise'.*got 'ignore'"):
        idf.custom_root(identity_F, on_failure="ignore")
    with pytest.raises(ValueError, match="on_failure"):
        idf.implicit_vjp(identity_F, THETA, (THETA,), THETA, on_failure="loud")


@pytest.mark.parametrize("tags,expect", [
    ("symmetric", "got the string 'symmetric'. Pass the tag objects"),
    ({"symmetric"}, "expected tags from"),
    (3, "got int"),
])
def test_bad_tags(tags, expect):
    with pytest.raises(idf.StructureError) as e:
        idf.custom_root(identity_F, tags=tags)
    assert "tags: expected" in str(e.value) and expect in str(e.value)


def test_not_callable():
    with pytest.raises(TypeError, match="expected the condition F to be callable"):
        idf.custom_root(np.ones(3))
    with pytest.raises(TypeError, match="expected a callable solver"):
        idf.custom_root(identity_F)(np.ones(3))
    with pytest.raises(TypeError, match="has_aux: expected a bool"):
        idf.custom_root(identity_F, has_aux="yes")


@pytest.mark.parametrize("transform", ["vjp", "jvp", "jacobian"])
def test_transform_of_undecorated_function(transform):
    def plain(theta):
        return 2 * theta

    with pytest.raises(TypeError) as e:
        if transform == "vjp":
            idf.vjp(plain, THETA)
        elif transform == "jvp":
            idf.jvp(plain, (THETA,), (THETA,))
        else:
            idf.jacobian(plain)(THETA)
    msg = str(e.value)
    assert f"idf.{transform} with NumPy arrays" in msg
    assert "expected a solver decorated with idf.custom_root or idf.custom_fixed_point" in msg
    assert "plain" in msg and "NumPy has no autodiff" in msg
    assert f"call idf.{transform} on the decorated solver" in msg and "{" not in msg


def test_jacobian_bad_argnums():
    fn = idf.custom_root(identity_F)(copy_solver)
    with pytest.raises(idf.StructureError, match="argnums 1 out of range"):
        idf.jacobian(fn, argnums=1)(THETA)
    with pytest.raises(TypeError, match="expected an int argnums"):
        idf.jacobian(fn, argnums=(0,))
