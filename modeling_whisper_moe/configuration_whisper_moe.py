"""Configuration of WhisperMoE: Whisper whose feed-forward blocks are sparse Mixtures of Experts."""

from huggingface_hub.dataclasses import strict
from transformers import WhisperConfig

EXPERTS_IMPLEMENTATIONS = ("grouped", "loop")


@strict
class WhisperMoEConfig(WhisperConfig):
    r"""
    Everything [`WhisperConfig`] holds, plus the Mixture-of-Experts fields below. A sparse layer replaces Whisper's
    feed-forward block (fc1 -> GELU -> fc2) by a router that scores `num_experts` copies of that block and sends
    each token to its `num_experts_per_tok` best; dense layers keep the plain block.

    num_experts (`int`, defaults to 8):
        Routed experts per sparse layer. Each has the shape of the dense feed-forward block
        (`encoder_ffn_dim` / `decoder_ffn_dim` hidden units), so total parameters grow with it while the compute per
        token grows only with `num_experts_per_tok`.
    num_experts_per_tok (`int`, defaults to 2):
        Experts each token is sent to (top-k). Two keeps a second opinion per token at twice a dense block's cost.
    encoder_sparse_layers (`list[int]`, *optional*):
        Indices of encoder layers whose feed-forward block is sparse. `None` makes every encoder layer sparse; `[]`
        keeps the encoder dense.
    decoder_sparse_layers (`list[int]`, *optional*):
        The same for decoder layers.
    norm_topk_prob (`bool`, defaults to `True`):
        Renormalise the top-k routing weights to sum to one. Upcycling relies on it: with identical experts the
        weighted sum then equals the dense block exactly.
    num_shared_experts (`int`, defaults to 0):
        DeepSeek-style always-on experts per sparse layer, fused into one block of `num_shared_experts` times the
        dense hidden width whose output is added to the routed experts' output.
    router_aux_loss_coef (`float`, defaults to 0.01):
        Weight of the load-balancing loss (Switch Transformer) in the training loss. It is 1.0 when tokens are
        spread evenly, so 0.01 keeps it a gentle pull next to the cross-entropy.
    router_z_loss_coef (`float`, defaults to 0.001):
        Weight of the router z-loss (ST-MoE), which keeps router logits small so the softmax stays numerically
        stable in low precision.
    router_jitter_noise (`float`, defaults to 0.0):
        Multiplicative noise on the router input while training, drawn from U(1 - noise, 1 + noise); helps experts
        that start identical (upcycling) drift apart.
    output_router_logits (`bool`, defaults to `False`):
        Return each sparse layer's router logits. The router losses are computed whenever labels are given, whatever
        this says.
    experts_implementation (`str`, defaults to `"grouped"`):
        How the experts run: "grouped" sorts tokens by expert and runs one matmul per expert (fast); "loop" masks
        each expert's tokens in turn (the reference). Both compute the same function.
    upcycled_from (`str`, *optional*):
        The dense checkpoint (Hub id or path) this model was upcycled from; recorded by `from_dense` for the model
        card.
    """

    model_type = "whisper_moe"

    num_experts: int = 8
    num_experts_per_tok: int = 2
    encoder_sparse_layers: list[int] | None = None
    decoder_sparse_layers: list[int] | None = None
    norm_topk_prob: bool = True
    num_shared_experts: int = 0
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.001
    router_jitter_noise: float | int = 0.0
    output_router_logits: bool = False
    experts_implementation: str = "grouped"
    upcycled_from: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_moe_fields()

    def check_moe_fields(self) -> None:
        """Raise `ValueError` naming the offending value if the Mixture-of-Experts fields cannot work together."""
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be between 1 and num_experts={self.num_experts}, "
                f"got {self.num_experts_per_tok}."
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be 0 or more, got {self.num_shared_experts}.")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}.")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS}, "
                f"got {self.experts_implementation!r}."
            )
        if self.router_jitter_noise >= 1:
            raise ValueError(f"router_jitter_noise must be below 1, got {self.router_jitter_noise}.")
        for side, num_layers in (("encoder", self.encoder_layers), ("decoder", self.decoder_layers)):
            layers = getattr(self, f"{side}_sparse_layers")
            if layers is None:
                continue
            unknown = sorted(set(layers) - set(range(num_layers)))
            if unknown:
                raise ValueError(
                    f"{side}_sparse_layers names layers {unknown}, but the {side} has layers 0..{num_layers - 1}."
                )

    def is_sparse_layer(self, side: str, layer_idx: int) -> bool:
        """Whether layer `layer_idx` of `side` ("encoder" or "decoder") has a sparse feed-forward block."""
        layers = getattr(self, f"{side}_sparse_layers")
        return layers is None or layer_idx in layers


__all__ = ["WhisperMoEConfig"]
