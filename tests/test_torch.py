"""The PyTorch backend: implicit derivatives under every torch autodiff mode and transform.

Oracles: closed forms (ridge), autograd through a direct or long-unrolled solve of the same
problem (a different computation of the same derivative), central finite differences (of values
and of gradients), the dot-product test, and the NumPy reference backend (to 1e-10 in float64).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("implicitdiff_torch")

import implicitdiff as idf  # noqa: E402
from implicitdiff._gallery import GALLERY  # noqa: E402

DT = torch.float64

SOLVERS = [idf.Dense(), idf.CG(), idf.MINRES(), idf.GMRES(), idf.BiCGStab(), idf.NormalCG(),
           idf.Auto()]
NONSYM_SOLVERS = [idf.Dense(), idf.GMRES(), idf.BiCGStab(), idf.NormalCG(), idf.Auto()]


# ---- problems ----------------------------------------------------------------------------------

def ridge_F(x, lam, A, b):
    return A.T @ (A @ x - b) + lam * x


def make_ridge(solve=idf.CG(), **kw):
    @idf.custom_root(ridge_F, solve=solve, tags={idf.symmetric, idf.positive_definite}, **kw)
    def ridge(lam, A, b):
        return torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype), A.T @ b)

    return ridge


def ridge_direct(lam, A, b):
    """The same map by plain autograd through a direct solve (an independent derivative)."""
    return torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype), A.T @ b)


def T(x, W, U, th):
    return torch.tanh(W @ x + U @ th)


def unrolled(W, U, th, iters=120):
    x = torch.zeros(W.shape[0], dtype=W.dtype)
    for _ in range(iters):
        x = T(x, W, U, th)
    return x


def make_fp(solve=idf.Auto(), **kw):
    @idf.custom_fixed_point(T, solve=solve, **kw)
    def fp(W, U, th):
        return unrolled(W, U, th)

    return fp


def nonsym_F(x, th, M):
    return M @ x + 0.1 * torch.sin(x) - th


def nonsym_direct(th, M, iters=80):
    x = torch.zeros_like(th)
    for _ in range(iters):
        x = torch.linalg.solve(M, th - 0.1 * torch.sin(x))
    return x


def make_nonsym(solve=idf.Auto()):
    return idf.custom_root(nonsym_F, solve=solve)(nonsym_direct)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def tensor(a, dtype=DT, requires_grad=False):
    return torch.tensor(np.asarray(a), dtype=dtype, requires_grad=requires_grad)


@pytest.fixture
def ridge_data(rng):
    return tensor(rng.standard_normal((12, 5))), tensor(rng.standard_normal(12))


@pytest.fixture
def fp_data(rng):
    n, p = 5, 3
    W = rng.standard_normal((n, n))
    W = 0.4 * W / np.linalg.norm(W, 2)
    return tensor(W), tensor(rng.standard_normal((n, p)) / 2), tensor(rng.standard_normal(p))


@pytest.fixture
def nonsym_data(rng):
    n = 4
    M = rng.standard_normal((n, n)) + 3 * np.eye(n)
    return tensor(rng.standard_normal(n)), tensor(M)


def rel(a, b):
    return float((a - b).abs().max() / max(b.abs().max(), 1e-300))


def req(*ts):
    return tuple(t.detach().clone().requires_grad_() for t in ts)


# ---- reverse mode ------------------------------------------------------------------------------

@pytest.mark.parametrize("solve", SOLVERS, ids=lambda s: type(s).__name__)
def test_ridge_backward_matches_direct_autograd(ridge_data, solve):
    A, b = ridge_data
    lam, Ar, br = req(tensor(0.3), A, b)
    x = make_ridge(solve)(lam, Ar, br)
    assert x.dtype == DT and x.grad_fn is not None
    w = torch.linspace(-1, 1, x.shape[0], dtype=DT)
    (x @ w).backward()
    lam2, A2, b2 = req(tensor(0.3), A, b)
    (ridge_direct(lam2, A2, b2) @ w).backward()
    for g, g2 in [(lam.grad, lam2.grad), (Ar.grad, A2.grad), (br.grad, b2.grad)]:
        assert rel(g, g2) < 1e-10


def test_untraced_when_nothing_needs_a_derivative(ridge_data):
    A, b = ridge_data
    ridge = make_ridge()
    x = ridge(tensor(0.3), A, b)
    assert x.grad_fn is None and not x.requires_grad
    lam = tensor(0.3, requires_grad=True)
    with torch.no_grad():
        assert ridge(lam, A, b).grad_fn is None
    assert ridge(lam, A, b).grad_fn is not None


@pytest.mark.parametrize("solve", NONSYM_SOLVERS, ids=lambda s: type(s).__name__)
def test_gradcheck_with_forward_ad(nonsym_data, solve):
    th, M = nonsym_data
    f = make_nonsym(solve)
    assert torch.autograd.gradcheck(f, req(th, M), check_forward_ad=True)


def test_gradcheck_and_gradgradcheck_fixed_point(fp_data):
    fp = make_fp()
    inputs = req(*fp_data)
    assert torch.autograd.gradcheck(fp, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fp, inputs, check_fwd_over_rev=True)


@pytest.mark.parametrize("solve", [idf.CG(), idf.Dense(), idf.MINRES()],
                         ids=lambda s: type(s).__name__)
def test_gradgradcheck_ridge(ridge_data, solve):
    A, b = ridge_data
    ridge = make_ridge(solve)
    inputs = req(tensor(0.3), A[:6, :3], b[:6])
    assert torch.autograd.gradcheck(ridge, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(ridge, inputs, check_fwd_over_rev=True)


def test_double_backward_matches_finite_differences_of_gradients(fp_data):
    W, U, th = fp_data
    fp = make_fp()
    v = torch.linspace(-1, 1, th.shape[0], dtype=DT)

    def grad_at(t):
        t = t.detach().requires_grad_()
        (g,) = torch.autograd.grad((fp(W, U, t) ** 2).sum(), t, create_graph=True)
        return g, t

    g, t = grad_at(th)
    (hv,) = torch.autograd.grad(g @ v, t)  # Hessian-vector product, by double backward
    h = 1e-4
    fd = (grad_at(th + h * v)[0] - grad_at(th - h * v)[0]).detach() / (2 * h)
    assert rel(hv, fd) < 1e-6
    # and autograd through the unrolled solve agrees
    t2 = th.clone().requires_grad_()
    (g2,) = torch.autograd.grad((unrolled(W, U, t2) ** 2).sum(), t2, create_graph=True)
    (hv2,) = torch.autograd.grad(g2 @ v, t2)
    assert rel(hv, hv2) < 1e-10


def test_third_order(fp_data):
    W, U, th = fp_data
    fp = make_fp()

    def third(f):
        t = th.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(W, U, t).pow(2).sum(), t, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), t, create_graph=True)
        (k,) = torch.autograd.grad(h.sum(), t)
        return k

    assert rel(third(fp), third(unrolled)) < 1e-9


# ---- forward mode and torch.func ---------------------------------------------------------------

def test_forward_ad_dual_tensors(nonsym_data):
    import torch.autograd.forward_ad as fwAD

    th, M = nonsym_data
    f = make_nonsym()
    v = torch.linspace(-1, 1, th.shape[0], dtype=DT)
    with fwAD.dual_level():
        out = f(fwAD.make_dual(th, v), M)
        tangent = fwAD.unpack_dual(out).tangent
    ref = torch.func.jvp(lambda t: nonsym_direct(t, M), (th,), (v,))[1]
    assert rel(tangent, ref) < 1e-10


def test_jvp_vjp_dot_product(fp_data, rng):
    W, U, th = fp_data
    fp = make_fp()
    v = tensor(rng.standard_normal(th.shape[0]))
    u = tensor(rng.standard_normal(W.shape[0]))
    _, Jv = torch.func.jvp(lambda t: fp(W, U, t), (th,), (v,))
    _, vjp_fn = torch.func.vjp(lambda t: fp(W, U, t), th)
    (JTu,) = vjp_fn(u)
    assert abs(float(u @ Jv - JTu @ v)) < 1e-12 * float(u.norm() * Jv.norm() + 1)


def test_jacfwd_equals_jacrev(fp_data):
    W, U, th = fp_data
    fp = make_fp()
    jf = torch.func.jacfwd(fp, argnums=(0, 2))(W, U, th)
    jr = torch.func.jacrev(fp, argnums=(0, 2))(W, U, th)
    ju = torch.func.jacrev(unrolled, argnums=(0, 2))(W, U, th)
    for a, b, c in zip(jf, jr, ju):
        assert rel(a, b) < 1e-10 and rel(b, c) < 1e-10


@pytest.mark.parametrize("how", ["hessian", "jacrev(jacrev)", "jacrev(jacfwd)"])
def test_second_order_transforms(fp_data, how):
    W, U, th = fp_data
    fp = make_fp()

    def loss_of(f):
        return lambda t: (f(W, U, t) ** 2).sum()

    jf, jr = torch.func.jacfwd, torch.func.jacrev
    make = {"hessian": torch.func.hessian, "jacrev(jacrev)": lambda f: jr(jr(f)),
            "jacrev(jacfwd)": lambda f: jr(jf(f))}[how]
    assert rel(make(loss_of(fp))(th), torch.func.hessian(loss_of(unrolled))(th)) < 1e-9


def test_forward_over_forward_raises_instead_of_a_wrong_answer(fp_data):
    # pytorch/pytorch#197867: jacfwd(jacfwd) through any autograd.Function is silently wrong.
    W, U, th = fp_data
    fp = make_fp()
    with pytest.raises(NotImplementedError, match="197867"):
        torch.func.jacfwd(torch.func.jacfwd(lambda t: fp(W, U, t)))(th)


def test_vmap_over_a_batch(fp_data, rng):
    W, U, _ = fp_data
    fp = make_fp()
    ths = tensor(rng.standard_normal((4, U.shape[1])))
    out = torch.func.vmap(lambda t: fp(W, U, t))(ths)
    ref = torch.stack([unrolled(W, U, t) for t in ths])
    assert rel(out, ref) < 1e-12
    # batched over a matrix argument too, with in_dims
    Ws = torch.stack([W, 0.5 * W, -W])
    out = torch.func.vmap(fp, in_dims=(0, None, None))(Ws, U, ths[0])
    assert rel(out[1], unrolled(0.5 * W, U, ths[0])) < 1e-12


def test_vmap_of_grad_and_grad_of_vmap(fp_data, rng):
    W, U, _ = fp_data
    fp = make_fp()
    ths = tensor(rng.standard_normal((3, U.shape[1])))

    def loss(f):
        return lambda t: (f(W, U, t) ** 2).sum()

    g = torch.func.vmap(torch.func.grad(loss(fp)))(ths)
    g_ref = torch.func.vmap(torch.func.grad(loss(unrolled)))(ths)
    assert rel(g, g_ref) < 1e-10
    gv = torch.func.grad(lambda t: torch.func.vmap(lambda s: fp(W, U, s))(t).pow(2).sum())(ths)
    assert rel(gv, g_ref) < 1e-10
    hv = torch.func.vmap(torch.func.hessian(loss(fp)))(ths[:2])
    assert rel(hv, torch.func.vmap(torch.func.hessian(loss(unrolled)))(ths[:2])) < 1e-9


@pytest.mark.parametrize("solve", [idf.GMRES(), idf.BiCGStab(), idf.Dense()])
def test_diagnostics_under_vmap_of_grad(fp_data, rng, solve):
    # The diagnostics' extra solve (the error bound of x*) once ran the core's Python loop on
    # vmapped tensors and crashed under torch.func.vmap with an iterative solver; it now goes
    # through the backend like the derivative's own solve: the gradients are those without a
    # diagnostics block, and each vmapped element gets its own record entries.
    W, U, _ = fp_data
    fp = make_fp(solve=solve)
    ths = tensor(rng.standard_normal((3, U.shape[1])))

    def loss(t):
        return (fp(W, U, t) ** 2).sum()

    g_ref = torch.func.vmap(torch.func.grad(lambda t: (unrolled(W, U, t) ** 2).sum()))(ths)
    with idf.diagnostics() as d:
        g = torch.func.vmap(torch.func.grad(loss))(ths)
    assert rel(g, g_ref) < 1e-10
    (rec,) = d.backward
    assert np.shape(rec.converged) == (3,) and np.all(rec.converged)
    bound = np.asarray(rec.derivative_error_bound)
    assert bound.shape == (3,) and np.all(np.isfinite(bound)) and np.all(bound < 1e-8)
    # the same records as three separate calls, element by element
    for i in range(3):
        with idf.diagnostics() as di:
            torch.func.grad(loss)(ths[i])
        assert np.allclose(di.backward[0].derivative_error_bound, bound[i], rtol=0.5,
                           atol=1e-15)


def test_issue_example_ridge_hyperparameter(ridge_data):
    A, b = ridge_data
    ridge = make_ridge()
    A_val, b_val = A[:6] * 0.5, b[:6]

    def val_loss(x):
        return ((A_val @ x - b_val) ** 2).mean()

    lam = torch.tensor(0.1, dtype=DT, requires_grad=True)
    val_loss(ridge(lam, A, b)).backward()
    lam2 = lam.detach().clone().requires_grad_()
    val_loss(ridge_direct(lam2, A, b)).backward()
    assert rel(lam.grad, lam2.grad) < 1e-10
    _, t = torch.func.jvp(lambda l: ridge(l, A, b), (lam.detach(),),
                          (torch.ones_like(lam),))
    _, t2 = torch.func.jvp(lambda l: ridge_direct(l, A, b), (lam.detach(),),
                           (torch.ones_like(lam),))
    assert rel(t, t2) < 1e-10
    lams = torch.linspace(0.05, 1.0, 5, dtype=DT)
    gs = torch.func.vmap(torch.func.grad(lambda l: val_loss(ridge(l, A, b))))(lams)
    gs2 = torch.func.vmap(torch.func.grad(lambda l: val_loss(ridge_direct(l, A, b))))(lams)
    assert rel(gs, gs2) < 1e-10
    (g,) = torch.autograd.grad(val_loss(ridge(lam, A, b)), lam, create_graph=True)
    (h,) = torch.autograd.grad(g, lam)
    (g2,) = torch.autograd.grad(val_loss(ridge_direct(lam2, A, b)), lam2, create_graph=True)
    (h2,) = torch.autograd.grad(g2, lam2)
    assert rel(h, h2) < 1e-9


# ---- arguments: pytrees, modules, subsets, integers --------------------------------------------

def test_pytree_args_and_outputs(rng):
    n = 4
    M = tensor(rng.standard_normal((n, n)) + 4 * np.eye(n))

    def F(x, params, extra):
        a, b = x["a"], x["b"]
        return {"a": params["M"] @ a - extra[0], "b": b * params["s"] - extra[1] * a.sum()}

    @idf.custom_root(F)
    def solve(params, extra):
        a = torch.linalg.solve(params["M"], extra[0])
        return {"a": a, "b": extra[1] * a.sum() / params["s"]}

    def direct(params, extra):
        a = torch.linalg.solve(params["M"], extra[0])
        return {"a": a, "b": extra[1] * a.sum() / params["s"]}

    params = {"M": M, "s": tensor(2.0)}
    extra = (tensor(rng.standard_normal(n)), tensor(rng.standard_normal(3)))

    def loss(f):
        return lambda p, e: sum((v ** 2).sum() for v in f(p, e).values())

    g = torch.func.grad(loss(solve), argnums=(0, 1))(params, extra)
    g_ref = torch.func.grad(loss(direct), argnums=(0, 1))(params, extra)
    for k in ("M", "s"):
        assert rel(g[0][k], g_ref[0][k]) < 1e-10
    for a, b in zip(g[1], g_ref[1]):
        assert rel(a, b) < 1e-10


def test_module_parameters_via_functional_call(rng):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)

    def Tm(z, params, x):
        return torch.tanh(torch.func.functional_call(lin, params, (z,)) + x)

    @idf.custom_fixed_point(Tm)
    def layer(params, x):
        z = torch.zeros_like(x)
        for _ in range(100):
            z = Tm(z, params, x)
        return z

    x = tensor(rng.standard_normal((3, 4)))
    layer(dict(lin.named_parameters()), x).pow(2).sum().backward()
    got = {k: p.grad.clone() for k, p in lin.named_parameters()}
    lin.zero_grad()
    z = torch.zeros_like(x)
    for _ in range(100):
        z = torch.tanh(lin(z) + x)
    z.pow(2).sum().backward()
    for k, p in lin.named_parameters():
        assert rel(got[k], p.grad) < 1e-10


def test_closure_over_a_tensor_that_requires_grad_is_rejected(fp_data):
    W, U, th = fp_data
    Wc = W.clone().requires_grad_()

    @idf.custom_fixed_point(lambda x, th: T(x, Wc, U, th))
    def fp(th):
        return unrolled(Wc.detach(), U, th)

    with pytest.raises(idf.StructureError, match="not one of its arguments"):
        fp(th)
    with torch.no_grad():  # nothing needs a gradient: fine
        fp(th)


def test_any_subset_of_arguments_in_any_order(fp_data):
    W, U, th = fp_data
    fp = make_fp()
    Wr, _Ur, tr = req(W, U, th)
    # only the last and the first require grad (a non-prefix subset)
    fp(Wr, U, tr).sum().backward()
    W2, t2 = req(W, th)
    unrolled(W2, U, t2).sum().backward()
    assert rel(Wr.grad, W2.grad) < 1e-10 and rel(tr.grad, t2.grad) < 1e-10
    # argnums in any order through torch.func and idf.vjp
    g = torch.func.grad(lambda *a: fp(*a).sum(), argnums=(2, 0))(W, U, th)
    assert rel(g[0], t2.grad) < 1e-10 and rel(g[1], W2.grad) < 1e-10
    _, vjp_fn = idf.vjp(fp, W, U, th, argnums=(2, 1))
    gW, gU, gt = vjp_fn(torch.ones(W.shape[0], dtype=DT))
    assert gW is None and rel(gt, t2.grad) < 1e-10 and gU is not None


def test_integer_and_non_tensor_arguments_get_no_gradient(rng):
    n = 4
    M = tensor(rng.standard_normal((n, n)) + 4 * np.eye(n))
    b = tensor(rng.standard_normal(n))

    def F(x, M, b, k, scale, reps):
        assert isinstance(scale, float) and isinstance(reps, int)
        return M @ x - b * scale * k.to(x.dtype)

    @idf.custom_root(F)
    def solve(M, b, k, scale, reps):
        return torch.linalg.solve(M, b * scale * k.to(M.dtype))

    k = torch.tensor(3)
    Mr, br = req(M, b)
    x = solve(Mr, br, k, 2.0, 7)
    x.sum().backward()
    assert rel(br.grad, 6 * torch.linalg.solve(M.T, torch.ones(n, dtype=DT))) < 1e-12
    _, vjp_fn = idf.vjp(solve, M, b, k, 2.0, 7)
    _gM, gb, gk, gs, gr = vjp_fn(torch.ones(n, dtype=DT))
    assert gk is None and gs is None and gr is None and gb is not None
    g = torch.func.grad(lambda b_, k_: solve(M, b_, k_, 2.0, 7).sum())(b, k)
    assert rel(g, br.grad) < 1e-12
    # an integer tensor among the Function's inputs does not upset gradcheck
    assert torch.autograd.gradcheck(lambda M, b: solve(M, b, k, 2.0, 7), req(M, b))


# ---- dtypes, devices, external solvers ---------------------------------------------------------

def test_float32_keeps_dtype_and_is_accurate(fp_data):
    W, U, th = fp_data
    fp = make_fp(idf.BiCGStab())
    W32, U32, t32 = (a.float() for a in (W, U, th))
    t32 = t32.requires_grad_()
    x = fp(W32, U32, t32)
    assert x.dtype == torch.float32
    (x ** 2).sum().backward()
    assert t32.grad.dtype == torch.float32
    t64 = th.clone().requires_grad_()
    (unrolled(W, U, t64) ** 2).sum().backward()
    assert rel(t32.grad.double(), t64.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_where_the_solve_can(fp_data, dtype):
    W, U, th = fp_data
    fp = idf.custom_fixed_point(T, residual_tol=0.05)(
        lambda W, U, th: unrolled(W, U, th, iters=30))
    args = [a.to(dtype) for a in (W, U, th)]
    t = args[2].requires_grad_()
    x = fp(args[0], args[1], t)  # Dense: LU in float32, result cast back
    assert x.dtype == dtype
    x.sum().backward()
    assert t.grad.dtype == dtype
    t64 = th.clone().requires_grad_()
    unrolled(W, U, t64).sum().backward()
    assert rel(t.grad.double(), t64.grad) < 0.05


def test_external_numpy_solver(ridge_data):
    A, b = ridge_data

    @idf.custom_root(ridge_F, solve=idf.CG(), tags={idf.symmetric, idf.positive_definite})
    def ridge_np(lam, A, b):  # works on host arrays; returns NumPy
        A_, b_ = A.numpy(), b.numpy()
        return np.linalg.solve(A_.T @ A_ + float(lam) * np.eye(A_.shape[1]), A_.T @ b_)

    lam, A32 = req(tensor(0.3, torch.float32), A.float())
    x = ridge_np(lam, A32, b.float())
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device == A32.device
    x.sum().backward()
    lam2, A2 = req(tensor(0.3), A)
    ridge_direct(lam2, A2, b).sum().backward()
    assert rel(lam.grad.double(), lam2.grad) < 1e-4 and rel(A32.grad.double(), A2.grad) < 1e-4


def test_cross_check_against_numpy_reference(ridge_data, fp_data):
    A, b = ridge_data
    ridge_t = make_ridge(idf.Dense())

    @idf.custom_root(ridge_F, solve=idf.Dense(), tags={idf.symmetric, idf.positive_definite})
    def ridge_np(lam, A, b):
        return np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ b)

    ct = torch.linspace(-1, 1, A.shape[1], dtype=DT)
    xn, vjp_n = idf.vjp(ridge_np, 0.3, A.numpy(), b.numpy())
    gn = vjp_n(ct.numpy())
    xt, vjp_t = idf.vjp(ridge_t, tensor(0.3), A, b)
    gt = vjp_t(ct)
    assert np.abs(xt.numpy() - xn).max() < 1e-12
    for a, c in zip(gt, gn):
        np.testing.assert_allclose(a.numpy(), c, rtol=1e-10, atol=1e-12)
    _, jt = idf.jvp(ridge_t, (tensor(0.3), A, b), (tensor(1.0), 0 * A, 0 * b))
    _, jn = idf.jvp(ridge_np, (0.3, A.numpy(), b.numpy()), (1.0, 0 * A.numpy(), 0 * b.numpy()))
    np.testing.assert_allclose(jt.numpy(), jn, rtol=1e-10, atol=1e-12)


def _primal_only(problem):
    """The gallery solver, without its aux (qp returns `((x, y, z, ok), stats)`)."""
    if not problem.solver.has_aux:
        return problem.solver
    return lambda *a: problem.solver(*a)[0]


def _tree(f, t):
    return tuple(_tree(f, a) for a in t) if isinstance(t, tuple) else f(t)


def _cotangent(x):
    """A fixed cotangent shaped like `x` (an array or a tuple of arrays)."""
    if isinstance(x, tuple):
        return tuple(_cotangent(a) for a in x)
    return np.linspace(-1, 1, np.asarray(x).size).reshape(np.shape(x))


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_gallery_matches_numpy_reference(name):
    problem = GALLERY[name]
    args_n = problem.make_args("numpy")
    args_t = problem.make_args("torch")
    xn, vjp_n = idf.vjp(problem.solver, *args_n)
    _xt, vjp_t = idf.vjp(_primal_only(problem), *args_t)
    ct = _cotangent(xn[0] if problem.solver.has_aux else xn)
    for gt, gn in zip(vjp_t(_tree(torch.tensor, ct)), vjp_n(ct)):
        if gn is None:
            continue
        np.testing.assert_allclose(gt.numpy(), gn, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_gallery_matches_jax_backend(name):
    jax = pytest.importorskip("jax")
    pytest.importorskip("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    problem = GALLERY[name]
    args_j = problem.make_args("jax")
    args_t = problem.make_args("torch")
    xj, vjp_j = jax.vjp(_primal_only(problem), *args_j)
    ct = _cotangent(xj)
    gj = vjp_j(_tree(jax.numpy.asarray, ct))
    _, vjp_t = torch.func.vjp(_primal_only(problem), *args_t)
    for gt_, gj_ in zip(vjp_t(_tree(torch.tensor, ct)), gj):
        np.testing.assert_allclose(gt_.numpy(), np.asarray(gj_), rtol=1e-9, atol=1e-11)


# ---- failures ----------------------------------------------------------------------------------

def _bad_fp(on_failure, batch_dims=0):
    @idf.custom_fixed_point(T, on_failure=on_failure, batch_dims=batch_dims)
    def fp(W, U, th):
        return unrolled(W, U, th, iters=3)  # stops far from the fixed point

    return fp


def test_failing_forward_raise_warn_nan(fp_data):
    W, U, th = fp_data
    with pytest.raises(idf.NonConvergenceError, match="stopped far from the root"):
        _bad_fp("raise")(W, U, th.clone().requires_grad_())
    with pytest.warns(RuntimeWarning, match="stopped far from the root"):
        x = _bad_fp("warn")(W, U, th.clone().requires_grad_())
    assert torch.isfinite(x).all()
    x = _bad_fp("nan")(W, U, th.clone().requires_grad_())
    assert torch.isnan(x).all()

    @idf.custom_fixed_point(T)
    def nan_solver(W, U, th):
        return torch.full((W.shape[0],), float("nan"), dtype=W.dtype)

    with pytest.raises(idf.NonConvergenceError, match="NaN"):
        nan_solver(W, U, th)


def test_failing_forward_nan_per_element_in_a_batch(fp_data):
    W, U, th = fp_data

    @idf.custom_fixed_point(lambda x, W, U, th: torch.tanh(x @ W.T + th @ U.T),
                            on_failure="nan", batch_dims=1)
    def fp(W, U, ths):
        x = torch.zeros(ths.shape[0], W.shape[0], dtype=W.dtype)
        for _ in range(120):
            x = torch.tanh(x @ W.T + ths @ U.T)
        x[1] += 0.5  # element 1 is not a fixed point
        return x

    ths = torch.stack([th, 2 * th, -th])
    Wr = W.clone().requires_grad_()
    x = fp(Wr, U, ths)
    assert torch.isnan(x[1]).all() and torch.isfinite(x[[0, 2]]).all()
    x[[0, 2]].pow(2).sum().backward()  # the failed element contributes nothing
    W2 = W.clone().requires_grad_()
    sum(unrolled(W2, U, t).pow(2).sum() for t in (th, -th)).backward()
    assert rel(Wr.grad, W2.grad) < 1e-10
    # under vmap, the failure is per element too
    f1 = _bad_fp("nan")
    out = torch.func.vmap(lambda t: f1(W, U, t))(ths)
    assert torch.isnan(out).all()


def test_singular_jacobian_is_reported_and_ridge_fixes_it():
    def F(x, th):  # dF/dx = diag(1, 0): singular
        return torch.stack([x[0] - th[0], 0 * x[1]])

    def solver(th):
        return torch.stack([th[0], torch.zeros_like(th[0])])

    th = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    for solve in (idf.Dense(), idf.GMRES()):
        f = idf.custom_root(F, solve=solve)(solver)
        with pytest.raises(idf.LinearSolveError):
            f(th).sum().backward()
    with pytest.raises(idf.SingularJacobianError, match="ridge"):
        idf.custom_root(F, solve=idf.Dense())(solver)(th).sum().backward()
    f = idf.custom_root(F, solve=idf.Dense(ridge=1e-8))(solver)
    f(th).sum().backward()
    assert torch.isfinite(th.grad).all()


def test_backward_solve_failure_modes(fp_data):
    W, U, th = fp_data
    tight = idf.GMRES(maxiter=1, restart=1, rtol=1e-14)
    with pytest.raises(idf.LinearSolveError, match="did not converge"):
        make_fp(tight)(W, U, th.clone().requires_grad_()).sum().backward()
    t = th.clone().requires_grad_()
    make_fp(tight, on_failure="nan")(W, U, t).sum().backward()
    assert torch.isnan(t.grad).all()


def test_structure_errors(fp_data):
    _W, _U, th = fp_data

    @idf.custom_root(lambda x, th: x[:2] - th[:2])
    def wrong_shape(th):
        return th.clone()

    with pytest.raises(idf.StructureError, match="shape"):
        wrong_shape(th.clone().requires_grad_())

    @idf.custom_root(lambda x, th: x - th)
    def integer_out(th):
        return torch.arange(3)

    with pytest.raises(idf.StructureError, match="floating"):
        integer_out(th)


# ---- batched problems --------------------------------------------------------------------------

def _batched_fp(solve, batch_dims):
    def Tb(z, W, U, x):
        return torch.tanh(z @ W.T + x @ U.T)

    @idf.custom_fixed_point(Tb, solve=solve, batch_dims=batch_dims)
    def fp(W, U, x):
        z = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype)
        for _ in range(120):
            z = Tb(z, W, U, x)
        return z

    return fp


@pytest.mark.parametrize("solve", [idf.Auto(), idf.GMRES(), idf.BiCGStab(), idf.Dense()],
                         ids=lambda s: type(s).__name__)
def test_batch_dims_gives_summed_gradients_and_per_element_diagnostics(fp_data, rng, solve):
    W, U, _ = fp_data
    xs = tensor(rng.standard_normal((6, U.shape[1])))
    Wr, Ur = req(W, U)
    with idf.diagnostics() as d:
        z = _batched_fp(solve, 1)(Wr, Ur, xs)
        (z ** 2).sum().backward()
    assert d.forward[-1].per_element.shape == (6,)
    assert np.shape(d.backward[-1].iterations) == (6,)
    assert np.all(d.backward[-1].converged)
    W2, U2 = req(W, U)
    sum((unrolled(W2, U2, x) ** 2).sum() for x in xs).backward()  # sum over the batch
    assert rel(Wr.grad, W2.grad) < 1e-9 and rel(Ur.grad, U2.grad) < 1e-9
    W3, U3 = req(W, U)
    (_batched_fp(solve, 0)(W3, U3, xs) ** 2).sum().backward()
    assert rel(Wr.grad, W3.grad) < 1e-9


def test_vmap_around_a_batched_problem(fp_data, rng):
    # the backward under vmap is one linear solve over both batch dimensions
    W, U, _ = fp_data
    fp = _batched_fp(idf.BiCGStab(), 1)
    xs = tensor(rng.standard_normal((3, 4, U.shape[1])))  # vmap over 3, batch of 4

    def loss(W_, x):
        return (fp(W_, U, x) ** 2).sum()

    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(W, xs)
    for i in range(3):
        W2 = W.clone().requires_grad_()
        sum((unrolled(W2, U, x) ** 2).sum() for x in xs[i]).backward()
        assert rel(g[i], W2.grad) < 1e-9


def test_batch_dims_must_match_the_leaves(fp_data):
    _W, _U, _th = fp_data
    f = idf.custom_root(lambda x, th: (x[0] - th, x[1] - th[:2]), batch_dims=1)(
        lambda th: (th.clone(), th[:2].clone()))
    with pytest.raises(idf.StructureError, match="batch"):
        f(torch.ones(3, 4, dtype=DT))
    with pytest.raises(ValueError, match="batch_dims"):
        idf.custom_root(lambda x: x, batch_dims=-1)


def test_batched_dense_solve_at_sizes_where_batched_lu_breaks(rng, capfd):
    # torch 2.13's CPU build: batched LU with n >= 150 and 2 threads fails (and prints MKL
    # errors to stdout) or hangs at n = 150. The Dense path solves one matrix at a time there.
    n, B = 160, 3
    A = tensor(rng.standard_normal((B, n, n)) / np.sqrt(n) + 3 * np.eye(n))
    b = tensor(rng.standard_normal((B, n)))

    def F(x, A, b):
        return (A @ x[..., None])[..., 0] - b

    @idf.custom_root(F, solve=idf.Dense(), batch_dims=1)
    def solve(A, b):
        return torch.stack([torch.linalg.solve(A[i], b[i]) for i in range(B)])

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        br = b.clone().requires_grad_()
        x = solve(A, br)
        (g,) = torch.autograd.grad(x.sum(), br)
    finally:
        torch.set_num_threads(threads)
    ref = torch.stack([torch.linalg.solve(A[i].T, torch.ones(n, dtype=DT)) for i in range(B)])
    assert rel(g, ref) < 1e-12
    out = capfd.readouterr()
    assert "MKL" not in out.out and "MKL" not in out.err


# ---- aux, diagnostics, transforms of the core --------------------------------------------------

def test_has_aux_passes_through(fp_data):
    W, U, th = fp_data

    @idf.custom_fixed_point(T, has_aux=True)
    def fp(W, U, th):
        return unrolled(W, U, th), {"iters": 120, "res": torch.tensor(0.0)}

    t = th.clone().requires_grad_()
    x, aux = fp(W, U, t)
    assert aux["iters"] == 120 and not aux["res"].requires_grad
    x.sum().backward()
    assert t.grad is not None
    xs, auxs = torch.func.vmap(lambda s: (lambda o: (o[0], o[1]["res"]))(fp(W, U, s)))(
        torch.stack([th, -th]))
    assert xs.shape == (2, W.shape[0]) and auxs.shape == (2,)


def test_diagnostics_records(fp_data):
    W, U, th = fp_data
    with idf.diagnostics() as d:
        make_fp(idf.GMRES())(W, U, th.clone().requires_grad_()).sum().backward()
    assert d.forward[-1].ok and d.forward[-1].residual_norm < 1e-12
    rec = d.backward[-1]
    assert rec.mode == "vjp" and bool(rec.converged) and int(rec.iterations) > 0


def test_idf_transforms_with_tensors(fp_data):
    W, U, th = fp_data
    fp = make_fp()
    J = idf.jacobian(fp, argnums=2)(W, U, th)
    assert rel(J, torch.func.jacrev(unrolled, argnums=2)(W, U, th)) < 1e-10
    v = torch.ones_like(th)
    _, jv = idf.jvp(fp, (W, U, th), (None, None, v))
    assert rel(jv, J @ v) < 1e-10


def test_implicit_vjp_rule_directly(fp_data):
    W, U, th = fp_data
    F = idf.custom_fixed_point(T)(unrolled).F
    x = unrolled(W, U, th)
    u = torch.ones_like(x)
    _gW, _gU, gt = idf.implicit_vjp(F, x, (W, U, th), u, solve=idf.Dense())
    t2 = th.clone().requires_grad_()
    unrolled(W, U, t2).sum().backward()
    assert rel(gt, t2.grad) < 1e-10
    xd = idf.implicit_jvp(F, x, (W, U, th), (None, None, torch.ones_like(th)),
                          solve=idf.GMRES())
    assert rel(xd, torch.func.jvp(lambda t: unrolled(W, U, t), (th,), (torch.ones_like(th),))[1]
               ) < 1e-10


# ---- torch.compile -----------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_gives_eager_gradients(rng):
    import importlib.util

    if importlib.util.find_spec("jax") is not None:
        import jax  # noqa: F401  (with jax loaded, the registry must still be traceable)
    torch._dynamo.reset()

    def Tc(z, W, U, b, x):
        return torch.tanh(z @ W.T + x @ U.T + b)

    @idf.custom_fixed_point(Tc, solve=idf.BiCGStab())
    def deq(W, U, b, x):
        z = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype)
        for _ in range(50):
            z = Tc(z, W, U, b, x)
        return z

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.inp = torch.nn.Linear(5, 8)
            self.W = torch.nn.Parameter(0.05 * torch.randn(16, 16, generator=g))
            self.U = torch.nn.Parameter(torch.randn(16, 8, generator=g) / 3)
            self.b = torch.nn.Parameter(torch.zeros(16))
            self.out = torch.nn.Linear(16, 1)

        def forward(self, x):
            z = deq(self.W, self.U, self.b, torch.relu(self.inp(x)))
            return self.out(z).pow(2).mean()

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    model(x).backward()
    eager = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inductor's own deprecation chatter
        torch.compile(model)(x).backward()
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, eager[k], rtol=1e-5, atol=1e-7), k


def test_scalar_root_from_a_numpy_solver():
    def F(x, t):
        return x**3 + x - t

    @idf.custom_root(F)
    def cubic(t):
        x = np.asarray(t.detach())
        for _ in range(60):
            x = x - (x**3 + x - np.asarray(t.detach())) / (3 * x**2 + 1)
        return x

    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x = cubic(t)
    assert x.shape == () and x.dtype == torch.float64
    x.backward()
    assert abs(float(t.grad) - 1 / (3 * float(x.detach()) ** 2 + 1)) < 1e-12
