"""An implicit layer under `torch.nn.parallel.DistributedDataParallel`.

Two processes (gloo, CPU), spawned with a bounded wait, train a small model with a DEQ layer for a
few SGD steps on their halves of a batch. DDP averages the gradients across processes, so every
step must equal a single-process step on the whole batch (DEQ and adjoint users report lost or
zero gradients on several GPUs: deq#6, torchdiffeq#119).
"""

from __future__ import annotations

import os
import socket
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("implicitdiff_torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import implicitdiff as idf  # noqa: E402

WORLD = 2
STEPS = 3
TIMEOUT_S = 120


def _T(z, W, U, b, h):
    return torch.tanh(z @ W.T + h @ U.T + b)


@idf.custom_fixed_point(_T, batch_dims=1)
def _deq(W, U, b, h):
    z = torch.zeros(h.shape[0], W.shape[0], dtype=h.dtype)
    for _ in range(80):
        z = _T(z, W, U, b, h)
    return z


class ImplicitNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp = torch.nn.Linear(6, 8).double()
        self.W = torch.nn.Parameter(0.05 * torch.randn(8, 8, generator=g, dtype=torch.float64))
        self.U = torch.nn.Parameter(torch.randn(8, 8, generator=g, dtype=torch.float64) / 3)
        self.b = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
        self.out = torch.nn.Linear(8, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = _deq(self.W, self.U, self.b, torch.tanh(self.inp(x)))
        return self.out(z)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 6, generator=g, dtype=torch.float64),
            torch.randn(8, 2, generator=g, dtype=torch.float64))


def _model() -> ImplicitNet:
    torch.manual_seed(0)
    return ImplicitNet()


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        grads.append({k: p.grad.detach().clone() for k, p in _named(model)})
        opt.step()
    return grads


def _named(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    inner = model.module if hasattr(model, "module") else model
    return list(inner.named_parameters())


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x, y = _data()
        shard = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        grads = _train(model, x[shard], y[shard])
        params = {k: p.detach().clone() for k, p in _named(model)}
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        del model  # the DDP reducer goes before its process group (a gloo teardown can hang)
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: the results are saved, and destructors of gloo/DDP state left to
    # the garbage collector at exit occasionally hang (about 1 run in 8 on this 2-core machine).
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

    x, y = _data()
    ref_grads = _train(_model(), x, y)
    ref_model = _model()
    _train(ref_model, x, y)
    ref_params = dict(ref_model.named_parameters())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for step, (g, r) in enumerate(zip(got["grads"], ref_grads)):
            for k in r:
                assert r[k].abs().max() > 0, k  # the implicit layer's parameters do learn
                torch.testing.assert_close(g[k], r[k], rtol=1e-9, atol=1e-12,
                                           msg=f"rank {rank}, step {step}, {k}")
        for k, p in got["params"].items():
            torch.testing.assert_close(p, ref_params[k].detach(), rtol=1e-9, atol=1e-12)
