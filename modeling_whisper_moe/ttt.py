"""Test-Time-Training layers (Sun et al., 2024, "Learning to (Learn at Test Time)", arXiv 2407.04620).

A TTT layer mixes a sequence with a hidden state that is itself a small model f (TTT-Linear: one linear map per head;
TTT-MLP: two, with a tanh-GELU between), trained by one gradient step per mini-batch of tokens as the sequence is
read. For each head, token t gives a key k_t, a value v_t and a query q_t (projections of the input, k and q rotated
by RoPE with positions modulo the mini-batch), and the self-supervised loss

    l_t(W) = 1/2 || LN(f_W(k_t)) - (v_t - k_t) ||^2            (LN: a per-head LayerNorm, learnt)

Within a mini-batch every token's gradient is taken at the weights W_0 the mini-batch started from, and token i reads
its query through W_i = W_0 - tok_i * sum_{j <= i} lr_j grad l_j(W_0): lr_j = base_lr * sigmoid(w_h . x_j + b_h) /
head_dim is a learnt per-head, per-token rate, tok_i = max(1 / (i + 1) + learnt_i, 0) the position-in-mini-batch
scale. The output of a token is q_i + LN(f_{W_i}(q_i)), then a LayerNorm over heads and an output projection. The next
mini-batch starts from the last token's weights.

The "dual form" computes a whole mini-batch with matrix products and never materialises a per-token W_i; the "primal
form" updates W token by token, which decoding needs. Here one chunk function does both: a chunk is any run of tokens
inside one mini-batch, and `TTTState` carries the weights at the last mini-batch boundary plus the gradients the
current mini-batch has accumulated so far, so a prefix read in one go and the same prefix read token by token end
in the same state (cached decoding equals recomputation). Positions always count from 0 at the first token.

`causal=False` is the bidirectional form for an encoder (as ttt-video-dit runs its TTT layers): the same layer reads
the sequence forward and then reversed with shared weights, each pass behind a per-channel tanh gate, and inside a
mini-batch every token uses the gradient of the whole mini-batch at one rate (1 / mini-batch length, no causal mask).
The layer then returns the gated change to its input; with gates at 0 it returns exactly 0.

The parameter names and shapes are the reference implementation's (test-time-training/ttt-lm-pytorch, `ttt.py`), so
its state dicts load as they are.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_whisper_moe import WhisperMoEConfig

TTT_NORM_EPS = 1e-6  # the inner LayerNorm's and the post-norm's epsilon, as in the reference
TTT_INIT_STD = 0.02  # inner weights and learning-rate gate, as in the reference
MLP_EXPANSION = 4  # TTT-MLP's hidden width per head, in head dims
ROPE_THETA = 10000.0
SQRT_2_OVER_PI = 0.7978845608028654  # the tanh approximation of GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + c x^3)))
GELU_CUBIC = 0.044715


@dataclass
class TTTState:
    """What a causal TTT layer carries from one call to the next (one entry of a decoder cache).

    params: the inner weights at the last mini-batch boundary, by name ("W1": (batch, heads, d_in, d_out), "b1":
    (batch, heads, 1, d_out), ...); grads: the rate-weighted gradients sum_j lr_j grad l_j accumulated by the tokens
    read so far in the current mini-batch, same shapes (empty at a mini-batch boundary); seen: tokens read so far.
    """

    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    seen: int = 0

    def select(self, index: torch.Tensor) -> "TTTState":
        """The state of the batch rows `index` (beam search reorders and repeats rows)."""
        pick = {name: tensor.index_select(0, index) for name, tensor in self.params.items()}
        grads = {name: tensor.index_select(0, index) for name, tensor in self.grads.items()}
        return TTTState(pick, grads, self.seen)


def rotate_pairs(x: torch.Tensor, positions: torch.Tensor, theta: float = ROPE_THETA) -> torch.Tensor:
    """RoPE on interleaved pairs: channels (2i, 2i + 1) of each head turn by positions * theta^(-2i / head_dim).

    x: (batch, heads, seq_len, head_dim); positions: (seq_len,).
    """
    head_dim = x.shape[-1]
    exact = torch.float64 if x.dtype == torch.float64 else torch.float32  # half precision would blur the angles
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=exact) / head_dim)
    angles = positions.to(exact)[:, None] * inv_freq[None, :]  # (seq_len, head_dim / 2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def head_layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis with per-head affine parameters. z: (batch, heads, n, d); weight: (heads, 1, d)."""
    mean = z.mean(dim=-1, keepdim=True)
    variance = z.var(dim=-1, keepdim=True, unbiased=False)
    return weight * (z - mean) / torch.sqrt(variance + TTT_NORM_EPS) + bias


