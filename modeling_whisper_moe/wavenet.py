"""A WaveNet branch beside the decoder (`config.wavenet_branch`): WaveGPT's mix of logits, with a real WaveNet.

    logits = alpha * g(x) + (1 - alpha) * h(x)

h is the decoder's logits; g the logits of a WaveNet (van den Oord et al., 2016, arXiv 1609.03499) over the
decoder's token embeddings up to the current token: a 1x1 input projection, then layers of dilated causal
convolutions with gated activations tanh(W_f * x) * sigmoid(W_g * x), each adding a 1x1 projection to the residual
stream and another to the skip sum, then relu -> 1x1 -> relu -> 1x1 back to d_model and a LayerNorm (the scale the
decoder's final norm gives h). Both sides share the decoder's output head `proj_out` (no bias), so the mix is taken
on its inputs: proj_out((1 - alpha) h + alpha g) is the same sum for one vocabulary projection. alpha is learned
and starts at `alpha` (0: the decoder's logits are unchanged exactly, so a trained model keeps every output until
the branch is trained; the branch's weights get gradient once alpha has moved).

Causal by construction: every convolution is padded on the left only, by (kernel_size - 1) * dilation, so output t
reads inputs 0..t. Generation: output t reads the last `receptive_field` inputs, so each step runs the branch over
the last `receptive_field - 1 + new` tokens the generation already holds (`window`), a cost that does not grow with
the length and equals recomputing from the start: every value the new positions need lies inside that window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WaveNetLayer(nn.Module):
    """One dilated causal convolution with a gated activation; returns (residual output, skip output)."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.left_padding = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(channels, 2 * channels, kernel_size, dilation=dilation)  # filter and gate halves
        self.residual = nn.Conv1d(channels, channels, 1)
        self.skip = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, channels, time) -> two (batch, channels, time)."""
        filter_half, gate_half = self.conv(F.pad(x, (self.left_padding, 0))).chunk(2, dim=1)
        z = torch.tanh(filter_half) * torch.sigmoid(gate_half)
        return x + self.residual(z), self.skip(z)


class WaveNetBranch(nn.Module):
    """The branch and its mixing weight; `settings` are `WhisperMoEConfig.wavenet_settings()`."""

    def __init__(self, d_model: int, settings: dict):
        super().__init__()
        channels, kernel_size = settings["channels"], settings["kernel_size"]
        self.start_alpha = float(settings["alpha"])
        self.receptive_field = 1 + (kernel_size - 1) * sum(settings["dilations"])  # tokens output t reads
        self.input = nn.Conv1d(d_model, channels, 1)
        self.layers = nn.ModuleList(WaveNetLayer(channels, kernel_size, d) for d in settings["dilations"])
        self.output = nn.Sequential(nn.ReLU(), nn.Conv1d(channels, channels, 1), nn.ReLU(),
                                    nn.Conv1d(channels, d_model, 1))  # fmt: skip
        self.norm = nn.LayerNorm(d_model)
        self.alpha = nn.Parameter(torch.tensor(self.start_alpha))

    def init_weights(self) -> None:
        """Its own parameter (the convolutions and norm are initialised as the model's): alpha at its start."""
        with torch.no_grad():
            self.alpha.fill_(self.start_alpha)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(batch, time, d_model) token embeddings -> (batch, time, d_model) g before the output head."""
        x = self.input(embeddings.transpose(1, 2))
        skips = 0
        for layer in self.layers:
            x, skip = layer(x)
            skips = skips + skip
        return self.norm(self.output(skips).transpose(1, 2))

    def mix(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(1 - alpha) * hidden + alpha * g for the decoder's (batch, tgt_len, d_model) `hidden`, `embeddings`
        (batch, window >= tgt_len, d_model) the tokens the branch reads, ending at hidden's last position."""
        if embeddings.shape[1] < hidden.shape[1]:
            raise ValueError(
                f"the WaveNet branch reads {embeddings.shape[1]} tokens but the decoder returned {hidden.shape[1]}: "
                "it needs at least the decoder's tokens."
            )
        g = self(embeddings)[:, -hidden.shape[1] :].to(hidden.dtype)
        alpha = self.alpha.to(hidden.dtype)
        return (1 - alpha) * hidden + alpha * g

    def window(self, input_ids: torch.LongTensor, new_tokens: int) -> torch.LongTensor:
        """The last tokens of `input_ids` (batch, length) that the branch needs for its `new_tokens` last outputs."""
        return input_ids[:, -(new_tokens + self.receptive_field - 1) :]


def add_wavenet_branch(
    model: nn.Module,
    layers: int,
    channels: int,
    dilations: list[int] | None = None,
    kernel_size: int = 2,
    seed: int = 0,
) -> nn.Module:
    """Give a WhisperMoEForConditionalGeneration (or the generalist) a WaveNet branch at alpha 0, so it computes
    exactly what it did until the branch is trained; in place, recorded in `config.wavenet_branch`."""
    config = model.config
    if model.wavenet_branch is not None:
        raise ValueError(f"the model has a WaveNet branch already: {config.wavenet_branch}.")
    spec = {"layers": layers, "channels": channels, "kernel_size": kernel_size}
    if dilations is not None:
        spec["dilations"] = list(dilations)
    type(config).from_dict({**config.to_dict(), "wavenet_branch": spec})  # raises naming what cannot work, first
    config.wavenet_branch = spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        branch = WaveNetBranch(config.d_model, config.wavenet_settings())
        branch.apply(model._init_weights)  # as the model initialises its own: convolutions, norm, then alpha
    reference = model.proj_out.weight
    model.wavenet_branch = branch.to(reference.device, reference.dtype)
    return model
