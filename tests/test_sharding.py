"""Scale-out on JAX's own engine: `jit(grad)` of batched implicit layers with the batch sharded
over 4 devices (`NamedSharding`) equals the single-device result and keeps the batch sharded.

The 4 devices are host (CPU) devices forced by `XLA_FLAGS`, which must be set before JAX starts:
the checks run in a subprocess and report back as JSON. float64 throughout. The solvers are
per-element and free of LAPACK calls (fixed-point iteration forward, BiCGStab backward): several
batched LAPACK calls running side by side can deadlock XLA:CPU on small machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

B, N, D = 8, 5, 3  # batch (2 elements per device), state size, DEQ input size

CHILD = textwrap.dedent(
    f"""
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jax.tree_util import Partial

    jax.config.update("jax_enable_x64", True)
    import implicitdiff as idf
    import implicitdiff_jax
    from implicitdiff.deq import IFT
    from implicitdiff import solvers

    B, N, D = {B}, {N}, {D}
    devices = jax.devices()
    assert len(devices) == 4, devices
    mesh = Mesh(np.array(devices), ("batch",))
    rows = NamedSharding(mesh, P("batch"))       # the batch dimension over the 4 devices
    shared = NamedSharding(mesh, P())            # replicated parameters
    one = devices[0]
    rng = np.random.default_rng(0)
    W = jnp.asarray(0.4 * rng.standard_normal((N, N)) / np.sqrt(N))
    U = jnp.asarray(rng.standard_normal((N, D)) / np.sqrt(D))
    b = jnp.asarray(0.1 * rng.standard_normal(N))
    theta = jnp.asarray(rng.standard_normal((B, N)))
    x = jnp.asarray(rng.standard_normal((B, D)))
    out = {{}}

    def spec(a):  # the PartitionSpec as a list, without trailing unsharded dimensions
        if not isinstance(a.sharding, NamedSharding):
            return "not a NamedSharding: " + repr(a.sharding)
        s = list(a.sharding.spec)
        while s and s[-1] is None:
            s.pop()
        return s

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

    def gathers_outside_failure_branch(fn, *args):
        # the all-gathers of the compiled program, except those in the branch of the library's
        # one lax.cond, the one that reports a failed solve (branch 0: not all elements ok; it
        # runs only on failure)
        hlo = fn.lower(*args).compile().as_text()
        return [m.group(1) if (m := re.search(r'op_name="([^"]*)"', line)) else line[:200]
                for line in hlo.splitlines()
                if " all-gather(" in line and "/cond/branch_0_fun/" not in line]

    # ---- 1. custom_root, batch_dims=1: one solver call on the whole (sharded) batch ----------
    def T(z, W, theta):                          # row by row: z (B, N), theta (B, N)
        return jnp.tanh(z @ W.T + theta)

    def F(z, W, theta):
        return T(z, W, theta) - z

    @idf.custom_root(F, solve=idf.BiCGStab(), batch_dims=1)
    def root(W, theta):
        return solvers.fixed_point_iteration(T, jnp.zeros_like(theta), W, theta, tol=1e-14,
                                             maxiter=200).value

    def loss_root(W, theta):
        z = root(W, theta)
        return jnp.sum(jnp.sin(z) ** 2), z

    # ---- 2. custom_root of one problem, jax.vmap over the sharded batch -----------------------
    @idf.custom_root(F, solve=idf.BiCGStab())
    def root1(W, t):
        return solvers.fixed_point_iteration(T, jnp.zeros_like(t), W, t, tol=1e-14,
                                             maxiter=200).value

    def loss_vmap(W, theta):
        z = jax.vmap(root1, in_axes=(None, 0))(W, theta)
        return jnp.sum(jnp.sin(z) ** 2), z

    # ---- 3. the JAX DEQ: z* = f(params, z*, x), x sharded -------------------------------------
    def cell(p, z, x):
        return jnp.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])

    def loss_deq(p, x):
        z, stats = implicitdiff_jax.deq(Partial(cell, p), x, z_shape=(N,),
                                        solver="fixed_point_iteration",
                                        solver_options={{"tol": 1e-14, "maxiter": 200}},
                                        backward=IFT(idf.BiCGStab()))
        return jnp.sum((z - 0.3) ** 2), (z, stats.steps)

    cases = {{
        "custom_root_batch_dims": (loss_root, (W, theta)),
        "custom_root_vmap": (loss_vmap, (W, theta)),
        "deq": (loss_deq, ({{"W": W, "U": U, "b": b}}, x)),
    }}
    for name, (loss, (p, batch)) in cases.items():
        g = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        (gp1, gb1), aux1 = g(jax.device_put(p, one), jax.device_put(batch, one))
        ps, bs = jax.device_put(p, shared), jax.device_put(batch, rows)
        (gp, gb), aux = g(ps, bs)
        z = aux[0] if isinstance(aux, tuple) else aux
        z1 = aux1[0] if isinstance(aux1, tuple) else aux1
        out[name] = {{
            "solution_err": rel(z, z1),
            "grad_batch_err": rel(gb, gb1),
            "grad_shared_err": max(rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(gp),
                                                           jax.tree_util.tree_leaves(gp1))),
            "solution_spec": spec(z),
            "solution_shard_shapes": sorted({{tuple(s.data.shape) for s in z.addressable_shards}}),
            "grad_batch_spec": spec(gb),
            "grad_batch_shard_shapes": sorted({{tuple(s.data.shape)
                                               for s in gb.addressable_shards}}),
            "grad_shared_specs": [spec(a) for a in jax.tree_util.tree_leaves(gp)],
            "stats_spec": spec(aux[1]) if isinstance(aux, tuple) else None,
            "gathers": gathers_outside_failure_branch(g, ps, bs),
        }}

    # ---- 4. a failed element on device 2 under sharding -------------------------------------
    # "raise": every device raises the same error, naming the global element (no device is left
    # waiting at a collective); "nan": only that element is NaN, the batch stays sharded.
    def bad_solver(W, theta):
        z = solvers.fixed_point_iteration(T, jnp.zeros_like(theta), W, theta, tol=1e-14,
                                          maxiter=200).value
        return jnp.where(theta[:, :1] > 100, z + 1.0, z)      # element 5 is off its root

    theta_bad = jax.device_put(theta.at[5, 0].set(1000.0), rows)
    for policy in ("nan", "raise"):
        fn = idf.custom_root(F, solve=idf.BiCGStab(), batch_dims=1, on_failure=policy)(
            bad_solver)
        # the gradient of shared W: an all-reduce after the failure check
        g = jax.jit(jax.grad(lambda W, t: jnp.sum(jnp.nan_to_num(fn(W, t))), argnums=(0, 1)))
        try:
            gb = jax.block_until_ready(g(jax.device_put(W, shared), theta_bad))[1]
            out["fail_" + policy] = {{
                "spec": spec(gb),
                "nan_rows": np.flatnonzero(np.isnan(np.asarray(
                    jax.jit(fn)(jax.device_put(W, shared), theta_bad))).any(1)).tolist(),
            }}
            if policy == "nan":  # eagerly too: NaN made on the sharded rows, not one device
                out["fail_nan"]["eager_nan_rows"] = np.flatnonzero(np.isnan(np.asarray(
                    fn(jax.device_put(W, shared), theta_bad))).any(1)).tolist()
        except Exception as e:  # noqa: BLE001 (reported to the parent)
            out["fail_" + policy] = {{"error": type(e).__name__ + ": " + str(e)[-2000:]}}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                              text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the 4-device subprocess did not finish in {e.timeout} s (a deadlock?); "
                    f"stderr:\n{e.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"the 4-device subprocess failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    out = json.loads(lines[-1][len("RESULT "):])
    # XLA's SPMD partitioner warns when it must move a sharded value whole onto one device
    out["rematerialized"] = [ln[:300] for ln in proc.stderr.splitlines()
                             if "Involuntary full rematerialization" in ln]
    return out