def layer_norm_l2_grad(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """d/dz of 1/2 || head_layer_norm(z) - target ||^2, per token: (batch, heads, n, d)."""
    width = z.shape[-1]
    std = torch.sqrt(z.var(dim=-1, keepdim=True, unbiased=False) + TTT_NORM_EPS)
    normed = (z - z.mean(dim=-1, keepdim=True)) / std
    grad_normed = (weight * normed + bias - target) * weight
    return (
        width * grad_normed
        - grad_normed.sum(dim=-1, keepdim=True)
        - normed * (grad_normed * normed).sum(dim=-1, keepdim=True)
    ) / (width * std)


def gelu_tanh_grad(z: torch.Tensor) -> torch.Tensor:
    """Derivative of the tanh approximation of GELU, elementwise."""
    tanh = torch.tanh(SQRT_2_OVER_PI * (z + GELU_CUBIC * z**3))
    return 0.5 * (1 + tanh) + 0.5 * z * (1 - tanh**2) * SQRT_2_OVER_PI * (1 + 3 * GELU_CUBIC * z**2)


def updated_linear(
    queries: torch.Tensor,
    keys: torch.Tensor,
    grads: torch.Tensor,
    rates: torch.Tensor,
    token_scale: torch.Tensor,
    mix: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    carry: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One inner linear map of a chunk in dual form: every query read through the weights its token has reached.

    queries, keys: (batch, heads, n, d_in) (what the layer reads at query and at key positions); grads: the loss
    gradients at the layer's output for the keys, (batch, heads, n, d_out); rates: lr_j, (batch, heads, n);
    token_scale: tok_i, (n,); mix: tok_i * lr_j, masked for causal chunks, (batch, heads, n, n); weight: (batch, heads,
    d_in, d_out); bias: (batch, heads, 1, d_out); carry: the gradients accumulated before the chunk, or None.
    Returns the outputs (batch, heads, n, d_out) and the gradients accumulated through the chunk's last token.
    """
    outputs = queries @ weight + bias - (mix * (queries @ keys.transpose(-1, -2))) @ grads - mix @ grads
    weighted = rates[..., None] * grads  # (batch, heads, n, d_out)
    grad_weight = keys.transpose(-1, -2) @ weighted
    grad_bias = weighted.sum(dim=-2, keepdim=True)
    if carry is not None:
        outputs = outputs - token_scale[:, None] * (queries @ carry[0] + carry[1])
        grad_weight, grad_bias = grad_weight + carry[0], grad_bias + carry[1]
    return outputs, grad_weight, grad_bias


class TTTBase(nn.Module):
    """The projections, learning-rate gate, RoPE, inner LayerNorm and chunking shared by TTT-Linear and TTT-MLP.

    hidden_size: the width read and written (d_model); num_heads: heads of hidden_size / num_heads channels each;
    mini_batch_size: tokens per inner gradient step; ttt_base_lr: base_lr of the rate gate; causal: see the module
    docstring; gate_init: tanh gates on the output, initialised to this value (None: no gate, the reference's layer;
    a bidirectional layer always has its two gates, 0.1 unless given).
    """

    inner_names: tuple[str, ...] = ()

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mini_batch_size: int = 16,
        ttt_base_lr: float = 1.0,
        causal: bool = True,
        gate_init: float | None = None,
        rope_theta: float = ROPE_THETA,
    ):
        super().__init__()
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(
                f"hidden_size={hidden_size} must split into num_heads={num_heads} heads of an even width (RoPE turns "
                "channel pairs)."
            )
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size={mini_batch_size} must be at least 1.")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.mini_batch_size, self.ttt_base_lr = mini_batch_size, ttt_base_lr
        self.causal, self.rope_theta = causal, rope_theta
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.learnable_ttt_lr_weight = nn.Parameter(torch.normal(0.0, TTT_INIT_STD, (num_heads, 1, hidden_size)))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(num_heads, 1))
        self.learnable_token_idx = nn.Parameter(torch.zeros(mini_batch_size))
        self.ttt_norm_weight = nn.Parameter(torch.ones(num_heads, self.head_dim))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.post_norm = nn.LayerNorm(hidden_size, eps=TTT_NORM_EPS)
        if not causal:
            start = 0.1 if gate_init is None else gate_init
            self.forward_gate = nn.Parameter(torch.full((hidden_size,), start))
            self.backward_gate = nn.Parameter(torch.full((hidden_size,), start))
        elif gate_init is not None:
            self.gate = nn.Parameter(torch.full((hidden_size,), gate_init))

    @torch.no_grad()
    def init_weights(self, std: float = TTT_INIT_STD) -> None:
        """The reference's initialisation, with every gate closed (0): a layer added to a trained model adds 0."""
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            init.normal_(linear.weight, std=std)
        for name in self.inner_names:  # W*: N(0, std), b*: 0
            parameter = getattr(self, name)
            init.normal_(parameter, std=std) if name.startswith("W") else init.zeros_(parameter)
        init.normal_(self.learnable_ttt_lr_weight, std=std)
        init.zeros_(self.learnable_ttt_lr_bias)
        init.zeros_(self.learnable_token_idx)
        init.ones_(self.ttt_norm_weight)
        init.zeros_(self.ttt_norm_bias)
        init.ones_(self.post_norm.weight)
        init.zeros_(self.post_norm.bias)
        for name in ("gate", "forward_gate", "backward_gate"):
            if hasattr(self, name):
                init.zeros_(getattr(self, name))

    # -- what the two inner models define ------------------------------------------------------------------------

    def inner_chunk(
        self, params: dict, carry: dict | None, queries, keys, targets, rates, token_scale, mix
    ) -> tuple[torch.Tensor, dict]:
        """(outputs before the inner LayerNorm (batch, heads, n, head_dim), gradients accumulated by the chunk)."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------------------------

    def initial_state(self, batch_size: int) -> TTTState:
        """The state before the first token: the learnt inner weights, repeated per row, and no gradient."""
        params = {name: getattr(self, name).unsqueeze(0).expand(batch_size, -1, -1, -1) for name in self.inner_names}
        return TTTState(params, {}, 0)

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, state: TTTState | None = None) -> torch.Tensor:
        """(batch, seq_len, hidden_size) -> (batch, seq_len, hidden_size).

        A causal layer given `state` continues from it (the tokens follow those it has read) and updates it in place.
        """
        if self.causal:
            output = self.read(hidden_states, state)
            return torch.tanh(self.gate) * output if hasattr(self, "gate") else output
        if state is not None:
            raise ValueError("a bidirectional TTT layer (causal=False) reads whole sequences; it keeps no state.")
        forward = torch.tanh(self.forward_gate) * self.read(hidden_states)
        after_forward = hidden_states + forward
        backward = self.read(after_forward.flip(1)).flip(1)
        return forward + torch.tanh(self.backward_gate) * backward

    def read(self, hidden_states: torch.Tensor, state: TTTState | None = None) -> torch.Tensor:
        """The TTT layer's output for one pass over the sequence (before any gate)."""
        batch, length, _ = hidden_states.shape
        state = state if state is not None else self.initial_state(batch)
        positions = (state.seen + torch.arange(length, device=hidden_states.device)) % self.mini_batch_size
        queries = rotate_pairs(self._heads(self.q_proj(hidden_states)), positions, self.rope_theta)
        keys = rotate_pairs(self._heads(self.k_proj(hidden_states)), positions, self.rope_theta)
        targets = self._heads(self.v_proj(hidden_states)) - keys
        gate = torch.einsum("blc,hc->bhl", hidden_states, self.learnable_ttt_lr_weight[:, 0])
        rates = self.ttt_base_lr * torch.sigmoid(gate + self.learnable_ttt_lr_bias) / self.head_dim  # (b, h, l)
        sizes = self._chunk_sizes(state.seen, length)
        # one split, not a slice per chunk: a slice's backward writes a zero gradient the size of the whole sequence
        pieces = zip(*(tensor.split(sizes, dim=2) for tensor in (queries, keys, targets, rates)))
        outputs = [self._read_chunk(state, *piece, state.seen % self.mini_batch_size) for piece in pieces]
        output = torch.cat(outputs, dim=2).transpose(1, 2).reshape(batch, length, self.hidden_size)
        return self.o_proj(self.post_norm(output))

    def _chunk_sizes(self, seen: int, length: int) -> list[int]:
        """Lengths of the chunks `length` tokens after `seen` fall into: each ends at a mini-batch boundary (causal,
        so a cached state resumes mid-mini-batch) or is a whole mini-batch from the start (bidirectional)."""
        sizes = []
        while length > 0:
            offset = (seen % self.mini_batch_size) if self.causal else 0
            sizes.append(min(length, self.mini_batch_size - offset))
            seen, length = seen + sizes[-1], length - sizes[-1]
        return sizes

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len, hidden) -> (batch, heads, seq_len, head_dim)."""
        return projected.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _read_chunk(self, state: TTTState, queries, keys, targets, rates, offset: int) -> torch.Tensor:
        """One chunk (tokens of one mini-batch), updating `state`: (batch, heads, n, head_dim) outputs."""
        size = queries.shape[2]
        if self.causal:
            place = torch.arange(offset + 1, offset + size + 1, dtype=queries.dtype, device=queries.device)
            scale = (1.0 / place + self.learnable_token_idx[offset : offset + size]).clamp(min=0.0)
            mix = torch.tril(scale[:, None] * rates[..., None, :])  # (batch, heads, n, n)
        else:  # every token of the mini-batch takes its whole gradient, at one rate
            scale = torch.full((size,), 1.0 / size, dtype=queries.dtype, device=queries.device)
            mix = (rates / size)[..., None, :].expand(-1, -1, size, -1)
        carry = state.grads or None  # none accumulated yet: the carry terms are skipped
        inner, accumulated = self.inner_chunk(state.params, carry, queries, keys, targets, rates, scale, mix)
        state.seen += size
        if not self.causal or state.seen % self.mini_batch_size == 0:  # the mini-batch is complete: take its step
            state.params = {name: state.params[name] - scale[-1] * accumulated[name] for name in self.inner_names}
            state.grads = {}
        else:
            state.grads = accumulated
        norm_weight, norm_bias = self.ttt_norm_weight[:, None], self.ttt_norm_bias[:, None]
        return queries + head_layer_norm(inner, norm_weight, norm_bias)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, mini_batch_size={self.mini_batch_size}, "
            f"ttt_base_lr={self.ttt_base_lr}, causal={self.causal}"
        )


class TTTLinear(TTTBase):
    """TTT with a linear inner model per head: f(x) = x W1 + b1, W1 (heads, head_dim, head_dim)."""

    inner_names = ("W1", "b1")

    def __init__(
        self, hidden_size: int, num_heads: int, mini_batch_size: int = 16, ttt_base_lr: float = 1.0, **kwargs
    ):
        super().__init__(hidden_size, num_heads, mini_batch_size, ttt_base_lr, **kwargs)
        self.W1 = nn.Parameter(torch.normal(0.0, TTT_INIT_STD, (num_heads, self.head_dim, self.head_dim)))
        self.b1 = nn.Parameter(torch.zeros(num_heads, 1, self.head_dim))

    def inner_chunk(self, params, carry, queries, keys, targets, rates, token_scale, mix):
        norm_weight, norm_bias = self.ttt_norm_weight[:, None], self.ttt_norm_bias[:, None]
        grads = layer_norm_l2_grad(keys @ params["W1"] + params["b1"], targets, norm_weight, norm_bias)
        carried = None if carry is None else (carry["W1"], carry["b1"])
        outputs, grad_w1, grad_b1 = updated_linear(
            queries, keys, grads, rates, token_scale, mix, params["W1"], params["b1"], carried
        )
        return outputs, {"W1": grad_w1, "b1": grad_b1}


class TTTMLP(TTTBase):
    """TTT with a two-layer inner model per head: f(x) = gelu_tanh(x W1 + b1) W2 + b2, 4 x head_dim wide."""

    inner_names = ("W1", "b1", "W2", "b2")

    def __init__(
        self, hidden_size: int, num_heads: int, mini_batch_size: int = 16, ttt_base_lr: float = 0.1, **kwargs
    ):
        super().__init__(hidden_size, num_heads, mini_batch_size, ttt_base_lr, **kwargs)
        width = MLP_EXPANSION * self.head_dim
        self.W1 = nn.Parameter(torch.normal(0.0, TTT_INIT_STD, (num_heads, self.head_dim, width)))
        self.b1 = nn.Parameter(torch.zeros(num_heads, 1, width))
        self.W2 = nn.Parameter(torch.normal(0.0, TTT_INIT_STD, (num_heads, width, self.head_dim)))
        self.b2 = nn.Parameter(torch.zeros(num_heads, 1, self.head_dim))

    def inner_chunk(self, params, carry, queries, keys, targets, rates, token_scale, mix):
        norm_weight, norm_bias = self.ttt_norm_weight[:, None], self.ttt_norm_bias[:, None]
        hidden_pre = keys @ params["W1"] + params["b1"]
        hidden = F.gelu(hidden_pre, approximate="tanh")
        grads_out = layer_norm_l2_grad(hidden @ params["W2"] + params["b2"], targets, norm_weight, norm_bias)
        grads_hidden = (grads_out @ params["W2"].transpose(-1, -2)) * gelu_tanh_grad(hidden_pre)
        first = None if carry is None else (carry["W1"], carry["b1"])
        second = None if carry is None else (carry["W2"], carry["b2"])
        hidden_q, grad_w1, grad_b1 = updated_linear(
            queries, keys, grads_hidden, rates, token_scale, mix, params["W1"], params["b1"], first
        )
        hidden_q = F.gelu(hidden_q, approximate="tanh")
        outputs, grad_w2, grad_b2 = updated_linear(
            hidden_q, hidden, grads_out, rates, token_scale, mix, params["W2"], params["b2"], second
        )
        return outputs, {"W1": grad_w1, "b1": grad_b1, "W2": grad_w2, "b2": grad_b2}


TTT_CLASSES = {"linear": TTTLinear, "mlp": TTTMLP}


# ---------------------------------------------------------------------------------------------------------------------
# In WhisperMoE: a sub-layer per chosen layer, its decoder state in the generation cache
# ---------------------------------------------------------------------------------------------------------------------

TTT_CACHE_ATTRIBUTE = "ttt_states"  # {decoder layer index: TTTState} set on a generation cache


def ttt_sublayer(config: WhisperMoEConfig, side: str, layer_idx: int) -> tuple[nn.LayerNorm | None, TTTBase | None]:
    """(pre-norm, TTT layer) of a layer that config.{side}_ttt_layers lists, else (None, None). The encoder's is
    bidirectional, the decoder's causal; both start with closed gates."""
    if not config.has_ttt(side, layer_idx):
        return None, None
    heads = config.ttt_num_heads or getattr(config, f"{side}_attention_heads")
    rate = {} if config.ttt_base_lr is None else {"ttt_base_lr": config.ttt_base_lr}
    layer = TTT_CLASSES[config.ttt_type](
        config.d_model, heads, config.ttt_mini_batch_size, causal=side == "decoder", gate_init=0.0, **rate
    )
    return nn.LayerNorm(config.d_model), layer


def cached_state(cache, layer: TTTBase, layer_idx: int, hidden_states: torch.Tensor) -> TTTState | None:
    """The state decoder layer `layer_idx`'s TTT layer continues from, kept on the generation `cache` (None: no
    cache, the call reads its tokens from the start). Called after the layer's self-attention, which has already
    cached the new tokens; a cache that holds tokens the TTT layer never read (it was cropped, as assisted decoding
    does, or filled elsewhere) is refused: the inner weights cannot be rewound."""
    if cache is None:
        return None
    states = cache.__dict__.setdefault(TTT_CACHE_ATTRIBUTE, {})
    before = cache.get_seq_length(layer_idx) - hidden_states.shape[1]
    state = states.get(layer_idx)
    if state is None and before == 0:
        state = states[layer_idx] = layer.initial_state(hidden_states.shape[0])
    if state is None or state.seen != before:
        read = 0 if state is None else state.seen
        raise ValueError(
            f"decoder layer {layer_idx}'s TTT layer has read {read} tokens but the cache holds {before}: a TTT "
            "decoder cannot rewind its inner weights, so assisted / speculative decoding and cropped caches are not "
            "supported with decoder_ttt_layers."
        )
    return state


def reorder_ttt_states(cache, beam_idx: torch.Tensor) -> None:
    """Make the TTT states on `cache` follow the rows beam search keeps (as the key/value caches do)."""
    states = getattr(cache, TTT_CACHE_ATTRIBUTE, {})
    for layer_idx, state in states.items():
        states[layer_idx] = state.select(beam_idx.to(next(iter(state.params.values())).device))


TTT_SHARED_FIELDS = ("ttt_type", "ttt_mini_batch_size", "ttt_base_lr", "ttt_num_heads")  # one setting per model


def add_ttt(
    model: nn.Module,
    encoder_layers: list[int] | None = None,
    decoder_layers: list[int] | None = None,
    ttt_type: str = "mlp",
    mini_batch_size: int = 16,
    base_lr: float | None = None,
    num_heads: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Give the chosen encoder and decoder layers (None: all; []: none) a TTT sub-layer whose gates are closed, so
    the model computes exactly what it did; in place, recorded in the config. A model that has TTT layers already
    keeps its TTT settings: new layers must use the same ones."""
    config = model.config
    settings = dict(zip(TTT_SHARED_FIELDS, (ttt_type, mini_batch_size, base_lr, num_heads)))
    if config.encoder_ttt_layers or config.decoder_ttt_layers:
        differ = {name: getattr(config, name) for name, value in settings.items() if getattr(config, name) != value}
        if differ:
            raise ValueError(f"the model's TTT layers use {differ}; new TTT layers must use the same settings.")
    chosen = {}
    for side, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        count = getattr(config, f"{side}_layers")
        chosen[side] = list(range(count)) if layers is None else sorted(set(layers))
    candidate = config.to_dict() | settings
    for side in chosen:
        candidate[f"{side}_ttt_layers"] = sorted(set(getattr(config, f"{side}_ttt_layers") or ()) | set(chosen[side]))
    type(config).from_dict(candidate)  # raises ValueError naming what cannot work, before anything changes
    for name, value in settings.items():
        setattr(config, name, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for side, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
            setattr(config, f"{side}_ttt_layers", candidate[f"{side}_ttt_layers"])
            for index in chosen[side]:
                layer = stack.layers[index]
                if layer.ttt is not None:
                    continue
                norm, ttt = ttt_sublayer(config, side, index)
                ttt.init_weights(config.init_std)
                reference = layer.final_layer_norm.weight
                layer.ttt_layer_norm = norm.to(reference.device, reference.dtype)
                layer.ttt = ttt.to(reference.device, reference.dtype)
    return model
