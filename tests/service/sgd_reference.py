"""An independent reference for the engine's numbers: nothing from models/ or service/."""

from __future__ import annotations

import torch
from torch import Tensor

Params = dict[str, Tensor]


class Reference:
    """The 1-40-40-1 ReLU MLP written out by hand, adapted by plain-autograd SGD on the
    support MSE: no nn.Module, no torch.func, nothing from the service."""

    def __init__(self, params: Params) -> None:
        self.params = params

    @staticmethod
    def forward(p: Params, x: Tensor) -> Tensor:
        h = torch.relu(x @ p["body.0.weight"].T + p["body.0.bias"])
        h = torch.relu(h @ p["body.2.weight"].T + p["body.2.bias"])
        return h @ p["head.weight"].T + p["head.bias"]

    def adapt(
        self, xs: list[list[float]], ys: list[float], steps: int, lr: float
    ) -> tuple[Params, float, float]:
        """(adapted params, support loss before, support loss after)."""
        x, y = torch.tensor(xs), torch.tensor(ys).unsqueeze(-1)
        fast = {n: t.detach().clone().requires_grad_() for n, t in self.params.items()}
        losses = []
        for _ in range(steps):
            loss = ((self.forward(fast, x) - y) ** 2).mean()
            losses.append(loss.item())
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {
                n: (t - lr * g).detach().requires_grad_()
                for (n, t), g in zip(fast.items(), grads, strict=True)
            }
        after = ((self.forward(fast, x) - y) ** 2).mean().item()
        return {n: t.detach() for n, t in fast.items()}, losses[0], after

    def predict(self, fast: Params, xs: list[list[float]]) -> list[float]:
        out: list[float] = self.forward(fast, torch.tensor(xs)).squeeze(-1).tolist()
        return out