CASES = ["custom_root_batch_dims", "custom_root_vmap", "deq"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_sharded_jit_grad_equals_single_device(result, case):
    r = result[case]
    assert r["solution_err"] < 1e-12, r
    assert r["grad_batch_err"] < 1e-12, r
    assert r["grad_shared_err"] < 1e-12, r


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_sharded_outputs_stay_sharded(result, case):
    r = result[case]
    # the solution and the per-sample gradients: the batch split over the 4 devices, 2 rows each
    assert r["solution_spec"] == ["batch"], r
    assert r["grad_batch_spec"] == ["batch"], r
    assert r["solution_shard_shapes"] == [[B // 4, N]], r
    assert r["grad_batch_shard_shapes"] == [[B // 4, r["grad_batch_shard_shapes"][0][1]]], r
    # shared parameters get the sum over the batch, replicated
    assert all(s == [] for s in r["grad_shared_specs"]), r
    if case == "deq":
        assert r["stats_spec"] == ["batch"], r
    # no all-gather in the compiled program, except in the branch that reports a failed solve
    assert r["gathers"] == [], r


@pytest.mark.timeout(300)
def test_no_sharded_value_is_moved_whole_to_one_device(result):
    assert result["rematerialized"] == []


@pytest.mark.timeout(300)
def test_sharded_failure_raises_on_every_device_and_names_the_element(result):
    err = result["fail_raise"].get("error", "")
    assert "stopped far from the root" in err and "batch elements (5,)" in err, result
    nan = result["fail_nan"]
    assert nan.get("nan_rows") == [5] and nan.get("spec") == ["batch"], nan
    assert nan.get("eager_nan_rows") == [5], nan
