"""Int8 weights for CPU inference: the experts, every linear layer and the tied token embedding / output projection.

Weights are quantized once, symmetrically per output channel (w ~ int8 * scale[channel], zero point 0), and stored
as int8 tensors plus float32 scales, a quarter of the float32 size. Activations are quantized on the fly, per call
and per row (dynamic quantization, each token its own scale; see `int8_linear`), by torch's CPU int8 GEMM
(`torch.ops.quantized.linear_dynamic`: fbgemm on x86, qnnpack on ARM). Those kernels take "prepacked" weights, an
opaque engine-specific object that cannot be saved, so each module packs its int8 buffers lazily on first use and
packs again whenever the buffers are replaced (loading, `.to()`).

Kept in float: the routers (their top-k choice is sensitive and they are tiny), the convolutions, layer norms and
position embeddings. A folder says it is quantized with `config.quantization = {"dtype": "int8"}`; the model's
constructor then builds these modules in place of the float ones, so `from_pretrained` loads the int8 tensors
directly (see `quantize_model`).
"""

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127  # symmetric range [-127, 127]: w and -w quantize alike
MIN_SCALE = 1e-12  # scale of an all-zero channel; any positive value dequantizes it to zeros
PREFERRED_ENGINES = ("fbgemm", "qnnpack", "x86", "onednn")  # first one this torch build supports is used
EXPERT_TENSORS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")  # what makes a module a stacked experts block
ROW_CHUNK = 2048  # rows of an int8 GEMM's input scaled at a time (`int8_linear`)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) float -> int8 (..., out, in) and float32 scales (..., out), symmetric per output channel."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=-1).clamp(min=MIN_SCALE) / INT8_MAX
    int8 = (weight / scale[..., None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return int8, scale


def dequantize(int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 (..., out, in) and scales (..., out) -> float32 (..., out, in)."""
    return int8.float() * scale[..., None]


def int8_engine() -> str:
    """The quantized engine whose int8 GEMM this build of torch runs on this CPU."""
    supported = torch.backends.quantized.supported_engines
    engine = next((name for name in PREFERRED_ENGINES if name in supported), None)
    if engine is None:
        raise RuntimeError(f"This torch build has no int8 CPU engine (supported: {supported}).")
    return engine


@functools.cache
def reduce_range() -> bool:
    """Whether activations must use 7 of their 8 bits. x86 int8 kernels without VNNI add u8 x s8 products pairwise
    in saturating int16, which full-range activations can overflow (torch's own dynamic Linear always reduces); with
    VNNI they accumulate in int32, and the 8th bit halves the activations' rounding error."""
    return int8_engine() != "qnnpack" and not torch.cpu._is_vnni_supported()


def prepack(int8: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    """int8 weight (out, in) and scales (out,) -> the engine's packed weight (no bias: `int8_linear` adds it)."""
    if int8.device.type != "cpu":
        raise RuntimeError(
            f"int8 WhisperMoE weights run on CPU only, but they are on {int8.device}. On a GPU load the float folder "
            "in bfloat16, or with bitsandbytes (load_in_8bit / load_in_4bit)."
        )
    zero_points = torch.zeros(scale.shape, dtype=torch.long)
    with warnings.catch_warnings():
        # torch deprecates creating qint8 tensors, but its int8 GEMM still takes its weight only as one
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        weight = torch._make_per_channel_quantized_tensor(int8, scale.double(), zero_points, 0)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = int8_engine()
    try:
        return torch.ops.quantized.linear_prepack(weight, None)
    finally:
        torch.backends.quantized.engine = previous


def int8_linear(
    hidden_states: torch.Tensor, packed: torch.ScriptObject, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(..., in) -> (..., out) through an int8 packed weight, plus `bias` (out,); float32 inside, the input's dtype
    outside.

    torch's dynamic GEMM quantizes its whole input with one scale. Each row is first divided by its largest |value|
    (and the output multiplied back), so every token gets its own scale: one loud token, or one loud clip of a batch,
    no longer coarsens the rest, and a clip's output does not depend on what it is batched with (docs/RESULTS.md:
    int8 WER on LibriSpeech test-other). Rows go through `ROW_CHUNK` at a time, so the scaled copy stays in cache.
    """
    rows = hidden_states.float().reshape(-1, hidden_states.shape[-1]).contiguous()
    if len(rows) == 1:  # a decoding step at batch 1: one scale is the row's own already
        output = torch.ops.quantized.linear_dynamic(rows, packed, reduce_range())
        output = output if bias is None else output + bias
    else:
        chunks = [_row_scaled_linear(chunk, packed, bias) for chunk in rows.split(ROW_CHUNK)]
        output = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return output.reshape(*hidden_states.shape[:-1], -1).to(hidden_states.dtype)


def _row_scaled_linear(rows: torch.Tensor, packed: torch.ScriptObject, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, in) -> (rows, out): each row scaled to max |x| = 1 for the int8 GEMM, and back."""
    row_max = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=MIN_SCALE)
    output = torch.ops.quantized.linear_dynamic(rows / row_max, packed, reduce_range())
    return output.mul_(row_max) if bias is None else torch.addcmul(bias, output, row_max, out=output)


class _LazyPacked(nn.Module):
    """Packs its int8 buffers on first use, and again whenever they were replaced or modified since."""

    def _packed_sources(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _pack(self) -> list[torch.ScriptObject]:
        raise NotImplementedError

    def packed(self) -> list[torch.ScriptObject]:
        key = tuple((tensor.data_ptr(), tensor._version) for tensor in self._packed_sources())
        if getattr(self, "_packed_key", None) != key:
            self._packed_cache = self._pack()
            self._packed_key = key
        return self._packed_cache

    def __getstate__(self) -> dict:
        # packed weights are engine objects: rebuild them after unpickling or deepcopy instead of copying them
        state = self.__dict__.copy()
        state.pop("_packed_cache", None)
        state.pop("_packed_key", None)
        return state


class Int8Linear(_LazyPacked):
    """`nn.Linear` with int8 weights: weight_int8 (out, in), weight_scale (out,), bias (out,) or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        module.weight_int8, module.weight_scale = quantize_per_channel(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float()
        return module

    def _packed_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.weight_int8, self.weight_scale)

    def _pack(self) -> list[torch.ScriptObject]:
        return [prepack(self.weight_int8, self.weight_scale)]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return int8_linear(hidden_states, self.packed()[0], self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """`nn.Embedding` with int8 rows: weight_int8 (vocab, d_model) and one scale per row, weight_scale (vocab,).

    Its per-row scales are the per-output-channel scales of the tied output projection, so one int8 matrix serves
    both (`Int8TiedProjection`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device: torch.device | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer(
            "weight_int8", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "Int8Embedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.weight.device)
        module.weight_int8, module.weight_scale = quantize_per_channel(embedding.weight)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(...) token ids -> (..., embedding_dim) float32."""
        return F.embedding(input_ids, self.weight_int8).float() * self.weight_scale[input_ids, None]


class Int8TiedProjection(_LazyPacked):
    """The output projection (d_model -> vocab) tied to an `Int8Embedding`: it reads the embedding's int8 rows and
    owns no tensors, so the folder stores the matrix once."""

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: its buffers belong to the decoder's state dict
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def _packed_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.embedding.weight_int8, self.embedding.weight_scale)

    def _pack(self) -> list[torch.ScriptObject]:
        return [prepack(self.embedding.weight_int8, self.embedding.weight_scale)]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> logits (..., vocab)."""
        return int8_linear(hidden_states, self.packed()[0])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the token embedding"


class Int8Experts(_LazyPacked):
    """Int8 version of `WhisperMoEExperts` with the same forward: int8 weights fc1_weight_int8 (E, ffn, d),
    fc2_weight_int8 (E, d, ffn), scales fc1_weight_scale (E, ffn), fc2_weight_scale (E, d), float biases
    fc1_bias (E, ffn), fc2_bias (E, d).

    Tokens are sorted by expert once, each expert runs two int8 GEMMs over its contiguous slice, and the weighted
    outputs are scattered back (the grouped dispatch).
    """

    def __init__(self, num_experts: int, d_model: int, ffn_dim: int, activation_fn: nn.Module, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.activation_fn = activation_fn
        for name, rows, columns in (("fc1", ffn_dim, d_model), ("fc2", d_model, ffn_dim)):
            int8 = torch.empty(num_experts, rows, columns, dtype=torch.int8, device=device)
            self.register_buffer(f"{name}_weight_int8", int8)
            self.register_buffer(f"{name}_weight_scale", torch.empty(num_experts, rows, device=device))
            self.register_buffer(f"{name}_bias", torch.empty(num_experts, rows, device=device))

    @classmethod
    def from_float(cls, experts: nn.Module) -> "Int8Experts":
        """From a `WhisperMoEExperts` (stacked fc1_weight (E, ffn, d), fc1_bias, fc2_weight (E, d, ffn), fc2_bias)."""
        num_experts, ffn_dim, d_model = experts.fc1_weight.shape
        module = cls(num_experts, d_model, ffn_dim, experts.activation_fn, experts.fc1_weight.device)
        module.fc1_weight_int8, module.fc1_weight_scale = quantize_per_channel(experts.fc1_weight)
        module.fc2_weight_int8, module.fc2_weight_scale = quantize_per_channel(experts.fc2_weight)
        module.fc1_bias = experts.fc1_bias.detach().float()
        module.fc2_bias = experts.fc2_bias.detach().float()
        return module

    def _packed_sources(self) -> tuple[torch.Tensor, ...]:
        parts = ("weight_int8", "weight_scale")
        return tuple(getattr(self, f"{name}_{part}") for name in ("fc1", "fc2") for part in parts)

    def _pack(self) -> list[tuple[torch.ScriptObject, torch.ScriptObject]]:
        return [
            (
                prepack(self.fc1_weight_int8[e], self.fc1_weight_scale[e]),
                prepack(self.fc2_weight_int8[e], self.fc2_weight_scale[e]),
            )
            for e in range(self.num_experts)
        ]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states (tokens, d_model), top_k_index / top_k_weights (tokens, k) -> (tokens, d_model)."""
        packed = self.packed()
        top_k = top_k_index.shape[-1]
        flat_experts = top_k_index.reshape(-1)  # (tokens * k,)
        order = flat_experts.argsort(stable=True)
        token_of_slot = order // top_k
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        grouped = hidden_states[token_of_slot].float().split(counts)
        outputs = [
            int8_linear(self.activation_fn(int8_linear(tokens, fc1, self.fc1_bias[e])), fc2, self.fc2_bias[e])
            for e, ((fc1, fc2), tokens) in enumerate(zip(packed, grouped))
            if tokens.shape[0] > 0
        ]
        expert_out = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]  # (tokens * k, d_model)
        return torch.zeros_like(hidden_states).index_add_(0, token_of_slot, expert_out.to(hidden_states.dtype))


def _is_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), torch.Tensor) for name in EXPERT_TENSORS)


def _quantized_child(name: str, child: nn.Module) -> nn.Module | None:
    """The int8 replacement of `child`, or None to keep it (routers, convolutions, norms, position tables)."""
    if isinstance(child, nn.Linear):
        return Int8Linear.from_float(child)
    if _is_experts(child):
        return Int8Experts.from_float(child)
    if isinstance(child, nn.Embedding) and name == "embed_tokens":
        return Int8Embedding.from_float(child)
    return None


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, the float modules of a WhisperMoE model by int8 ones, as `model.config.quantization` says,
    and return it.

    Quantizes the stacked experts, every `nn.Linear` (attention projections, dense and shared feed-forward blocks,
    the output projection) and the decoder's token embedding; with `"float_embeddings": True` the token embedding
    and the output projection stay float. With tied embeddings the output projection becomes a view of the int8
    embedding. Idempotent; on the meta device (inside `from_pretrained`) it only builds empty int8 modules of the
    right shapes, which loading then fills.
    """
    float_embeddings = (model.config.quantization or {}).get("float_embeddings", False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name == "proj_out" or (float_embeddings and name == "embed_tokens"):
                continue  # the output projection after the embedding, which it may be tied to
            replacement = _quantized_child(name, child)
            if replacement is not None:
                setattr(parent, name, replacement)
    if isinstance(getattr(model, "proj_out", None), nn.Linear) and not float_embeddings:
        _quantize_output_projection(model)
    return model


def _quantize_output_projection(model: nn.Module) -> None:
    embedding = model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(embedding, Int8Embedding):
        model.proj_out = Int8TiedProjection(embedding)
        # the tie now lives in Int8TiedProjection; transformers' tying by parameter name has nothing left to tie
        model._tied_weights_keys = None
        model.all_tied_weights_keys = {}
    else:
        model.proj_out = Int8Linear.from_float(model.proj_out)


def int8_tensor_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes in int8 tensors, bytes in all other tensors) of the model's state dict, tied tensors counted once."""
    int8 = other = 0
    for tensor in {tensor.data_ptr(): tensor for tensor in model.state_dict().values()}.values():
        size = tensor.numel() * tensor.element_size()
        if tensor.dtype == torch.int8:
            int8 += size
        else:
            other += size
    return int8, other


__all__ = ["Int8Embedding", "Int8Experts", "Int8Linear", "Int8TiedProjection", "dequantize", "quantize_model"]
