"""The small PyTorch DEQ cell the DEQ tests share (import it after
`pytest.importorskip("torch")`)."""

from __future__ import annotations

import torch
from torch import nn


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x + b) with ‖W‖₂ = rho."""

    def __init__(self, h: int, d: int, rho: float, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Linear(h, h, bias=False)
        self.U = nn.Linear(d, h)
        with torch.no_grad():
            W = torch.randn(h, h, generator=g)
            self.W.weight.copy_(rho * W / torch.linalg.matrix_norm(W, 2))
            self.U.weight.copy_(torch.randn(h, d, generator=g) / d ** 0.5)
            self.U.bias.copy_(0.1 * torch.randn(h, generator=g))

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))
