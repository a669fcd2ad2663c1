"""Echo's architecture elements as config switches (WhisperMoEConfig's Echo section).

Echo, a Whisper variant, encodes positions with rotary embeddings mixed by learned rotations or with a learned
sinusoid table, biases attention by a learned function of distance, restricts it to a sliding window with a few
global tokens, and combines convolution with attention as Conformer does. Each is a module here that the layers of
modeling_whisper_moe.py take where the config asks:

- `position_table`: a side's absolute position table: Whisper's own, a learned L2-normalised sinusoid table, or none
  (zeros) on a rotary side;
- `EchoSelfAttention`: Whisper's self-attention with RoPE (optionally Givens-mixed) on queries and keys before the
  cache, and a dynamic position bias and / or a local + global mask on the logits;
- `ConvolutionModule`: Conformer's convolution module, causal in the decoder, whose inputs the generation cache keeps;
- `load_with_new_echo_modules`: upcycling into a model with Echo elements, the new modules starting from their own
  initialisation (exact where they can be).

Positions inside attention are cache slots, the first token at 0. RoPE, the bias and the window read only differences
of positions, which left padding does not change between the real tokens of a row.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.whisper.modeling_whisper import WhisperAttention, eager_attention_forward, sinusoids

from .configuration_whisper_moe import ROTARY_TYPES, SIDES, WhisperMoEConfig
from .ttt import rotate_pairs

MASKED_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # the ones that add a float mask of any shape to the logits
CONV_CACHE_ATTRIBUTE = "conv_states"  # {decoder layer index: (batch, d_model, tokens) depthwise inputs} on a cache


# ---------------------------------------------------------------------------------------------------------------------
# Position tables
# ---------------------------------------------------------------------------------------------------------------------


class LearnedSinusoidalEmbedding(nn.Module):
    """A learned position table that starts as Whisper's sinusoids; rows are L2-normalised, then scaled by one learned
    scale, so training can move directions but not blow up one position's size.

    Called as the table it replaces: positions (n,) -> (n, d) (the encoder); input ids or embeddings (batch, n) with
    `position_ids` (batch, n) -> (batch, n, d) (the decoder, as it calls WhisperPositionalEmbedding). Its raw table
    is named `weight`, as Whisper's, so that a pretrained table loads into it (exactly, up to the rounding of a
    normalisation, where that table is sinusoidal: Whisper's encoder's).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.scale = nn.Parameter(torch.empty(()))

    def forward(self, positions: torch.Tensor, cache_length: int = 0, position_ids: torch.Tensor | None = None):
        if position_ids is None and positions.dim() > 1:  # the decoder's ids, as Whisper's table
            position_ids = torch.arange(cache_length, cache_length + positions.shape[1], device=positions.device)
        elif position_ids is None:  # the encoder's positions
            position_ids = positions
        return F.normalize(self.weight[position_ids], dim=-1) * self.scale

    def init_weights(self) -> None:
        """Whisper's sinusoids (unless the table was loaded), the scale at the table's mean row norm: sqrt(d / 2)
        for sinusoids, each of whose d / 2 (sin, cos) pairs contributes 1."""
        init.copy_(self.weight, sinusoids(self.num_embeddings, self.embedding_dim))
        init.copy_(self.scale, self.weight.detach().norm(dim=-1).mean())


