"""PEER, a Mixture of a Million Experts (He, 2024, arXiv 2407.04153): many single-neuron experts found by product keys.

A PEER block holds N = num_keys**2 experts, each one hidden neuron of a feed-forward block: a down vector u_i and an
up vector v_i, both of width d_model. Each of `num_heads` heads turns the token into a query (a linear map, then
batch normalisation, the paper's "query BN" that spreads the queries over the keys) and retrieves its
`num_experts_per_head` best experts by product keys: the query's two halves are scored against two tables of
`num_keys` sub-keys, the top k of each half are kept, and the top k of their k x k sums are exactly the top k of the
N full keys (a full key is a pair of sub-keys, its score the sum of the halves'), at O(sqrt(N)) cost. The block adds

    sum over heads h and retrieved experts i of  softmax_h(score)_i * act(u_i . x) * v_i

beside the layer's feed-forward block, with act the model's own activation (GELU in Whisper, as its feed-forward
block; the paper allows any). A block grown into a trained model starts with every v_i = 0, so it adds exactly 0
until it is trained (see growth.py). Its `phase` is the growth phase that added it; `enabled = False` skips it
(`growth.previous_model`), as does an `input_modality` its phase does not serve (`modalities`, see
`WhisperMoEConfig.expert_growth`), and `frozen_statistics` makes the query normalisation a fixed function (running
statistics, never updated) while a later phase trains.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

from .configuration_whisper_moe import WhisperMoEConfig

PRODUCT_HALVES = 2  # a full key is the concatenation of two sub-keys, one from each table


class PEER(nn.Module):
    """num_keys**2 single-neuron experts, `num_heads` x top-`num_experts_per_head` of them per token (see the module
    docstring). `spec` is a growth phase's "peer" entry (`WhisperMoEConfig.expert_growth`)."""

    def __init__(self, config: WhisperMoEConfig, spec: dict, phase: int):
        super().__init__()
        self.num_keys, self.num_heads = spec["num_keys"], spec["num_heads"]
        self.top_k, self.key_dim = spec["num_experts_per_head"], spec["key_dim"]
        self.num_experts = self.num_keys**2
        self.phase = phase
        # no bias: the normalisation's shift takes its place
        self.query = nn.Linear(config.d_model, self.num_heads * self.key_dim, bias=False)
        self.query_norm = nn.BatchNorm1d(self.num_heads * self.key_dim)
        self.sub_keys = nn.Parameter(
            torch.empty(PRODUCT_HALVES, self.num_heads, self.num_keys, self.key_dim // PRODUCT_HALVES)
        )
        self.down = nn.Embedding(self.num_experts, config.d_model)  # u_i: what each expert's neuron reads
        self.up = nn.Embedding(self.num_experts, config.d_model)  # v_i: what it writes; zero when grown
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout
        self.enabled = True
        self.modalities = config.growth_modalities(phase)
        self.input_modality: str | None = None  # set by `routing_modality` for each forward pass
        self.frozen_statistics = False

    @property
    def active(self) -> bool:
        """Whether the block adds its output in this forward pass."""
        return self.enabled and (
            self.modalities is None or self.input_modality is None or self.input_modality in self.modalities
        )

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """Query map N(0, std); sub-keys and down vectors of unit-variance dot products with unit-variance inputs;
        zero up vectors, so the block outputs exactly 0 until it is trained."""
        init.normal_(self.query.weight, std=std, generator=generator)
        init.normal_(self.sub_keys, std=self.sub_keys.shape[-1] ** -0.5, generator=generator)
        init.normal_(self.down.weight, std=self.down.weight.shape[-1] ** -0.5, generator=generator)
        init.zeros_(self.up.weight)
        init.ones_(self.query_norm.weight)
        init.zeros_(self.query_norm.bias)
        init.zeros_(self.query_norm.running_mean)
        init.ones_(self.query_norm.running_var)
        init.zeros_(self.query_norm.num_batches_tracked)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len, d_model) -> (batch, seq_len, d_model)."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # (T, d_model)
        scores, index = self.retrieve(self.queries(tokens))  # (T, heads, k) each
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(tokens.dtype).flatten(1)  # (T, heads * k)
        index = index.flatten(1)  # (T, heads * k)
        pre_activations = torch.einsum("td,tnd->tn", tokens, self.down(index))  # (T, heads * k)
        activations = F.dropout(self.activation_fn(pre_activations), p=self.activation_dropout, training=self.training)
        # the weighted sum of the retrieved up vectors, without materialising (T, heads * k, d_model)
        output = F.embedding_bag(index, self.up.weight, per_sample_weights=weights * activations, mode="sum")
        return output.reshape(hidden_states.shape)

    def queries(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, d_model) -> (T, heads, key_dim), batch-normalised.

        Training normalises with the batch's statistics (every position the layer sees, padding included: the layer
        is not told which positions are padding) and updates the running ones; evaluation, a batch of one token and
        a block whose statistics are frozen use the running statistics.
        """
        queries = self.query(tokens)
        norm = self.query_norm
        if self.training and not self.frozen_statistics and queries.shape[0] > 1:
            queries = norm(queries)
        else:
            queries = F.batch_norm(queries, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps)
        return queries.unflatten(-1, (self.num_heads, self.key_dim))

    def retrieve(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Product-key top-k: queries (T, heads, key_dim) -> scores (T, heads, k), expert indices (T, heads, k).

        Expert i = a * num_keys + b has the key (sub_keys[0, :, a], sub_keys[1, :, b]), so its score is the sum of
        its halves' scores; any expert in the top k has both halves in their half's top k, so the top k of the k x k
        candidate sums is the top k of all N.
        """
        halves = queries.unflatten(-1, (PRODUCT_HALVES, -1))  # (T, heads, 2, key_dim / 2)
        half_scores = torch.einsum("thsc,shnc->tshn", halves, self.sub_keys)  # (T, 2, heads, num_keys)
        top_scores, top_index = half_scores.topk(self.top_k, dim=-1)  # (T, 2, heads, k)
        candidates = top_scores[:, 0, :, :, None] + top_scores[:, 1, :, None, :]  # (T, heads, k, k)
        scores, flat = candidates.flatten(-2).topk(self.top_k, dim=-1)  # (T, heads, k)
        first = top_index[:, 0].gather(-1, flat // self.top_k)
        second = top_index[:, 1].gather(-1, flat % self.top_k)
        return scores, first * self.num_keys + second

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_keys}^2={self.num_experts}, heads={self.num_heads}, top_k={self.top_k}, "
            f"key_dim={self.key_dim}, phase={self.phase}"
        )


def peer_blocks(config: WhisperMoEConfig, side: str, layer_idx: int) -> nn.ModuleList:
    """The PEER blocks of one layer, one per growth phase that gave it one, oldest first (usually none)."""
    return nn.ModuleList(PEER(config, spec, phase) for phase, spec in config.peer_phases(side, layer_idx))
