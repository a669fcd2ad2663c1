"""Configuration of WhisperMoE: Whisper whose feed-forward blocks are sparse Mixtures of Experts."""

import math

from huggingface_hub.dataclasses import strict
from transformers import WhisperConfig

EXPERTS_IMPLEMENTATIONS = ("grouped", "loop", "grouped_mm", "batched_mm")
QUANTIZATION_DTYPES = ("int8",)  # what `whisper-moe quantize --dtype` writes
QUANTIZATION_KEYS = frozenset({"dtype", "float_embeddings"})  # what a `quantization` dict may hold
GROWTH_KEYS = frozenset({"num_experts", "num_experts_per_tok", "encoder_layers", "decoder_layers"})  # one phase
GROWTH_PEER_KEY = "peer"  # a phase may also add a PEER block (peer.py) to its layers
GROWTH_MODALITIES_KEY = "modalities"  # a phase may serve only some input modalities
GROWTH_OPTIONAL_KEYS = frozenset({GROWTH_PEER_KEY, GROWTH_MODALITIES_KEY})
# what the encoder reads: log-mel audio, token ids, sign keypoints, RGB video patches
INPUT_MODALITIES = ("speech", "text", "pose", "video")
TTT_TYPES = ("linear", "mlp")  # TTT-Linear, TTT-MLP (ttt.py)
# a phase's "peer" entry: 128**2 single-neuron experts, 4 retrieval heads of top-16, queries 128 wide, by default
PEER_DEFAULTS = {"num_keys": 128, "num_heads": 4, "num_experts_per_head": 16, "key_dim": 128}
PEER_KEYS = frozenset(PEER_DEFAULTS)
WAVENET_KEYS = frozenset({"layers", "channels", "dilations", "kernel_size", "alpha"})  # `wavenet_branch` (wavenet.py)
WAVENET_DEFAULTS = {"kernel_size": 2, "alpha": 0.0}  # WaveNet's kernel; alpha 0: the decoder is unchanged
WAVENET_DILATION_CYCLE = 10  # default dilations 1, 2, ..., 512, then again from 1, as in WaveNet
SIDES = ("encoder", "decoder")
POSITION_EMBEDDING_TYPES = ("sinusoidal", "rotary", "rotary_givens", "learned_sinusoidal")
ROTARY_TYPES = ("rotary", "rotary_givens")
# Echo fields that take one value for both sides or a {"encoder": ..., "decoder": ...} dict (see echo_setting)
ECHO_SIDED_FIELDS = (
    "position_embedding_type",
    "dynamic_position_bias",
    "local_attention_window",
    "global_tokens",
    "conv_module",
)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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
    expert_segments (`int`, defaults to 1):
        DeepSeek-MoE fine-grained experts: each routed expert is `1 / expert_segments` of the dense block's width
        (`encoder_ffn_dim / expert_segments` hidden units), which must divide both ffn dims. `num_experts` and
        `num_experts_per_tok` count these narrow experts: upcycling and recipe presets name coarse experts instead
        (copies of the dense block) and multiply both counts by `expert_segments`, so 8 experts top-2 in 4 segments
        become 32 experts top-8 with the same active parameters and finer combinations. Shared experts and dense
        layers keep the full width. Folders saved before this field existed load with 1.
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
        How the experts run, all computing the same function: "grouped" sorts tokens by expert and runs one matmul
        per expert segment (fastest on CPU); "loop" masks each expert's tokens in turn (the reference);
        "grouped_mm" and "batched_mm" are transformers' experts kernels (`torch._grouped_mm`, the fast choice on
        recent GPUs). `from_pretrained(..., experts_implementation=...)` and `model.set_experts_implementation(...)`
        switch it without touching this saved default.
    upcycled_from (`str`, *optional*):
        The dense checkpoint (Hub id or path) this model was upcycled from; recorded by `from_dense` for the model
        card.
    quantization (`dict`, *optional*):
        `None` for float weights. `{"dtype": "int8"}` marks a folder written by `whisper-moe quantize`: experts,
        linear layers and the tied token embedding / output projection hold int8 weights with one float32 scale per
        output channel, run by torch's CPU int8 kernels (see quantization.py). The model then builds those int8
        modules itself, so `from_pretrained` loads the int8 tensors as they are. `"float_embeddings": True` keeps the
        token embedding and output projection in float (more accurate, 4x larger on disk).
    variable_length_audio (`bool`, defaults to `False`):
        Encode only a clip's real mel frames instead of Whisper's fixed 30 s window: the encoder trims the batch to
        its longest clip (by `attention_mask`), masks the padding in self- and cross-attention and gives each clip
        positions from 0. Pretrained Whisper weights expect the 30 s window, so this changes their outputs: switch
        it on for a fine-tune (short clips then cost a fraction of the compute) and keep it for inference. Generation
        then decodes without timestamps.
    pack_audio (`bool`, defaults to `True`):
        With `variable_length_audio`, pack several clips into one encoder sequence (up to `max_source_positions`)
        with a block-diagonal attention mask, so no compute goes to padding; `False` pads each clip to the batch's
        longest instead. Both give the same outputs.
    pack_pose (`bool`, defaults to `True`):
        With `pose_frontend`, run a batch of keypoint clips packed (packing.plan_clip_packing): the clips laid end to
        end in rows no longer than the batch's longest clip, each frame keeping its clip's positions 0..len-1, with a
        block-diagonal attention mask, so the encoder's layers and experts see only real frames; `False` pads each
        clip to the longest. Both give the same outputs. Not with encoder TTT layers, an encoder `conv_module` or
        encoder `global_tokens`: they would read across the clips of a row.
    text_frontend (`bool`, defaults to `False`):
        Give the encoder a text front-end next to the audio one: a token embedding of width `d_model` and learned
        text positions, so the encoder takes `input_ids` + `attention_mask` as well as `input_features` and the same
        model translates text. Off by default, so audio checkpoints are unchanged; when added to a trained model
        the token embedding starts as a rescaled copy of the decoder's (Whisper's tokenizer is shared by both sides)
        and the positions as the encoder's sinusoids. Not named `text_encoder`: transformers' `get_text_config()`
        takes an attribute of that name for a sub-config.
    pose_frontend (`bool`, defaults to `False`):
        Give the encoder a pose front-end (pose.py): per-frame body and hand keypoints of a signer (27 MediaPipe
        Holistic points, normalised to the shoulders) projected to `d_model`, with the encoder's sinusoidal
        positions, so the encoder takes `pose_values` + `attention_mask` and the same model reads sign language.
        At most `max_source_positions` frames (60 s at 25 fps).

    Video patches (the patch front-end, patches.py), read only with `patch_frontend`:

    patch_frontend (`bool`, defaults to `False`):
        Give the encoder a patch front-end: RGB video cut into tubelets of `video_tubelet_frames` x
        `video_patch_size` x `video_patch_size` pixels, each flattened and projected to `d_model`, with factorised
        positions (NaViT's fractional rows and columns, so any resolution maps into one position space, plus the
        tubelet's time), so the encoder takes `pixel_values` (+ `attention_mask` of real frames) and the same model
        reads video. A clip gives at most `max_source_positions` tubelets.
    video_tubelet_frames (`int`, defaults to 2):
        Frames per tubelet (ViViT's tubelet embedding): 2 halves the tokens of a clip and still sees motion.
    video_patch_size (`int`, defaults to 16):
        Side of a tubelet's square patch in pixels (ViT's 16); a frame's sides are cropped to multiples of it.
    video_position_buckets (`int`, defaults to 32):
        Learned row and column embeddings per axis: a patch's fractional place (index / patches along the axis, in
        [0, 1)) falls in one of these buckets, so 32 keeps every place of frames up to 32 patches wide distinct.
    video_token_dropout (`float`, defaults to 0.0):
        Share of each clip's tubelets dropped at random while training (NaViT's token dropping: cheaper steps, a
        regulariser); the kept ones stay in order. None is dropped in evaluation or generation.
    video_fps (`float`, defaults to 12.5):
        Frames per second the video-to-text pipeline samples a video file at (half of 25 fps).
    video_size (`int`, defaults to 112):
        Shorter side in pixels the pipeline resizes frames to (7 x 7 patches of 16 at a square 112).
    max_text_positions (`int`, defaults to 448):
        Longest token sequence the text front-end takes (its position table's size, at most
        `max_source_positions`).
    text_encoder_layers (`int`, *optional*):
        How many of the encoder's layers text runs through (the first ones, then the final layer norm); all when
        unset. Whisper's deeper audio layers turn text into one massive activation shared by every position (with
        base, layer 4's feed-forward block writes ~300 into one channel, and the positions' states become ~98 %
        alike), which the decoder cannot read; the shallow layers keep the tokens apart.

    Growth (lifelong learning by adding experts, see growth.py):

    expert_growth (`list[dict]`, *optional*):
        One entry per growth phase, oldest first, each `{"num_experts": N, "num_experts_per_tok": k,
        "encoder_layers": [...], "decoder_layers": [...]}`: the phase appended N experts to each listed layer (a dense
        layer listed becomes sparse, its block the single expert of the base group) and routes every token to its k
        best of them as well as to the base group's. A phase's experts compete with a learned "null expert" whose
        logit is a bias: their weights are their softmax probabilities over the phase's experts and the null, so a
        token the phase should leave alone can give them (almost) no weight. The experts are added with a zero
        output projection, so a grown model computes exactly what it did before growing until it is trained.
        `None` (the default) for a model that never grew.
        A phase may also hold `"peer": {"num_keys": n, "num_heads": h, "num_experts_per_head": k, "key_dim": c}`: each
        listed layer then gets a PEER block (peer.py) beside its feed-forward block, n**2 single-neuron experts of
        which every token uses h * k, found by product keys over queries of width c (even: two halves); its up
        vectors start at zero, so growing it is exact too. A phase that adds only a PEER block has `num_experts` and
        `num_experts_per_tok` 0, and its layers may be dense.
        A phase may also hold `"modalities": [...]`, a subset of "speech", "text", "pose", "video": its experts and
        PEER blocks then serve only inputs of those modalities (the encoder's input decides, for the encoder and the
        decoder alike) and stay silent for the others, so a phase that learns a text task cannot change what the
        model does with speech, however far it trains: modality experts. Without the key a phase serves every input.

    Test-Time-Training sub-layers (see ttt.py), off unless layers are listed:

    encoder_ttt_layers (`list[int]`, *optional*):
        Encoder layers that get a TTT sub-layer after their self-attention: pre-norm, then the bidirectional TTT
        layer (forward and reversed passes, shared weights, a tanh gate each), added to the residual stream. The
        gates start at 0, so adding TTT to a trained model changes no output until it is trained. `None` or `[]`:
        none. Not with `variable_length_audio`: a TTT layer reads its whole row, and packed rows hold several clips.
    decoder_ttt_layers (`list[int]`, *optional*):
        The same for decoder layers, with the causal TTT layer behind one zero-initialised tanh gate; generation
        carries each one's inner weights in the cache, so every decoded token costs the same.
    ttt_type (`str`, defaults to `"mlp"`):
        "linear" (TTT-Linear: the hidden state is one linear map per head) or "mlp" (TTT-MLP: a two-layer MLP 4x
        the head width), as in the paper.
    ttt_mini_batch_size (`int`, defaults to 16):
        Tokens per inner gradient step (the paper's b = 16: smaller learns faster per token, larger is cheaper).
    ttt_base_lr (`float`, *optional*):
        base_lr of the inner learning-rate gate; the paper's 1.0 for "linear" and 0.1 for "mlp" when unset.
    ttt_num_heads (`int`, *optional*):
        Heads of the TTT layers (each with its own inner model); the layer's attention heads when unset.

    wavenet_branch (`dict`, *optional*):
        A WaveNet beside the decoder (see wavenet.py), mixed into the logits as alpha * g + (1 - alpha) * h:
        `{"layers": n, "channels": c}` and optionally `"dilations"` (n ints, default 1, 2, 4, ... doubling up to 512,
        then again from 1), `"kernel_size"` (default 2) and `"alpha"`, the learned weight's start (default 0, which
        leaves a trained decoder's logits exactly as they were). Causal: token t reads tokens 0..t only. `None`: no
        branch.

    Echo architecture elements (see echo.py), off by default. Each of `position_embedding_type`,
    `dynamic_position_bias`, `local_attention_window`, `global_tokens` and `conv_module` takes one value for both
    sides or a dict such as `{"encoder": "rotary"}` or `{"decoder": True}`; a side the dict leaves out keeps the
    default. "Exact" below means that an element added to pretrained weights (`from_dense(..., conv_module=True)`, or
    `from_pretrained(folder, conv_module=True)` of a folder saved without it) leaves every output as it was, up to
    float rounding, until training moves it; the others change a pretrained model's outputs, so they are opt-in for
    fine-tuning (from_dense warns) and meant for models trained with them.

    position_embedding_type (`str` or `dict`, defaults to `"sinusoidal"`):
        How a side encodes positions. "sinusoidal": Whisper's own (the encoder's fixed sinusoids, the decoder's
        learned absolute table). "rotary": no absolute table; RoPE turns the queries and keys of self-attention
        (channel pairs (2i, 2i + 1) of each head by position * rotary_theta^(-2i / head_dim)), so attention sees
        relative positions only. "rotary_givens": RoPE after a learned orthogonal change of basis per head,
        x' = RoPE(x G_1 ... G_m R), with G_k learned Givens rotations in the planes (2k + 1, 2k + 2), which couple
        neighbouring RoPE frequencies, and R = exp(S - S^T) a learned rotation; angles and S start at zero (R starts
        as the identity, an orthogonal initialisation), so at init it equals "rotary". The mixing goes before RoPE:
        an orthogonal map applied to both queries and keys after it cancels in their dot products.
        "learned_sinusoidal": the side's absolute table becomes a learned one initialised to Whisper's sinusoids (or,
        added to pretrained weights, to their table), each row L2-normalised and multiplied by one learned scale that
        starts at the table's mean row norm (sqrt(d_model / 2) for sinusoids).
        Exact: "learned_sinusoidal" on the encoder (its sinusoid rows share one norm; on tiny.en, whose stored table
        is rounded, logits move by under 1e-4). Not exact: "rotary" and "rotary_givens" (a model trained with
        absolute positions loses them) and "learned_sinusoidal" on the decoder (the rows of Whisper's learned
        decoder table have different norms). Rotary sides need an even head width.
    rotary_theta (`float`, defaults to 10000.0):
        RoPE's base (RoFormer's): the fastest channel pair turns one radian per position, the slowest about once per
        2 pi theta positions.
    dynamic_position_bias (`bool` or `dict`, defaults to `False`):
        x-transformers' dynamic position bias in every self-attention of the side: a small MLP maps the distance
        i - j of query i and key j to one bias per head, added to the attention logits. Its output layer starts at
        zero: exact. Needs attn_implementation "sdpa" or "eager".
    dynamic_position_bias_dim (`int`, defaults to 64):
        Hidden width of that MLP: it is a function of one number, so a few dozen units suffice.
    dynamic_position_bias_depth (`int`, defaults to 2):
        Hidden layers (Linear + SiLU) before its output layer (x-transformers' default).
    dynamic_position_bias_log_base (`float`, *optional*, defaults to e):
        The MLP reads sign(d) * log_b(1 + |d|) of the distance d in base b, so near distances stay apart while the
        1,500 positions of a 30 s window span about +-7.3 (natural log); a larger base compresses further. `None`
        feeds the raw distance.
    local_attention_window (`int` or `dict`, *optional*):
        Sliding-window self-attention: query i attends the keys j with |i - j| < window (in the decoder, still
        causal, the `window` latest tokens including its own). `None`: full attention. Exact only where the window
        covers the side's longest sequence (max_source_positions / max_target_positions). Needs attn_implementation
        "sdpa" or "eager".
    global_tokens (`int` or `dict`, defaults to 0):
        With a window, the first `global_tokens` positions attend to, and are attended by, every position (in the
        decoder, every later one: the prompt tokens, say; positions are cache slots, so in a left-padded decoder
        batch they are the padded rows' first slots). At most the window. Not on the encoder with packed
        variable_length_audio: a packed row holds several clips.
    conv_module (`bool` or `dict`, defaults to `False`):
        A Conformer convolution module in every layer of the side, after self-attention (and the TTT sub-layer):
        layer norm, pointwise projection to 2 x d_model and GLU, depthwise convolution over time, layer norm, SiLU,
        and a pointwise projection whose weights start at zero, added to the residual stream: exact. The decoder's
        convolution is causal (it sees the kernel_size - 1 positions before each one); generation keeps its inputs
        in the cache. Not on the encoder with variable_length_audio: it would read across packed clips.
    conv_kernel_size (`int`, defaults to 31):
        Depthwise kernel width in positions (Conformer's 31: 0.62 s of encoder positions at 20 ms); odd when the
        encoder has the module, which centres it.

    Text-to-speech fields, read only by [`WhisperMoEForTextToSpeech`] (the speech-recognition model ignores them):

    tts_speaker_embedding_dim (`int`, defaults to 0):
        Width of the optional speaker embedding (e.g. 512 for x-vectors, or a one-hot over training voices) that is
        projected onto the text encoding. 0 means the model takes no speaker input.
    tts_duration_loss_coef (`float`, defaults to 1.0):
        Weight of the duration predictor's loss (MSE of log(1 + frames) per token) next to the L1 mel loss; both are
        of order 0.1-1 once training settles, so equal weight keeps either from being ignored.
    tts_postnet_layers (`int`, defaults to 0):
        Convolution layers of the residual post-net that sharpens the predicted mel (Tacotron 2); 0 disables it.
    tts_reduction_factor (`int`, defaults to 1):
        Mel frames each decoder position predicts (Tacotron's reduction factor). Speech changes little within 30 ms,
        so 3 cuts the decoder's work threefold at little cost in detail; durations become multiples of it.
    """

    model_type = "whisper_moe"

    num_experts: int = 8
    num_experts_per_tok: int = 2
    expert_segments: int = 1
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
    quantization: dict | None = None
    variable_length_audio: bool = False
    pack_audio: bool = True
    pack_pose: bool = True
    text_frontend: bool = False
    max_text_positions: int = 448
    pose_frontend: bool = False
    patch_frontend: bool = False
    video_tubelet_frames: int = 2
    video_patch_size: int = 16
    video_position_buckets: int = 32
    video_token_dropout: float | int = 0.0
    video_fps: float | int = 12.5
    video_size: int = 112
    text_encoder_layers: int | None = None
    tts_speaker_embedding_dim: int = 0
    tts_duration_loss_coef: float | int = 1.0
    tts_postnet_layers: int = 0
    tts_reduction_factor: int = 1
    expert_growth: list[dict] | None = None
    encoder_ttt_layers: list[int] | None = None
    decoder_ttt_layers: list[int] | None = None
    ttt_type: str = "mlp"
    ttt_mini_batch_size: int = 16
    ttt_base_lr: float | int | None = None
    ttt_num_heads: int | None = None
    wavenet_branch: dict | None = None
    position_embedding_type: str | dict = "sinusoidal"
    rotary_theta: float | int = 10000.0
    dynamic_position_bias: bool | dict = False
    dynamic_position_bias_dim: int = 64
    dynamic_position_bias_depth: int = 2
    dynamic_position_bias_log_base: float | int | None = math.e
    local_attention_window: int | dict | None = None
    global_tokens: int | dict = 0
    conv_module: bool | dict = False
    conv_kernel_size: int = 31

    def check_text_encoder_layers(self, text_encoder_layers: int | None) -> None:
        """Raise unless `text_encoder_layers` is unset or between 1 and `encoder_layers`."""
        if text_encoder_layers is not None and not 1 <= text_encoder_layers <= self.encoder_layers:
            raise ValueError(
                f"text_encoder_layers must be between 1 and encoder_layers={self.encoder_layers}, "
                f"got {text_encoder_layers}."
            )

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_moe_fields()
        if self._experts_implementation is None:
            # what the experts dispatch on (transformers' runtime switch), defaulting to the saved choice
            self._experts_implementation = self.experts_implementation

    def check_moe_fields(self) -> None:
        """Raise `ValueError` naming the offending value if the Mixture-of-Experts fields cannot work together."""
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be between 1 and num_experts={self.num_experts}, "
                f"got {self.num_experts_per_tok}."
            )
        self.check_expert_segments()
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be 0 or more, got {self.num_shared_experts}.")
        for name in (
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "router_jitter_noise",
            "tts_speaker_embedding_dim",
            "tts_duration_loss_coef",
            "tts_postnet_layers",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}.")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS}, "
                f"got {self.experts_implementation!r}."
            )
        if self.tts_reduction_factor < 1:
            raise ValueError(f"tts_reduction_factor must be at least 1, got {self.tts_reduction_factor}.")
        if self.max_text_positions < 1:
            raise ValueError(f"max_text_positions must be at least 1, got {self.max_text_positions}.")
        self.check_text_encoder_layers(self.text_encoder_layers)
        self.check_video()
        self.check_quantization()
        self.check_growth()
        self.check_ttt()
        self.wavenet_settings()
        self.check_echo()
        self.check_pose_packing()
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

    def check_video(self) -> None:
        """Raise `ValueError` naming the offending value if the patch front-end's fields cannot work together."""
        for name in ("video_tubelet_frames", "video_patch_size", "video_position_buckets", "video_size"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}.")
        if not 0.0 <= self.video_token_dropout < 1.0:
            raise ValueError(f"video_token_dropout must be in [0, 1), got {self.video_token_dropout}.")
        if not (self.video_fps > 0 and math.isfinite(self.video_fps)):
            raise ValueError(f"video_fps must be a positive number of frames per second, got {self.video_fps}.")
        if self.video_size < self.video_patch_size:
            raise ValueError(
                f"video_size={self.video_size} is smaller than one patch (video_patch_size={self.video_patch_size})."
            )
        per_tubelet = (self.video_size // self.video_patch_size) ** 2  # tokens of one tubelet at a square frame
        if self.patch_frontend and per_tubelet > self.max_source_positions:
            raise ValueError(
                f"A {self.video_size}x{self.video_size} frame gives {per_tubelet} patches of {self.video_patch_size}, "
                f"more than max_source_positions={self.max_source_positions}: lower video_size or raise "
                "video_patch_size."
            )

    def check_ttt(self) -> None:
        """Raise `ValueError` naming the offending value if the Test-Time-Training fields cannot work together."""
        if self.ttt_type not in TTT_TYPES:
            raise ValueError(f"ttt_type must be one of {TTT_TYPES}, got {self.ttt_type!r}.")
        if self.ttt_mini_batch_size < 1:
            raise ValueError(f"ttt_mini_batch_size must be at least 1, got {self.ttt_mini_batch_size}.")
        if self.ttt_base_lr is not None and self.ttt_base_lr <= 0:
            raise ValueError(f"ttt_base_lr must be positive, got {self.ttt_base_lr}.")
        for side in ("encoder", "decoder"):
            layers = getattr(self, f"{side}_ttt_layers") or []
            num_layers = getattr(self, f"{side}_layers")
            unknown = sorted(set(layers) - set(range(num_layers)))
            if unknown:
                raise ValueError(
                    f"{side}_ttt_layers names layers {unknown}, but the {side} has layers 0..{num_layers - 1}."
                )
            heads = self.ttt_num_heads or getattr(self, f"{side}_attention_heads")
            if layers and (self.d_model % heads or (self.d_model // heads) % 2):
                raise ValueError(
                    f"TTT layers split d_model={self.d_model} into {heads} heads, which must have an even width "
                    "(set ttt_num_heads)."
                )
        if self.encoder_ttt_layers and self.variable_length_audio:
            raise ValueError(
                f"encoder_ttt_layers={self.encoder_ttt_layers} cannot be used with variable_length_audio: a TTT layer "
                "reads its whole row, and packed rows hold several clips."
            )

    def check_pose_packing(self, pose_frontend: bool | None = None) -> None:
        """Raise `ValueError` naming the offending value if packed pose clips (`pack_pose`) would read each other;
        `pose_frontend` checks a front-end about to be added (default: the config's own)."""
        if not ((self.pose_frontend if pose_frontend is None else pose_frontend) and self.pack_pose):
            return
        readers = {
            "encoder_ttt_layers": self.encoder_ttt_layers,
            "conv_module": self.echo_setting("conv_module", "encoder"),
            "global_tokens": self.echo_setting("global_tokens", "encoder"),
        }
        for name, value in readers.items():
            if value:
                raise ValueError(
                    f"encoder {name}={value!r} cannot be used with packed pose clips: a packed row holds several "
                    "clips (set pack_pose=False)."
                )

    def wavenet_settings(self) -> dict | None:
        """`wavenet_branch` with its defaults filled in (None: no branch); raises `ValueError` naming an impossible
        value."""
        spec = self.wavenet_branch
        if spec is None:
            return None
        if not isinstance(spec, dict) or not {"layers", "channels"} <= set(spec) <= WAVENET_KEYS:
            raise ValueError(
                f"wavenet_branch must be a dict with 'layers' and 'channels' and optionally "
                f"{sorted(WAVENET_KEYS - {'layers', 'channels'})}, got {spec!r}."
            )
        settings = {**WAVENET_DEFAULTS, **spec}
        if not all(_is_positive_int(settings[key]) for key in ("layers", "channels", "kernel_size")):
            raise ValueError(f"wavenet_branch's layers, channels and kernel_size must be positive ints, got {spec!r}.")
        layers = settings["layers"]
        settings.setdefault("dilations", [2 ** (i % WAVENET_DILATION_CYCLE) for i in range(layers)])
        dilations = settings["dilations"]
        if not isinstance(dilations, list) or len(dilations) != layers or not all(map(_is_positive_int, dilations)):
            raise ValueError(
                f"wavenet_branch's dilations must be {layers} positive ints, one per layer, got {dilations!r}."
            )
        alpha = settings["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"wavenet_branch's alpha must be a number between 0 and 1, got {alpha!r}.")
        return settings

    def echo_setting(self, name: str, side: str):
        """The value of Echo field `name` (one of ECHO_SIDED_FIELDS) on `side`: its one value, or its dict's entry for
        the side, or the field's default where the dict has none."""
        value = getattr(self, name)
        if isinstance(value, dict):
            return value.get(side, type(self).__dataclass_fields__[name].default)
        return value

    def check_echo(self) -> None:
        """Raise `ValueError` naming the offending value if the Echo fields cannot work together."""
        for name in ECHO_SIDED_FIELDS:
            value = getattr(self, name)
            if isinstance(value, dict) and not set(value) <= set(SIDES):
                raise ValueError(f"{name} takes one value or a dict with keys among {SIDES}, got {value!r}.")
        if self.rotary_theta <= 0:
            raise ValueError(f"rotary_theta must be positive, got {self.rotary_theta}.")
        for name in ("dynamic_position_bias_dim", "dynamic_position_bias_depth", "conv_kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        base = self.dynamic_position_bias_log_base
        if base is not None and base <= 1:
            raise ValueError(f"dynamic_position_bias_log_base must be above 1 (or None), got {base}.")
        for side in SIDES:
            self._check_echo_positions(side)
            self._check_echo_window(side)
            for name in ("dynamic_position_bias", "conv_module"):
                if not isinstance(self.echo_setting(name, side), bool):
                    raise ValueError(f"{side} {name} must be True or False, got {self.echo_setting(name, side)!r}.")
        if self.echo_setting("conv_module", "encoder"):
            if self.conv_kernel_size % 2 == 0:
                raise ValueError(
                    f"conv_kernel_size must be odd with an encoder conv_module (centred), got {self.conv_kernel_size}."
                )
            if self.variable_length_audio:
                raise ValueError(
                    f"conv_module={self.conv_module!r} on the encoder cannot be used with variable_length_audio: the "
                    "convolution would read across packed clips and padding."
                )

    def _check_echo_positions(self, side: str) -> None:
        kind = self.echo_setting("position_embedding_type", side)
        if kind not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"{side} position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, got {kind!r}."
            )
        heads = getattr(self, f"{side}_attention_heads")
        if kind in ROTARY_TYPES and (self.d_model % heads or (self.d_model // heads) % 2):
            raise ValueError(
                f"{side} position_embedding_type={kind!r} turns channel pairs: d_model={self.d_model} must split into "
                f"{heads} heads of even width."
            )

    def _check_echo_window(self, side: str) -> None:
        window = self.echo_setting("local_attention_window", side)
        global_tokens = self.echo_setting("global_tokens", side)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"{side} local_attention_window must be a positive integer or None, got {window!r}.")
        if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
            raise ValueError(f"{side} global_tokens must be a non-negative integer, got {global_tokens!r}.")
        if global_tokens and window is None:
            raise ValueError(f"{side} global_tokens={global_tokens} needs a local_attention_window.")
        if window is not None and global_tokens > window:
            raise ValueError(f"{side} global_tokens={global_tokens} must be at most local_attention_window={window}.")
        if side == "encoder" and global_tokens and self.variable_length_audio and self.pack_audio:
            raise ValueError(
                f"encoder global_tokens={global_tokens} cannot be used with packed variable_length_audio: a packed "
                "row holds several clips (set pack_audio=False)."
            )

    def has_ttt(self, side: str, layer_idx: int) -> bool:
        """Whether layer `layer_idx` of `side` has a Test-Time-Training sub-layer."""
        return layer_idx in (getattr(self, f"{side}_ttt_layers") or ())

    def check_expert_segments(self) -> None:
        """Raise `ValueError` naming the value unless `expert_segments` is at least 1 and divides both ffn dims."""
        if self.expert_segments < 1:
            raise ValueError(f"expert_segments must be at least 1, got {self.expert_segments}.")
        for side in ("encoder", "decoder"):
            ffn_dim = getattr(self, f"{side}_ffn_dim")
            if ffn_dim % self.expert_segments:
                raise ValueError(f"expert_segments must divide {side}_ffn_dim={ffn_dim}, got {self.expert_segments}.")

    def expert_ffn_dim(self, ffn_dim: int) -> int:
        """Hidden units of each routed expert in a layer whose dense block has `ffn_dim`."""
        return ffn_dim // self.expert_segments

    def check_quantization(self) -> None:
        """Raise `ValueError` naming the offending value if `quantization` is not None or {"dtype": one of
        QUANTIZATION_DTYPES, optionally "float_embeddings": bool}."""
        if self.quantization is None:
            return
        if not isinstance(self.quantization, dict) or not {"dtype"} <= set(self.quantization) <= QUANTIZATION_KEYS:
            raise ValueError(
                f'quantization must be None or {{"dtype": ..., "float_embeddings": bool}}, got {self.quantization!r}.'
            )
        if self.quantization["dtype"] not in QUANTIZATION_DTYPES:
            raise ValueError(
                f"quantization dtype must be one of {QUANTIZATION_DTYPES}, got {self.quantization['dtype']!r}."
            )

    def check_growth(self) -> None:
        """Raise `ValueError` naming the offending value unless every `expert_growth` phase can work."""
        for phase in self.expert_growth or ():
            if not isinstance(phase, dict) or set(phase) - GROWTH_OPTIONAL_KEYS != GROWTH_KEYS:
                raise ValueError(
                    f"each expert_growth phase must have exactly the keys {sorted(GROWTH_KEYS)} (and optionally "
                    f"{sorted(GROWTH_OPTIONAL_KEYS)}), got {phase!r}."
                )
            self._check_growth_modalities(phase)
            peer_only = GROWTH_PEER_KEY in phase and phase["num_experts"] == phase["num_experts_per_tok"] == 0
            if not peer_only and (
                phase["num_experts"] < 1 or not 1 <= phase["num_experts_per_tok"] <= phase["num_experts"]
            ):
                raise ValueError(
                    f"an expert_growth phase needs num_experts >= 1 and 1 <= num_experts_per_tok <= num_experts "
                    f"(both 0 when it adds only a PEER block), got {phase!r}."
                )
            if GROWTH_PEER_KEY in phase:
                self.check_peer(phase[GROWTH_PEER_KEY])
            for side in ("encoder", "decoder"):
                num_layers = getattr(self, f"{side}_layers")
                unknown = sorted(set(phase[f"{side}_layers"]) - set(range(num_layers)))
                if unknown:
                    raise ValueError(
                        f"an expert_growth phase names {side} layers {unknown}, but the {side} has layers "
                        f"0..{num_layers - 1}."
                    )
                self._check_growth_of_dense_layers(side, phase[f"{side}_layers"])

    @staticmethod
    def _check_growth_modalities(phase: dict) -> None:
        modalities = phase.get(GROWTH_MODALITIES_KEY)
        if modalities is None:
            return
        if not isinstance(modalities, list) or not modalities or set(modalities) - set(INPUT_MODALITIES):
            raise ValueError(
                f"an expert_growth phase's modalities must be a non-empty list drawn from {INPUT_MODALITIES}, "
                f"got {modalities!r}."
            )

    @property
    def modality_growth(self) -> bool:
        """Whether some growth phase serves only some input modalities."""
        return any(GROWTH_MODALITIES_KEY in phase for phase in self.expert_growth or ())

    def growth_modalities(self, phase: int) -> tuple[str, ...] | None:
        """The input modalities growth phase `phase` serves; None when it serves every input (or is not recorded:
        a block built on its own)."""
        phases = self.expert_growth or []
        modalities = phases[phase].get(GROWTH_MODALITIES_KEY) if phase < len(phases) else None
        return None if modalities is None else tuple(modalities)

    def _check_growth_of_dense_layers(self, side: str, grown: list[int]) -> None:
        # a dense layer that grows keeps its block as one full-width expert, which cannot be stacked with experts
        # 1 / expert_segments as wide
        sparse = getattr(self, f"{side}_sparse_layers")
        if sparse is None or self.expert_segments == 1:
            return
        dense = sorted(set(grown) - set(sparse))
        if dense:
            raise ValueError(
                f"an expert_growth phase names dense {side} layers {dense}, but with expert_segments="
                f"{self.expert_segments} only sparse layers can grow."
            )

    @staticmethod
    def check_peer(spec: dict) -> None:
        """Raise `ValueError` naming the offending value unless `spec` is a PEER block that can work (peer.py)."""
        if not isinstance(spec, dict) or set(spec) != PEER_KEYS:
            raise ValueError(f"a PEER block must have exactly the keys {sorted(PEER_KEYS)}, got {spec!r}.")
        if any(not isinstance(value, int) or value < 1 for value in spec.values()):
            raise ValueError(f"a PEER block's sizes must be positive integers, got {spec!r}.")
        if spec["num_experts_per_head"] > spec["num_keys"]:
            raise ValueError(
                f"a PEER block's num_experts_per_head={spec['num_experts_per_head']} is more than its "
                f"num_keys={spec['num_keys']}: each half of the query keeps that many sub-keys."
            )
        if spec["key_dim"] % 2:
            raise ValueError(f"a PEER block's key_dim must be even (two halves), got {spec['key_dim']}.")

    def is_sparse_layer(self, side: str, layer_idx: int) -> bool:
        """Whether layer `layer_idx` of `side` ("encoder" or "decoder") has a sparse feed-forward block, from the
        start or since a growth phase."""
        return bool(self.expert_groups(side, layer_idx))

    def sparse_layer_groups(self, side: str) -> list[list[tuple[int, int]]]:
        """`expert_groups` of each sparse layer of `side`, in layer order (the order of its router logits)."""
        groups = (self.expert_groups(side, idx) for idx in range(getattr(self, f"{side}_layers")))
        return [layer_groups for layer_groups in groups if layer_groups]

    def growth_phases(self, side: str, layer_idx: int) -> list[int]:
        """Index in `expert_growth` of each phase that grew experts in this layer, oldest first (one per grown
        group)."""
        phases = enumerate(self.expert_growth or ())
        return [index for index, phase in phases if layer_idx in phase[f"{side}_layers"] and phase["num_experts"]]

    def peer_phases(self, side: str, layer_idx: int) -> list[tuple[int, dict]]:
        """(index in `expert_growth`, "peer" entry) of each phase that gave this layer a PEER block, oldest first."""
        phases = enumerate(self.expert_growth or ())
        return [
            (index, phase[GROWTH_PEER_KEY])
            for index, phase in phases
            if layer_idx in phase[f"{side}_layers"] and GROWTH_PEER_KEY in phase
        ]

    def expert_groups(self, side: str, layer_idx: int) -> list[tuple[int, int]]:
        """(num_experts, num_experts_per_tok) of each expert group of a sparse layer, the base group first and then
        one per growth phase that grew it; [] for a dense layer. A layer that was dense before growing has the dense
        block as its base group's single expert."""
        grown = [
            (self.expert_growth[index]["num_experts"], self.expert_growth[index]["num_experts_per_tok"])
            for index in self.growth_phases(side, layer_idx)
        ]
        layers = getattr(self, f"{side}_sparse_layers")
        if layers is None or layer_idx in layers:
            return [(self.num_experts, self.num_experts_per_tok), *grown]
        return [(1, 1), *grown] if grown else []


__all__ = ["WhisperMoEConfig"]
