"""Grokfast (Lee et al., 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients", arXiv 2405.20233).

Each optimizer step, before clipping and the step itself, every gradient g gets its slow component added back:

    ema:  mu <- alpha * mu + (1 - alpha) * g        g <- g + lamb * mu        (mu starts at the first g)
    ma:   mu  = mean of the last `window` gradients  g <- g + lamb * mu        (once `window` are held)

In a Mixture of Experts many parameters get no gradient in a step: a whole module the batch did not use comes back
with `grad is None` (a grown group that did not route, a front-end of another task), and an expert no token was sent
to comes back as exactly-zero rows of its stacked tensor. Both mean "no gradient this step", and both are left alone:
their average is not updated (no zero is averaged in) and their gradient stays None or zero (turning None into
lamb * mu would make AdamW move a parameter the batch never touched, by momentum and weight decay). A row is a slice
along the first axis of a parameter of two or more axes (one expert of a stacked expert tensor, one token's
embedding); a parameter of fewer axes is one row.

The averages live in the filter, not in Trainer checkpoints: a resumed run starts them again.

Not part of the Hub code: the training side (`WhisperMoETrainer(gradient_filter=...)`, `--grokfast`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

GROKFAST_FILTERS = ("ema", "ma")


def gradient_rows(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as (rows, rest): rows along the first axis for two or more axes, else one row. A view."""
    return grad.view(grad.shape[0], -1) if grad.dim() >= 2 else grad.view(1, -1)


class GradientFilter:
    """Grokfast's gradient filter: call it once per optimizer step on the model's named parameters, after the last
    backward of the step and before clipping (see the module docstring for the maths and the rows left alone).

    kind: "ema" (an exponential moving average with weight `alpha` on the past) or "ma" (the mean of the last
    `window` gradients, which holds `window` copies of every parameter); lamb: the slow component's weight.
    """

    def __init__(self, kind: str, alpha: float = 0.98, lamb: float = 2.0, window: int = 100):
        if kind not in GROKFAST_FILTERS:
            raise ValueError(f"grokfast must be one of {GROKFAST_FILTERS}, got {kind!r}.")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"grokfast_alpha must be in [0, 1), got {alpha}.")
        if lamb < 0:
            raise ValueError(f"grokfast_lamb must be non-negative, got {lamb}.")
        if window < 1:
            raise ValueError(f"grokfast_window must be at least 1, got {window}.")
        self.kind, self.alpha, self.lamb, self.window = kind, alpha, lamb, window
        self.average: dict[str, torch.Tensor] = {}  # name -> (rows, rest) float32: mu (ema) or the history sum (ma)
        self.count: dict[str, torch.Tensor] = {}  # name -> (rows,) gradients each row has averaged (ma: <= window)
        self.history: dict[str, torch.Tensor] = {}  # ma: name -> (window, rows, rest) ring of each row's gradients

    @torch.no_grad()
    def __call__(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Filter every parameter's `.grad` in place."""
        for name, parameter in named_parameters:
            if parameter.grad is None:
                continue  # no gradient this step: its average waits, its grad stays None
            if not parameter.grad.is_contiguous():
                parameter.grad = parameter.grad.contiguous()
            grad = gradient_rows(parameter.grad)
            received = grad.ne(0).any(dim=1)  # (rows,)
            if not bool(received.any()):
                continue
            if name not in self.average:
                self.average[name] = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
                self.count[name] = torch.zeros(grad.shape[0], dtype=torch.long, device=grad.device)
            slow = self._ema(name, grad, received) if self.kind == "ema" else self._ma(name, grad, received)
            grad.add_(self.lamb * slow.to(grad.dtype))

    def _ema(self, name: str, grad: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """Update the rows that received a gradient; returns mu on those rows, 0 elsewhere."""
        average, count, current = self.average[name], self.count[name], grad.float()
        first = (received & (count == 0))[:, None]  # a row's first gradient starts its average, as in the paper
        updated = torch.where(first, current, self.alpha * average + (1.0 - self.alpha) * current)
        average.copy_(torch.where(received[:, None], updated, average))
        count.add_(received.long())
        return average * received[:, None]

    def _ma(self, name: str, grad: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """Push the received rows into their rings; returns their mean on rows whose ring is full, 0 elsewhere."""
        if name not in self.history:
            self.history[name] = torch.zeros((self.window, *grad.shape), dtype=torch.float32, device=grad.device)
        history, total, count = self.history[name], self.average[name], self.count[name]
        rows = received.nonzero().squeeze(1)
        slot = count[rows] % self.window  # each row's oldest entry once its ring is full
        current = grad[rows].float()
        total[rows] += current - history[slot, rows]
        history[slot, rows] = current
        count[rows] += 1
        full = (count >= self.window) & received
        return total / self.window * full[:, None]
