"""PyTorch backend, adversarial cases (issue 11, "no silently wrong derivative").

1. Closures: a condition `F` that reads a tensor from its closure (a closure cell, a default
   argument, a bound method of an `nn.Module`, a nested function, `functools.partial`, a module
   swapped by `torch.func.functional_call`) under every torch autodiff mode and transform. Under
   `torch.func` transforms the tensor is lifted to an input of the implicit function, so its
   derivative is right; where it cannot be found, a `StructureError` names it. Eager autograd
   keeps rejecting a closure over a tensor that requires grad (pass it as an argument).
2. Foreign crashes: size-0 x, the `meta` device, complex dtypes.

Oracle: autograd (or `torch.func`) through a long unrolled fixed-point iteration of the same
map in plain torch (no implicitdiff code), and central finite differences.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("implicitdiff_torch")

import implicitdiff as idf  # noqa: E402

DT = torch.float64
N = 4


def T(x, W, th):
    return torch.tanh(W @ x + th)


def unrolled(W, th, iters=200):
    x = torch.zeros(W.shape[-1], dtype=W.dtype)
    for _ in range(iters):
        x = T(x, W, th)
    return x


def _iterate(f, x0, iters=200):
    x = x0
    for _ in range(iters):
        x = f(x)
    return x


@pytest.fixture
def data():
    g = np.random.default_rng(0)
    W = torch.tensor(0.3 * g.standard_normal((N, N)) / np.sqrt(N), dtype=DT)
    th = torch.tensor(g.standard_normal(N), dtype=DT)
    v = torch.tensor(g.standard_normal(N), dtype=DT)
    dW = torch.tensor(g.standard_normal((N, N)), dtype=DT)
    return W, th, v, dW


def rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def closure_solver(W):
    """A solver whose condition reads `W` from its closure (not an argument)."""

    @idf.custom_fixed_point(lambda x, th: T(x, W, th))
    def fp(th):
        with torch.no_grad():
            return _iterate(lambda x: T(x, W.detach(), th), torch.zeros_like(th))

    return fp


def loss_closure(W, th, v):
    return closure_solver(W)(th) @ v


def loss_oracle(W, th, v):
    return unrolled(W, th) @ v


# ---- 1. closures under every transform --------------------------------------------------------

def test_eager_closure_is_rejected_with_a_clear_error(data):
    W, th, v, _ = data
    Wr = W.clone().requires_grad_()
    with pytest.raises(idf.StructureError, match="argument"):
        loss_closure(Wr, th, v).backward()


def test_func_grad_closure(data):
    W, th, v, _ = data
    got = torch.func.grad(loss_closure)(W, th, v)
    want = torch.func.grad(loss_oracle)(W, th, v)
    assert rel(got, want) < 1e-10


def test_func_grad_closure_and_argument(data):
    W, th, v, _ = data
    got = torch.func.grad(loss_closure, argnums=(0, 1))(W, th, v)
    want = torch.func.grad(loss_oracle, argnums=(0, 1))(W, th, v)
    assert rel(got[0], want[0]) < 1e-10 and rel(got[1], want[1]) < 1e-10


def test_func_vjp_closure(data):
    W, th, v, _ = data
    out, f = torch.func.vjp(lambda W: closure_solver(W)(th), W)
    out2, f2 = torch.func.vjp(lambda W: unrolled(W, th), W)
    assert rel(out, out2) < 1e-12
    assert rel(f(v)[0], f2(v)[0]) < 1e-10


def test_func_jacrev_closure(data):
    W, th, _, _ = data
    got = torch.func.jacrev(lambda W: closure_solver(W)(th))(W)
    want = torch.func.jacrev(lambda W: unrolled(W, th))(W)
    assert rel(got, want) < 1e-10


def test_func_jacfwd_closure(data):
    W, th, _, _ = data
    got = torch.func.jacfwd(lambda W: closure_solver(W)(th))(W)
    want = torch.func.jacrev(lambda W: unrolled(W, th))(W)
    assert rel(got, want) < 1e-10


def test_func_jvp_closure_against_finite_differences(data):
    W, th, _, dW = data
    _, got = torch.func.jvp(lambda W: closure_solver(W)(th), (W,), (dW,))
    eps = 1e-6
    fd = (unrolled(W + eps * dW, th, 400) - unrolled(W - eps * dW, th, 400)) / (2 * eps)
    assert rel(got, fd) < 1e-7
    _, want = torch.func.jvp(lambda W: unrolled(W, th), (W,), (dW,))
    assert rel(got, want) < 1e-10


def test_autograd_forward_ad_closure(data):
    import torch.autograd.forward_ad as fwAD

    W, th, _, dW = data
    with fwAD.dual_level():
        Wd = fwAD.make_dual(W, dW)
        got = fwAD.unpack_dual(closure_solver(Wd)(th)).tangent
    _, want = torch.func.jvp(lambda W: unrolled(W, th), (W,), (dW,))
    assert got is not None and rel(got, want) < 1e-10


def test_vmap_over_a_closed_over_tensor(data):
    W, th, _, _ = data
    Ws = torch.stack([W, 0.5 * W, -W])
    got = torch.func.vmap(lambda W: closure_solver(W)(th))(Ws)
    want = torch.stack([unrolled(w, th) for w in Ws])
    assert rel(got, want) < 1e-12


def test_vmap_of_grad_closure(data):
    W, th, v, _ = data
    Ws = torch.stack([W, 0.5 * W, -W])
    got = torch.func.vmap(torch.func.grad(loss_closure), in_dims=(0, None, None))(Ws, th, v)
    want = torch.stack([torch.func.grad(loss_oracle)(w, th, v) for w in Ws])
    assert rel(got, want) < 1e-10


def test_hessian_closure(data):
    W, th, v, _ = data
    got = torch.func.hessian(lambda th_: closure_solver(W * (1 + th_[0]))(th) @ v)(th)
    want = torch.func.hessian(lambda th_: loss_oracle(W * (1 + th_[0]), th, v))(th)
    assert rel(got, want) < 1e-8


def test_closure_through_default_argument_and_partial(data):
    W, th, v, _ = data

    def loss(W):
        def F(x, th, W=W):
            return T(x, W, th) - x

        @idf.custom_root(functools.partial(F))
        def fp(th):
            with torch.no_grad():
                return _iterate(lambda x: T(x, W, th), torch.zeros_like(th))

        return fp(th) @ v

    got = torch.func.grad(loss)(W)
    assert rel(got, torch.func.grad(loss_oracle)(W, th, v)) < 1e-10


def test_closure_through_a_nested_function(data):
    W, th, v, _ = data

    def loss(W):
        def inner(x, th):
            return W @ x + th

        @idf.custom_fixed_point(lambda x, th: torch.tanh(inner(x, th)))
        def fp(th):
            with torch.no_grad():
                return _iterate(lambda x: T(x, W, th), torch.zeros_like(th))

        return fp(th) @ v

    got = torch.func.grad(loss)(W)
    assert rel(got, torch.func.grad(loss_oracle)(W, th, v)) < 1e-10


class Cell(torch.nn.Module):
    """A DEQ-style module: the condition is a bound method reading `self.W` and a submodule."""

    def __init__(self, W):
        super().__init__()
        self.W = torch.nn.Parameter(W.clone())
        self.lin = torch.nn.Linear(N, N, dtype=DT)
        with torch.no_grad():
            self.lin.weight.mul_(0.1)

    def T(self, x, th):
        return torch.tanh(self.W @ x + self.lin(th))

    def residual(self, x, th):
        return self.T(x, th) - x

    def forward(self, th):
        @idf.custom_root(self.residual)
        def fp(th):
            with torch.no_grad():
                return _iterate(lambda x: self.T(x, th), torch.zeros_like(th))

        return fp(th)

    def unrolled(self, th):
        return _iterate(lambda x: self.T(x, th), torch.zeros_like(th))


class CellNested(Cell):
    """The condition is a nested function closing over `self`."""

    def forward(self, th):
        def F(x, th):
            return self.T(x, th) - x

        @idf.custom_root(F)
        def fp(th):
            with torch.no_grad():
                return self.unrolled(th)

        return fp(th)


@pytest.mark.parametrize("cls", [Cell, CellNested])
def test_functional_call_module_maml(data, cls):
    W, th, v, _ = data
    model = cls(W)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}

    def loss(p):
        return torch.func.functional_call(model, p, (th,)) @ v

    def oracle(p):
        return torch.func.functional_call(model, p, (th,), strict=False) @ v

    got = torch.func.grad(loss)(params)
    model.forward = model.unrolled  # the same module, differentiated through the iterations
    want = torch.func.grad(oracle)(params)
    for k in params:
        assert rel(got[k], want[k]) < 1e-10, k


def test_functional_call_inner_step_maml(data):
    """MAML: one inner gradient step on swapped parameters, then an outer gradient."""
    W, th, v, _ = data
    model = Cell(W)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}

    def inner_loss(p):
        return torch.func.functional_call(model, p, (th,)) @ v

    def outer(p):
        g = torch.func.grad(inner_loss)(p)
        fast = {k: p[k] - 0.1 * g[k] for k in p}
        return torch.func.functional_call(model, fast, (th,)).pow(2).sum()

    got = torch.func.grad(outer)(params)
    model.forward = model.unrolled
    want = torch.func.grad(outer)(params)
    for k in params:
        assert rel(got[k], want[k]) < 1e-8, k


def test_eager_module_closure_is_rejected(data):
    W, th, v, _ = data
    model = Cell(W)
    with pytest.raises(idf.StructureError, match="argument"):
        (model(th) @ v).backward()


def test_unreachable_closure_under_transform_is_a_clear_error(data):
    """A tensor reached through a route the lifting does not follow (here a list inside an
    opaque object's slot) is refused by name instead of getting a zero gradient."""
    W, th, v, _ = data

    class Opaque:
        __slots__ = ("box",)

    def loss(W):
        o = Opaque()
        o.box = [W]

        @idf.custom_fixed_point(lambda x, th: T(x, o.box[0], th))
        def fp(th):
            with torch.no_grad():
                return _iterate(lambda x: T(x, W, th), torch.zeros_like(th))

        return fp(th) @ v

    try:
        g = torch.func.grad(loss)(W)
    except idf.StructureError as e:
        assert "argument" in str(e)
    else:
        assert rel(g, torch.func.grad(loss_oracle)(W, th, v)) < 1e-10


def test_closure_constant_needs_no_gradient(data):
    """A closure over a tensor that needs no derivative is fine under a transform."""
    W, th, v, _ = data
    got = torch.func.grad(lambda th: closure_solver(W)(th) @ v)(th)
    want = torch.func.grad(lambda th: loss_oracle(W, th, v))(th)
    assert rel(got, want) < 1e-10


# ---- 2. foreign crashes ----------------------------------------------------------------------

def lin_F(x, th):
    return 2 * x - th


@idf.custom_root(lin_F)
def lin_solve(th):
    return th / 2


def test_size_zero_x():
    th = torch.zeros(0, dtype=DT, requires_grad=True)
    x = lin_solve(th)
    assert x.shape == (0,)
    x.sum().backward()
    assert th.grad is not None and th.grad.shape == (0,)
    g = torch.func.grad(lambda t: lin_solve(t).sum())(torch.zeros(0, dtype=DT))
    assert g.shape == (0,)


def test_size_zero_x_batch_of_problems():
    th = torch.zeros(3, 0, dtype=DT, requires_grad=True)

    @idf.custom_root(lin_F, batch_dims=1)
    def solve(th):
        return th / 2

    solve(th).sum().backward()
    assert th.grad is not None and th.grad.shape == (3, 0)


def test_meta_device_forward_propagates_shapes():
    th = torch.empty(5, dtype=DT, device="meta")
    x = lin_solve(th)
    assert x.shape == (5,) and x.device.type == "meta" and x.dtype == DT


def test_meta_device_backward_is_shape_only_or_refused():
    th = torch.empty(5, dtype=DT, device="meta", requires_grad=True)
    try:
        x = lin_solve(th)
        x.sum().backward()
    except idf.StructureError as e:
        assert "meta" in str(e)
    else:
        assert th.grad is not None and th.grad.shape == (5,) and th.grad.device.type == "meta"


def test_complex_theta_is_correct_or_refused():
    g = np.random.default_rng(1)
    z = torch.tensor(g.standard_normal(3) + 1j * g.standard_normal(3), requires_grad=True)

    def F(x, z):
        return 2 * x - (z * z.conj()).real - z.real

    @idf.custom_root(F)
    def solve(z):
        return ((z * z.conj()).real + z.real) / 2

    try:
        x = solve(z)
        x.sum().backward()
    except idf.StructureError as e:
        assert "complex" in str(e)
        return
    # torch's convention: grad = dL/d(re) + i dL/d(im) for a real loss L
    zd = z.detach()

    def loss(re, im):
        w = torch.complex(re, im)
        return (((w * w.conj()).real + w.real) / 2).sum()

    gre, gim = torch.func.grad(loss, argnums=(0, 1))(zd.real, zd.imag)
    assert z.grad is not None
    assert rel(z.grad, torch.complex(gre, gim)) < 1e-10


def test_complex_theta_under_func_grad_is_correct_or_refused():
    g = np.random.default_rng(2)
    z = torch.tensor(g.standard_normal(3) + 1j * g.standard_normal(3))

    def F(x, z):
        return 2 * x - z.real * z.imag

    @idf.custom_root(F)
    def solve(z):
        return z.real * z.imag / 2

    try:
        got = torch.func.grad(lambda z: solve(z).sum())(z)
    except idf.StructureError as e:
        assert "complex" in str(e)
        return
    want = torch.complex(z.imag / 2, z.real / 2)
    assert rel(got, want) < 1e-10


def test_complex_x_is_correct_or_refused():
    g = np.random.default_rng(3)
    z = torch.tensor(g.standard_normal(3) + 1j * g.standard_normal(3), requires_grad=True)

    @idf.custom_root(lambda x, z: 2 * x - z)
    def solve(z):
        return z / 2

    try:
        x = solve(z)
        x.abs().pow(2).sum().backward()
    except idf.StructureError as e:
        assert "complex" in str(e)
        return
    assert z.grad is not None and rel(z.grad, z.detach() / 2) < 1e-10


_GLOBAL_W = None


def test_closure_through_a_global_and_an_object_attribute(data):
    W, th, v, _ = data

    class Holder:
        def __init__(self, W):
            self.W = W

    def F_global(x, th):
        return T(x, _GLOBAL_W, th) - x

    def loss(W, via):
        global _GLOBAL_W
        _GLOBAL_W = W
        h = Holder(W)
        F = F_global if via == "global" else (lambda x, th: T(x, h.W, th) - x)

        @idf.custom_root(F)
        def fp(th):
            with torch.no_grad():
                return _iterate(lambda x: T(x, W, th), torch.zeros_like(th))

        return fp(th) @ v

    want = torch.func.grad(loss_oracle)(W, th, v)
    for via in ("global", "attribute"):
        assert rel(torch.func.grad(loss)(W, via), want) < 1e-10, via


def test_eager_parameters_under_vmap_of_the_input(data):
    """vmap over the input only, then `.backward()` in eager autograd: the module's parameters
    (plain tensors that require grad, closed over by F) get their gradient."""
    W, th, v, _ = data
    model = Cell(W)
    ths = torch.stack([th, 0.5 * th, -th])
    (torch.func.vmap(model)(ths) @ v).sum().backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    torch.stack([model.unrolled(t) @ v for t in ths]).sum().backward()
    for k, p in model.named_parameters():
        assert rel(got[k], p.grad) < 1e-10, k


def test_solver_reading_a_vmapped_closure(data):
    """Only the solver reads the mapped tensor (F takes it as an argument under another
    name): the vmap rule must still give each element its own slice."""
    W, th, _, _ = data
    Ws = torch.stack([W, 0.5 * W, -W])

    def f(W):
        @idf.custom_fixed_point(T)
        def fp(W_arg, th):
            with torch.no_grad():
                return _iterate(lambda x: T(x, W, th), torch.zeros_like(th))

        return fp(W, th)

    got = torch.func.vmap(f)(Ws)
    assert rel(got, torch.stack([unrolled(w, th) for w in Ws])) < 1e-12


def test_size_zero_x_forward_mode():
    t = torch.zeros(0, dtype=DT)
    _, xd = torch.func.jvp(lin_solve, (t,), (torch.ones(0, dtype=DT),))
    assert xd.shape == (0,)
    assert torch.func.jacfwd(lin_solve)(t).shape == (0, 0)


def test_meta_device_wrong_residual_shape_is_still_refused():
    @idf.custom_root(lambda x, th: th[:2] - x[:2])
    def bad(th):
        return th / 2

    with pytest.raises(idf.StructureError):
        bad(torch.empty(5, dtype=DT, device="meta"))


def test_closure_read_inside_a_transform_that_F_runs(data):
    """F is the gradient of an energy (torch.func.grad inside F) that closes over W."""
    W, th, v, _ = data
    eye = torch.eye(N, dtype=DT)

    def loss(W):
        def energy(y, th):
            return 0.5 * y @ y + 0.5 * (W @ y) @ (W @ y) - th @ y

        @idf.custom_root(lambda x, th: torch.func.grad(energy)(x, th))
        def argmin(th):
            return torch.linalg.solve(eye + W.T @ W, th)

        return argmin(th) @ v

    def oracle(W):
        return torch.linalg.solve(eye + W.T @ W, th) @ v

    assert rel(torch.func.grad(loss)(W), torch.func.grad(oracle)(W)) < 1e-10
    assert rel(torch.func.jacfwd(loss)(W), torch.func.jacrev(oracle)(W)) < 1e-10


def test_solver_reading_an_unfound_vmapped_tensor_is_a_clear_error(data):
    W, th, _, _ = data
    Ws = torch.stack([W, 0.5 * W])

    class Opaque:
        __slots__ = ("box",)

    def f(W):
        o = Opaque()
        o.box = [W]

        @idf.custom_fixed_point(T)
        def fp(W_arg, th):
            with torch.no_grad():
                return _iterate(lambda x: T(x, o.box[0], th), torch.zeros_like(th))

        return fp(W, th)

    with pytest.raises(idf.StructureError, match="argument"):
        torch.func.vmap(f)(Ws)


def test_diagnostics_inside_func_vjp_with_a_nonlinear_condition():
    # idf.diagnostics() asks for products with A inside the backward of torch.func.vjp; reverse
    # mode twice (the transposed vjp) crossed torch.func levels there and crashed with an
    # internal assert when F is nonlinear in x. Forward mode serves instead.
    def F(w, a, M):
        x, o = w
        return (M @ x - a, o - o * o)

    @idf.custom_root(F, solve=idf.Dense(), has_aux=True, kink_probe=False)
    def solver(a, M):
        return (torch.linalg.solve(M, a), torch.ones((), dtype=a.dtype)), {}

    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    M = 2.0 * torch.eye(3, dtype=torch.float64)
    with idf.diagnostics():
        _, pullback = idf.vjp(lambda a, M: solver(a, M)[0], a, M)
        ga, gM = pullback((torch.ones(3, dtype=torch.float64),
                           torch.zeros((), dtype=torch.float64)))
    # x = M⁻¹a = a/2: d(sum x)/da = 1/2, d(sum x)/dM = -(M⁻ᵀ1) xᵀ
    torch.testing.assert_close(ga, torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(gM, -torch.full((3, 1), 0.5, dtype=torch.float64) * (a / 2)[None, :])