class NoPositionalEmbedding(nn.Module):
    """The absolute position table of a rotary side: zeros, so positions reach the side only through RoPE. Called
    as the table it replaces, (n,) or (batch, n) -> zeros (..., d)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("zero", torch.zeros(()), persistent=False)  # follows the model's device and dtype

    def forward(self, positions: torch.Tensor, cache_length: int = 0, position_ids: torch.Tensor | None = None):
        return self.zero.expand(*positions.shape[:2], self.embedding_dim)

    def init_weights(self) -> None:
        init.zeros_(self.zero)


def position_table(config: WhisperMoEConfig, side: str, whisper_table: nn.Module) -> nn.Module:
    """The absolute position table of `side`: `whisper_table` (Whisper's own, an (n, d) embedding) unless the
    config's position_embedding_type replaces it."""
    kind = config.echo_setting("position_embedding_type", side)
    size = (whisper_table.num_embeddings, whisper_table.embedding_dim)
    if kind == "learned_sinusoidal":
        return LearnedSinusoidalEmbedding(*size)
    if kind in ROTARY_TYPES:
        return NoPositionalEmbedding(*size)
    return whisper_table


# ---------------------------------------------------------------------------------------------------------------------
# Attention: rotary embeddings, dynamic position bias, local + global window
# ---------------------------------------------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """RoPE on one attention's queries and keys, optionally after a learned orthogonal change of basis per head.

    With `givens` ("rotary_givens"), x' = RoPE(x M) with M = G_1 ... G_m R per head: G_k a Givens rotation by a
    learned angle in the channel plane (2k + 1, 2k + 2), coupling the neighbouring RoPE pairs (2k, 2k + 1) and
    (2k + 2, 2k + 3), and R = exp(S - S^T) a learned rotation. The planes are disjoint, so the G_k form one matrix.
    Angles and S start at zero: M starts as the identity and the output as plain RoPE's. M goes before RoPE because
    (q M)(k M)^T = q k^T: after RoPE any orthogonal M would cancel in the logits.
    """

    def __init__(self, num_heads: int, head_dim: int, theta: float, givens: bool):
        super().__init__()
        self.theta, self.givens = theta, givens
        if givens:
            self.givens_angles = nn.Parameter(torch.empty(num_heads, head_dim // 2 - 1))
            self.rotation_generator = nn.Parameter(torch.empty(num_heads, head_dim, head_dim))  # S: upper triangle

    def init_weights(self) -> None:
        if self.givens:
            init.zeros_(self.givens_angles)
            init.zeros_(self.rotation_generator)

    def mixing(self) -> torch.Tensor:
        """M = G_1 ... G_m R of each head, (heads, head_dim, head_dim), orthogonal."""
        heads, size, _ = self.rotation_generator.shape
        upper = self.rotation_generator.triu(1)
        rotation = torch.linalg.matrix_exp(upper - upper.transpose(-1, -2))
        first = torch.arange(1, size - 1, 2, device=upper.device)  # planes (first, first + 1)
        cos, sin = self.givens_angles.cos(), self.givens_angles.sin()  # (heads, planes)
        rows = torch.cat([first, first + 1, first, first + 1])
        cols = torch.cat([first, first + 1, first + 1, first])
        values = torch.cat([cos - 1, cos - 1, sin, -sin], dim=-1)  # (heads, 4 * planes): changes to the identity
        head = torch.arange(heads, device=upper.device)[:, None].expand_as(values)
        changes = upper.new_zeros(heads, size, size).index_put(
            (head, rows.expand_as(values), cols.expand_as(values)), values
        )
        givens = changes + torch.eye(size, device=upper.device, dtype=upper.dtype)
        return givens @ rotation

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query, key (batch, heads, seq_len, head_dim), positions (seq_len,) -> both rotated, same shapes."""
        if self.givens:
            mixing = self.mixing().to(query.dtype)  # (heads, head_dim, head_dim)
            query, key = query @ mixing, key @ mixing
        return rotate_pairs(query, positions, self.theta), rotate_pairs(key, positions, self.theta)


class DynamicPositionBias(nn.Module):
    """x-transformers' dynamic position bias: an MLP from the distance d = i - j of query i and key j to one
    attention-logit bias per head. It reads sign(d) log_b(1 + |d|) (b = `log_base`), or d itself when `log_base` is
    None. Its output layer (held as plain parameters, so that transformers always initialises it) starts at zero."""

    def __init__(self, num_heads: int, dim: int, depth: int, log_base: float | None):
        super().__init__()
        self.log_base = log_base
        layers = []
        for index in range(depth):
            layers += [nn.Linear(1 if index == 0 else dim, dim), nn.SiLU()]
        self.mlp = nn.Sequential(*layers)
        self.out_weight = nn.Parameter(torch.empty(num_heads, dim))
        self.out_bias = nn.Parameter(torch.empty(num_heads))

    def init_weights(self) -> None:
        init.zeros_(self.out_weight)
        init.zeros_(self.out_bias)

    def forward(self, query_start: int, query_length: int, key_length: int) -> torch.Tensor:
        """The bias of queries at positions query_start.. over keys at 0..key_length - 1: (heads, q, k)."""
        lowest = query_start - key_length + 1  # the first query's distance to the last key
        device = self.out_weight.device
        distances = torch.arange(lowest, query_start + query_length, device=device, dtype=self.out_weight.dtype)
        if self.log_base is not None:
            distances = distances.sign() * torch.log1p(distances.abs()) / math.log(self.log_base)
        per_distance = F.linear(self.mlp(distances[:, None]), self.out_weight, self.out_bias)  # (distances, heads)
        queries = torch.arange(query_length, device=device)[:, None] + query_start - lowest
        return per_distance[queries - torch.arange(key_length, device=device)[None]].permute(2, 0, 1)


def local_global_keep(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, global_tokens: int
) -> torch.Tensor:
    """(q, k) bool, True where query i may attend key j: |i - j| < window, or either is one of the first
    `global_tokens` positions."""
    near = (query_positions[:, None] - key_positions[None, :]).abs() < window
    return near | (query_positions[:, None] < global_tokens) | (key_positions[None, :] < global_tokens)


def needs_echo_attention(config: WhisperMoEConfig, side: str) -> bool:
    """Whether `side`'s self-attention has an Echo element (rotary positions, a dynamic bias or a window)."""
    return (
        config.echo_setting("position_embedding_type", side) in ROTARY_TYPES
        or config.echo_setting("dynamic_position_bias", side)
        or config.echo_setting("local_attention_window", side) is not None
    )


class EchoSelfAttention(WhisperAttention):
    """Whisper's self-attention with the Echo elements the config gives `side`: RoPE on queries and keys before they
    are cached, and a dynamic position bias and / or a local + global window on the logits. The decoder's stays
    causal. Its projections are Whisper's (same names), so pretrained attention weights load into it."""

    def __init__(self, config: WhisperMoEConfig, side: str, layer_idx: int | None = None):
        is_decoder = side == "decoder"
        num_heads = getattr(config, f"{side}_attention_heads")
        super().__init__(
            config.d_model,
            num_heads,
            dropout=config.attention_dropout,
            is_decoder=is_decoder,
            is_causal=is_decoder,
            layer_idx=layer_idx,
            config=config,
        )
        kind = config.echo_setting("position_embedding_type", side)
        self.rotary = None
        if kind in ROTARY_TYPES:
            self.rotary = RotaryEmbedding(num_heads, self.head_dim, config.rotary_theta, kind == "rotary_givens")
        self.position_bias = None
        if config.echo_setting("dynamic_position_bias", side):
            self.position_bias = DynamicPositionBias(
                num_heads,
                config.dynamic_position_bias_dim,
                config.dynamic_position_bias_depth,
                config.dynamic_position_bias_log_base,
            )
        self.local_window = config.echo_setting("local_attention_window", side)
        self.global_tokens = config.echo_setting("global_tokens", side)

    # Adapted from transformers.models.whisper.modeling_whisper.WhisperAttention.forward (5.x): self-attention only
    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, seq_len, d_model) -> (batch, seq_len, d_model) and the attention weights (eager only)."""
        if key_value_states is not None:
            raise ValueError("EchoSelfAttention is a self-attention; cross-attention stays Whisper's.")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = (self.q_proj(hidden_states) * self.scaling).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2).contiguous()
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        positions = torch.arange(past, past + input_shape[-1], device=hidden_states.device)
        if self.rotary is not None:
            query_states, key_states = self.rotary(query_states, key_states, positions)
        query_states, key_states = query_states.contiguous(), key_states.contiguous()
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attention_mask = self.echo_mask(attention_mask, positions, key_states.shape[2], query_states.dtype)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=1.0,
            output_attentions=output_attentions,
            **kwargs,
        )
        attn_output = self.out_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights

    def echo_mask(
        self, attention_mask: torch.Tensor | None, positions: torch.Tensor, key_length: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """`attention_mask` (None, or (batch, 1, q, k) bool True = attend or additive float) with the causal, window
        and bias terms, as an additive float mask (batch or 1, heads or 1, q, k); unchanged without a bias or window.

        positions: (q,) the queries' cache slots; the keys are slots 0..key_length - 1.
        """
        if self.position_bias is None and self.local_window is None:
            return attention_mask
        implementation = self.config._attn_implementation
        if implementation not in MASKED_ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"dynamic_position_bias and local_attention_window need attn_implementation in "
                f"{MASKED_ATTENTION_IMPLEMENTATIONS}, not {implementation!r}."
            )
        key_positions = torch.arange(key_length, device=positions.device)
        keep = torch.ones(len(positions), key_length, dtype=torch.bool, device=positions.device)
        # A given mask carries the decoder's causality (or its absence: the mel decoder of modeling_whisper_moe_tts
        # sees every frame); without one sdpa would have used its causal flag, which is off once a mask is passed
        if self.is_causal and attention_mask is None:
            keep = key_positions[None, :] <= positions[:, None]
        if self.local_window is not None:
            keep = keep & local_global_keep(positions, key_positions, self.local_window, self.global_tokens)
        if self.position_bias is not None:
            additive = self.position_bias(int(positions[0]), len(positions), key_length).to(dtype)[None]
        else:
            additive = torch.zeros(1, 1, len(positions), key_length, dtype=dtype, device=positions.device)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            keep = keep & attention_mask
        elif attention_mask is not None:
            additive = additive + attention_mask
        return additive.masked_fill(~keep, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------------------------------
# Convolution module
# ---------------------------------------------------------------------------------------------------------------------


class ConvolutionModule(nn.Module):
    """Conformer's convolution module (Gulati et al. 2020) as a residual branch: (batch, seq, d) -> its change.

    layer norm -> pointwise to 2d -> GLU -> depthwise convolution over time -> layer norm -> SiLU -> pointwise to d.
    A LayerNorm where Conformer has BatchNorm: batch statistics would mix in the time steps a causal decoder must not
    see while training. The last pointwise projection (plain parameters, so that transformers always initialises
    it) starts at zero, so a new module adds exactly nothing. With `causal` the depthwise convolution sees the
    kernel_size - 1 positions before each one and, given a generation cache, continues from the inputs of the
    cache's earlier tokens.
    """

    def __init__(self, d_model: int, kernel_size: int, causal: bool):
        super().__init__()
        self.kernel_size, self.causal = kernel_size, causal
        self.layer_norm = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)
        self.depthwise_norm = nn.LayerNorm(d_model)
        self.pointwise_out_weight = nn.Parameter(torch.empty(d_model, d_model))
        self.pointwise_out_bias = nn.Parameter(torch.empty(d_model))

    def init_weights(self) -> None:
        init.zeros_(self.pointwise_out_weight)
        init.zeros_(self.pointwise_out_bias)

    def forward(self, hidden_states: torch.Tensor, cache=None, layer_idx: int | None = None) -> torch.Tensor:
        """(batch, seq_len, d_model) -> (batch, seq_len, d_model); `cache` / `layer_idx`: the decoder's."""
        inputs = F.glu(self.pointwise_in(self.layer_norm(hidden_states)), dim=-1).transpose(1, 2)  # (batch, d, seq)
        context = self.kernel_size - 1
        if self.causal:
            earlier = cached_conv_inputs(cache, layer_idx, inputs, context)  # (batch, d, <= context)
            padded = F.pad(torch.cat([earlier, inputs], dim=-1), (context - earlier.shape[-1], 0))
        else:
            padded = F.pad(inputs, (context // 2, context // 2))
        mixed = self.depthwise(padded).transpose(1, 2)  # (batch, seq, d)
        return F.linear(F.silu(self.depthwise_norm(mixed)), self.pointwise_out_weight, self.pointwise_out_bias)


def convolution_module(config: WhisperMoEConfig, side: str) -> ConvolutionModule | None:
    """The convolution module of a `side` layer when config.conv_module asks for one (causal in the decoder)."""
    if not config.echo_setting("conv_module", side):
        return None
    return ConvolutionModule(config.d_model, config.conv_kernel_size, causal=side == "decoder")


def cached_conv_inputs(cache, layer_idx: int, inputs: torch.Tensor, context: int) -> torch.Tensor:
    """The last `context` depthwise inputs before `inputs` (batch, d, new), (batch, d, <= context), from the
    generation `cache`, which then records `inputs` too; none without a cache.

    Called after the layer's self-attention has cached the new tokens. Every input is kept (as keys and values are)
    and the history is read up to the cache's length, so a cropped cache (assisted decoding) continues from there.
    """
    if cache is None:
        return inputs[..., :0]
    states = cache.__dict__.setdefault(CONV_CACHE_ATTRIBUTE, {})
    before = cache.get_seq_length(layer_idx) - inputs.shape[-1]
    history = states.get(layer_idx, inputs[..., :0]) if before else inputs[..., :0]
    if history.shape[-1] < before:
        raise ValueError(
            f"decoder layer {layer_idx}'s convolution has read {history.shape[-1]} tokens, but the cache holds "
            f"{before}."
        )
    history = history[..., :before]
    states[layer_idx] = torch.cat([history, inputs], dim=-1)
    return history[..., max(before - context, 0) :]


def reorder_conv_inputs(cache, beam_idx: torch.Tensor) -> None:
    """Make the convolution inputs kept on `cache` follow the rows beam search keeps (as the key/value caches do)."""
    states = getattr(cache, CONV_CACHE_ATTRIBUTE, {})
    for layer_idx, inputs in states.items():
        states[layer_idx] = inputs.index_select(0, beam_idx.to(inputs.device))


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------------------------------

ECHO_MODULES = (LearnedSinusoidalEmbedding, NoPositionalEmbedding, RotaryEmbedding, DynamicPositionBias,
                ConvolutionModule)  # fmt: skip


def inexact_elements(config: WhisperMoEConfig) -> list[str]:
    """The Echo settings of `config` that change what pretrained Whisper weights compute (see the config's Echo
    section), e.g. ["decoder position_embedding_type='rotary'"]; [] when adding them is exact."""
    found = []
    for side in SIDES:
        kind = config.echo_setting("position_embedding_type", side)
        if kind in ROTARY_TYPES or (kind == "learned_sinusoidal" and side == "decoder"):
            found.append(f"{side} position_embedding_type={kind!r}")
        window = config.echo_setting("local_attention_window", side)
        longest = config.max_source_positions if side == "encoder" else config.max_target_positions
        if window is not None and window < longest:
            found.append(f"{side} local_attention_window={window}")
    return found


def load_with_new_echo_modules(model: nn.Module, state: dict[str, torch.Tensor], seed: int = 0) -> None:
    """`model.load_state_dict(state, strict=True, assign=True)` for a model built on the meta device, except for its
    Echo modules, which are new: they take what `state` holds under their names and the model has (Whisper's
    position table, which a learned_sinusoidal table starts from), drop the rest (the table a rotary side does
    without), and start their other tensors from their own initialisation, drawn with `seed`, on the device of the
    state's tensors."""
    names = set(model.state_dict())
    echo = {name: module for name, module in model.named_modules() if isinstance(module, ECHO_MODULES)}
    prefixes = tuple(f"{name}." for name in echo)
    kept = {key: tensor for key, tensor in state.items() if key in names or not key.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(kept, strict=False, assign=True)
    missing = [key for key in missing if not key.startswith(prefixes)]
    if missing or unexpected:
        raise KeyError(f"The state dict does not fit the model: missing {missing}, unexpected {unexpected}.")
    device = next(iter(state.values())).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in echo.values():
            parts = list(module.modules())
            for part in parts:
                _materialize(part, device)
            for part in reversed(parts):  # children first: the module's own zeros win
                model._init_weights(part)


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Give `module`'s own parameters and buffers still on the meta device empty storage on `device`, and mark the
    others (loaded) as initialised, so that transformers' init functions leave them as they are."""
    for tensors in (module._parameters, module._buffers):
        for key, tensor in tensors.items():
            if tensor is None:
                continue
            if not tensor.is_meta:
                tensor._is_hf_initialized = True
            elif isinstance(tensor, nn.Parameter):
                tensors[key] = nn.Parameter(torch.empty_like(tensor, device=device), tensor.requires_grad)
            else:
                tensors[key] = torch.empty_like(tensor, device=device)
