"""Greedy decoding for the auto-caption: the tokens of transformers' ``generate``, without its per-token overhead.

``generate`` spends most of a caption outside the GPU's arithmetic: each token it grows the key/value cache by
concatenation, rebuilds masks and positions, and runs its logits processors as separate host-driven steps. Here the
prompt goes once through the model's own forward (vision tower, 3D rotary positions, the first logits and the
prompt's keys and values). Each later token is one step over a preallocated key/value cache, computed from the
model's weights with the arithmetic of its own eager layers, with the repetition penalty, the minimum-length rule and
the argmax on the device. On CUDA the pieces of a step between two attentions are captured once as CUDA graphs and
replayed; each attention runs between them as the very call transformers makes (over exactly the cached length, which
the host knows without asking the GPU), so the tokens are generate's in bf16 too, not only in float32. The host reads
the tokens back every few steps to find the end token and drops the steps run past it. On the CPU the same pieces
run eagerly: the parity tests run them there.

The step does what ``generate`` does under greedy settings (no sampling, one beam): its repetition penalty over the
prompt and the generated tokens, its minimum-length rules, the argmax, and the stop at an end token or at
``max_new_tokens``. :func:`greedy_settings` refuses, with the reason, whatever else a generation config asks for,
and a model this decoder does not know; the caller then uses ``generate``.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

# The decoding attentions on CUDA: every step has a new cached length, and cuDNN's attention builds a plan for each
# new shape, which made a process's first caption several times slower than the later ones
# (benchmarks/RESULTS.md); the flash and memory-efficient kernels need no plan.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ALL_ATTENTION = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]

# Generation settings that add a logits processor, a stopping rule or another search to generate(), each with the
# values under which it does nothing. A config holding anything else goes through generate().
NEUTRAL_SETTINGS = {
    "do_sample": (None, False),
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "num_return_sequences": (None, 1),
    "penalty_alpha": (None,),
    "diversity_penalty": (None, 0.0),
    "guidance_scale": (None, 1.0),
    "sequence_bias": (None,),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "renormalize_logits": (None, False),
    "watermarking_config": (None,),
    "max_time": (None,),
    "stop_strings": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "dola_layers": (None,),
    "token_healing": (None, False),
}

# Cache lengths are rounded up to this, so captions of images with other aspect ratios reuse the captured graphs.
CACHE_GRANULE = 256
# How many tokens run between two looks for the end token: each look waits for the GPU once.
DEFAULT_CHECK_EVERY = 16


class FastPathUnavailable(Exception):
    """The greedy decoder cannot give generate()'s tokens for this model, input or config; says why."""


@dataclass(frozen=True)
class GreedySettings:
    """What greedy decoding needs from a generation config, for one prompt."""

    max_new_tokens: int
    # end tokens are masked out until this many new tokens exist (generate's min_new_tokens and min_length)
    min_new_tokens: int
    repetition_penalty: float
    eos_token_ids: tuple[int, ...]


def greedy_settings(model, generation_config, inputs: dict[str, torch.Tensor]) -> GreedySettings:
    """The settings of ``generate(**inputs, generation_config=...)`` when :class:`GreedyDecoder` can reproduce its
    tokens; raises :class:`FastPathUnavailable` saying why not (the model, the input or a generation setting)."""
    _check_model(model)
    input_ids = inputs.get("input_ids")
    if input_ids is None or input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise FastPathUnavailable("only one prompt at a time (input_ids of shape (1, length))")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise FastPathUnavailable("the attention mask hides tokens (padding)")

    config = generation_config
    for name, neutral in NEUTRAL_SETTINGS.items():
        value = getattr(config, name, None)
        if not any(value is n or (n is not None and value == n) for n in neutral):
            raise FastPathUnavailable(f"generation setting {name}={value!r}")
    if config.max_new_tokens is None or config.max_new_tokens < 1:
        raise FastPathUnavailable(f"max_new_tokens={config.max_new_tokens!r}; a positive count is needed")
    penalty = 1.0 if config.repetition_penalty is None else float(config.repetition_penalty)
    if not penalty > 0:
        raise FastPathUnavailable(f"repetition_penalty={config.repetition_penalty!r}")

    eos = config.eos_token_id
    eos_ids = () if eos is None else tuple(int(t) for t in ([eos] if isinstance(eos, int) else eos))
    prompt_length = input_ids.shape[1]
    # min_length counts the prompt; both rules only mask end tokens, so the larger one decides
    min_new = max(config.min_new_tokens or 0, (config.min_length or 0) - prompt_length) if eos_ids else 0
    return GreedySettings(int(config.max_new_tokens), max(min_new, 0), penalty, eos_ids)


def _check_model(model) -> None:
    if not any(c.__name__ == "Qwen2_5_VLForConditionalGeneration" for c in type(model).__mro__):
        raise FastPathUnavailable(f"the model is a {type(model).__name__}, not a Qwen2_5_VLForConditionalGeneration")
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None or not hasattr(language_model, "layers") or not hasattr(model, "lm_head"):
        raise FastPathUnavailable("the model lacks model.language_model.layers or lm_head (another transformers?)")
    if type(model.lm_head) is not torch.nn.Linear:
        # a quantised head computes something else than its weight; a single file without one has a placeholder
        # that refuses in generate, naming the file
        raise FastPathUnavailable(f"the language-model head is a {type(model.lm_head).__name__}, not torch.nn.Linear")
    if model.training:
        raise FastPathUnavailable("the model is in training mode")
    text_config = language_model.config
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
    if getattr(text_config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        raise FastPathUnavailable("sliding-window attention")
    rope_type = getattr(language_model.rotary_emb, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        raise FastPathUnavailable(f"rotary embedding {rope_type!r} changes with the sequence length")
    if getattr(text_config, "hidden_act", "silu") != "silu":
        raise FastPathUnavailable(f"the MLP's activation is {text_config.hidden_act!r}, not silu")
    for index, layer in enumerate(language_model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, *_mlp_linears(mlp))
        # a LoRA wrapper, a quantised linear or another norm would compute something else than their weights here
        if any(type(linear) is not torch.nn.Linear for linear in linears):
            raise FastPathUnavailable(f"layer {index} has a linear layer that is not torch.nn.Linear")
        with_bias = [linear.bias is not None for linear in linears]
        if with_bias != [True, True, True, False, False, False, False]:
            raise FastPathUnavailable(f"layer {index}'s linear layers have biases {with_bias}, not Qwen2's")
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if getattr(norm, "variance_epsilon", None) != text_config.rms_norm_eps:
                raise FastPathUnavailable(f"layer {index}'s norm is a {type(norm).__name__}, not Qwen2's RMSNorm")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise FastPathUnavailable(f"the weights are on {sorted(map(str, devices))}, not on one device")
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        raise FastPathUnavailable("the model has accelerate hooks (offloaded or dispatched weights)")


def _mlp_linears(mlp) -> tuple:
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


# --------------------------------------------------------------------------- the pieces of one step


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, what :func:`attention_inputs` and :func:`layer_output` compute with."""

    input_norm: torch.Tensor
    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    v_weight: torch.Tensor
    v_bias: torch.Tensor
    o_weight: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def of(cls, layer) -> LayerWeights:
        attention = layer.self_attn
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        gate, up, down = _mlp_linears(layer.mlp)
        return cls(
            layer.input_layernorm.weight,
            q.weight,
            q.bias,
            k.weight,
            k.bias,
            v.weight,
            v.bias,
            attention.o_proj.weight,
            layer.post_attention_layernorm.weight,
            gate.weight,
            up.weight,
            down.weight,
        )


@dataclass(frozen=True)
class LayerShape:
    """What every decoder layer shares: head counts and size, the attention's scale, the norms' epsilon."""

    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm: normalised in float32, back in x's dtype, times the weight (transformers' arithmetic, in its
    order, so the eager result is bit for bit the model's own)."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (batch, heads, tokens, head_dim) with (batch, tokens, head_dim) tables, halves rotated
    (the arithmetic, in the order, of Qwen2.5-VL's text attention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def attention_inputs(
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    position: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: LayerWeights,
    shape: LayerShape,
) -> torch.Tensor:
    """A decoder layer up to its attention, for one token (1, 1, hidden): the query (1, heads, 1, head_dim) returned,
    the rotated key and the value written into ``keys``/``values`` (1, kv_heads, capacity, head_dim) at slot
    ``position``. The model's own eager arithmetic; a pure function of its tensors, so one compilation serves every
    layer."""
    x = rms_norm(hidden, weights.input_norm, shape.eps)
    query = F.linear(x, weights.q_weight, weights.q_bias).view(1, 1, shape.heads, shape.head_dim).transpose(1, 2)
    key = F.linear(x, weights.k_weight, weights.k_bias).view(1, 1, shape.kv_heads, shape.head_dim).transpose(1, 2)
    value = F.linear(x, weights.v_weight, weights.v_bias).view(1, 1, shape.kv_heads, shape.head_dim).transpose(1, 2)
    # query and key heads rotated in one pass (elementwise: the same values as two)
    rotated = rotate(torch.cat((query, key), dim=1), *rope)
    keys.index_copy_(2, position, rotated[:, shape.heads :])
    values.index_copy_(2, position, value)
    return rotated[:, : shape.heads]


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scaling: float) -> torch.Tensor:
    """One query token over the first ``length`` cached slots: the call transformers' SDPA attention makes for a
    decoding step (no mask, grouped key/value heads), so the kernel and its rounding are the same."""
    return F.scaled_dot_product_attention(
        query, keys[:, :, :length], values[:, :, :length], scale=scaling, enable_gqa=True
    )


def layer_output(
    hidden: torch.Tensor, attended: torch.Tensor, weights: LayerWeights, shape: LayerShape
) -> torch.Tensor:
    """A decoder layer from its attention's output (1, heads, 1, head_dim) on: output projection, residual, MLP,
    residual (the model's own eager arithmetic)."""
    hidden = hidden + F.linear(attended.transpose(1, 2).reshape(1, 1, shape.heads * shape.head_dim), weights.o_weight)
    x = rms_norm(hidden, weights.post_norm, shape.eps)
    return hidden + F.linear(F.silu(F.linear(x, weights.gate)) * F.linear(x, weights.up), weights.down)


def penalize(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty on float32 scores: a seen token's positive score divided by ``penalty``, a negative one
    multiplied. The same arithmetic as transformers' RepetitionPenaltyLogitsProcessor, with the seen tokens as a mask
    instead of a token list. ``penalty`` stays a Python float, as there: CUDA divides by a host scalar through its
    reciprocal, which can round differently from a division by a device tensor."""
    if penalty == 1.0:
        return scores
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def select_next(scores: torch.Tensor, seen: torch.Tensor, banned: torch.Tensor, penalty: float) -> torch.Tensor:
    """The greedy token of (1, vocab) float32 scores: penalised, ``banned`` tokens (the end tokens before the
    minimum length) at -inf, then the first argmax, as generate picks it."""
    scores = penalize(scores, seen, penalty).masked_fill(banned, -math.inf)
    return scores.argmax(dim=-1)


@dataclass
@dataclass
class _Buffers:
    """The decoder's device state: the key/value cache and every tensor a step reads or writes, at fixed
    addresses so captured graphs can replay over them."""

    keys: list[torch.Tensor]  # per layer (1, kv_heads, capacity, head_dim)
    values: list[torch.Tensor]
    token: torch.Tensor  # (1, 1) the token a step feeds in
    position: torch.Tensor  # (1,) its cache slot, which is also its index in the sequence
    rope_delta: torch.Tensor  # (1,) rotary position minus sequence index for text after the image (mrope)
    count: torch.Tensor  # () new tokens so far: the index of the one a step picks
    min_new: torch.Tensor  # () end tokens are banned while count < min_new
    seen: torch.Tensor  # (1, vocab) bool: in the prompt or generated
    eos: torch.Tensor  # (vocab,) bool
    out: torch.Tensor  # (capacity,) the new tokens
    # what passes between the pieces of a step
    hidden: torch.Tensor  # (1, 1, hidden)
    cos: torch.Tensor  # (1, 1, head_dim) the rotary tables of this step's position
    sin: torch.Tensor
    query: torch.Tensor  # (1, heads, 1, head_dim)
    attended: torch.Tensor  # (1, heads, 1, head_dim)
    penalty: float
    graphs: list[torch.cuda.CUDAGraph] | None = None  # the pieces of a step, captured
    weights: tuple[int, ...] = ()  # data pointers the graphs were captured over

    @property
    def capacity(self) -> int:
        return self.out.shape[0]


class GreedyDecoder:
    """Greedy decoding of a Qwen2.5-VL model with generate()'s tokens (see the module's docstring).

    A step runs in pieces: before the first layer's attention, between two layers' attentions, after the last
    one. On CUDA each piece is captured as a CUDA graph; the attentions run eagerly between them, over exactly the
    cached length (which the host knows without asking the GPU), so that each is the very call transformers makes
    and rounds as it does. Keeps its cache and graphs between calls while they fit and the weights stay where they
    were; a longer request, another penalty or moved weights build them again. ``compile_step`` runs the pieces
    of the layers through torch.compile, which fuses their elementwise work into fewer kernels after a compilation
    on the first call; its rounding is not the eager layers', so its tokens can part from generate's in low
    precision.
    """

    def __init__(
        self, model, check_every: int = DEFAULT_CHECK_EVERY, cuda_graph: bool = True, compile_step: bool = False
    ):
        _check_model(model)
        self.model = model
        language_model = model.model.language_model
        self._embed = language_model.embed_tokens
        self._layers = list(language_model.layers)
        self._norm = language_model.norm
        self._rotary = language_model.rotary_emb
        self._head = model.lm_head
        text_config = language_model.config
        attention = self._layers[0].self_attn
        self._shape = LayerShape(
            text_config.num_attention_heads,
            text_config.num_key_value_heads,
            attention.head_dim,
            float(attention.scaling),
            float(text_config.rms_norm_eps),
        )
        self._vocab = self._head.out_features
        self.check_every = check_every
        self.cuda_graph = cuda_graph
        # Compiled as pure functions of a layer's tensors: one compilation serves all layers. fullgraph: a break
        # would put host code inside a piece, which a CUDA graph cannot hold.
        compiled = torch.compile(dynamic=False, fullgraph=True) if compile_step else (lambda fn: fn)
        self._attention_inputs = compiled(attention_inputs)
        self._layer_output = compiled(layer_output)
        self._weights: list[LayerWeights] = []
        self._buffers: _Buffers | None = None
        forward = inspect.signature(model.forward).parameters
        self._prefill_kwargs = {"use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in forward else {})}

    @torch.inference_mode()
    def generate(
        self, inputs: dict[str, torch.Tensor], settings: GreedySettings, seconds: dict[str, float] | None = None
    ) -> torch.Tensor:
        """The new tokens (1-D, on the CPU) that ``generate(**inputs)`` returns after the prompt: up to
        ``settings.max_new_tokens``, through the first end token. With ``seconds``, waits for the GPU after each
        phase and records "capture" (cache and graphs, 0 when reused), "prefill" (vision tower and prompt) and
        "decode" (the tokens after the first)."""
        device = self._head.weight.device
        prompt_length = inputs["input_ids"].shape[1]
        clock = _Clock(device, seconds)
        buffers = self._buffers_for(prompt_length + settings.max_new_tokens, settings.repetition_penalty, device)
        clock.lap("capture")
        self._prefill(inputs, settings, buffers)
        clock.lap("prefill")

        eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=device)
        produced, end = 1, self._first_end(buffers, eos, 0, 1)
        while end is None and produced < settings.max_new_tokens:
            steps = min(self.check_every, settings.max_new_tokens - produced)
            for step in range(produced, produced + steps):
                # the token picked at step - 1 sits at slot prompt_length + step - 1: attention reads one more
                self._step(buffers, prompt_length + step)
            end = self._first_end(buffers, eos, produced, produced + steps)
            produced += steps
        tokens = buffers.out[: produced if end is None else end + 1].cpu()
        clock.lap("decode")
        return tokens

    @staticmethod
    def _first_end(buffers: _Buffers, eos: torch.Tensor, start: int, stop: int) -> int | None:
        """Index of the first end token among the new tokens start..stop-1, or None (waits for the GPU)."""
        if eos.numel() == 0:
            return None
        hits = torch.isin(buffers.out[start:stop], eos).nonzero()
        return start + int(hits[0, 0]) if hits.numel() else None

    # -- the prompt ---------------------------------------------------------------------------------------

    def _prefill(self, inputs: dict[str, torch.Tensor], settings: GreedySettings, buffers: _Buffers) -> None:
        """The prompt through the model's own forward; its keys and values into the cache; the first token."""
        # forward() sets the rotary offset of the text after the image from this prompt's image grid; cleared
        # first so that a prompt without an image is not given the previous caption's offset
        self.model.model.rope_deltas = None
        output = self.model(**inputs, **self._prefill_kwargs)
        # transformers 5.24 names it cache, earlier versions past_key_values
        cache = getattr(output, "cache", None)
        cache = getattr(output, "past_key_values", None) if cache is None else cache
        if cache is None or not hasattr(cache, "layers") or len(cache.layers) != len(self._layers):
            raise FastPathUnavailable(f"the model's forward returned no per-layer key/value cache ({type(cache)})")
        prompt_length = inputs["input_ids"].shape[1]
        for layer, keys, values in zip(cache.layers, buffers.keys, buffers.values, strict=True):
            keys[:, :, :prompt_length].copy_(layer.keys)
            values[:, :, :prompt_length].copy_(layer.values)
        delta = self.model.model.rope_deltas
        if delta is None:
            buffers.rope_delta.zero_()
        else:
            buffers.rope_delta.copy_(delta.reshape(1))
        buffers.position.fill_(prompt_length)
        buffers.count.zero_()
        buffers.min_new.fill_(settings.min_new_tokens)
        prompt_ids = inputs["input_ids"][0].to(buffers.seen.device)
        # ids past the head's vocabulary cannot be generated, so transformers leaves them out of the penalty too
        buffers.seen.zero_().index_fill_(1, prompt_ids[prompt_ids < self._vocab], True)
        buffers.eos.zero_()
        if settings.eos_token_ids:
            buffers.eos[list(settings.eos_token_ids)] = True
        self._pick(output.logits[:, -1].float(), buffers)

    # -- one token ----------------------------------------------------------------------------------------

    def _pick(self, scores: torch.Tensor, buffers: _Buffers) -> None:
        """Choose the next token from float32 scores and record it where the next step reads it."""
        banned = buffers.eos & (buffers.count < buffers.min_new)
        token = select_next(scores, buffers.seen, banned, buffers.penalty)
        buffers.out.index_copy_(0, buffers.count.view(1), token)
        buffers.seen.index_fill_(1, token, True)
        buffers.token.copy_(token.view(1, 1))
        buffers.count.add_(1)

    def _step(self, buffers: _Buffers, length: int) -> None:
        """Feed ``buffers.token`` at slot ``buffers.position`` (``length - 1``), pick the next token, advance."""
        backends = DECODE_ATTENTION if buffers.query.is_cuda else ALL_ATTENTION
        with sdpa_kernel(backends):
            self._layers_step(buffers, length)

    def _layers_step(self, buffers: _Buffers, length: int) -> None:
        pieces = buffers.graphs
        for index in range(len(self._layers) + 1):
            if index:
                attended = attend(
                    buffers.query, buffers.keys[index - 1], buffers.values[index - 1], length, self._shape.scaling
                )
                buffers.attended.copy_(attended)
            if pieces is None:
                self._piece(index, buffers)
            else:
                pieces[index].replay()

    def _piece(self, index: int, buffers: _Buffers) -> None:
        """Piece ``index`` of a step, between two attentions (no host sync: this is what a CUDA graph holds).

        Piece 0 embeds the token and makes the rotary tables; piece i finishes layer i - 1 from its attention's
        output; every piece but the last goes on to the next layer's query, the last to the next token."""
        if index == 0:
            hidden = self._embed(buffers.token)
            # text after the prompt has one rotary position on all three mrope axes
            cos, sin = self._rotary(hidden, (buffers.position + buffers.rope_delta).view(1, 1, 1).expand(3, 1, 1))
            buffers.cos.copy_(cos)
            buffers.sin.copy_(sin)
        else:
            hidden = self._layer_output(buffers.hidden, buffers.attended, self._weights[index - 1], self._shape)
        if index < len(self._layers):
            buffers.hidden.copy_(hidden)
            query = self._attention_inputs(
                hidden,
                (buffers.cos, buffers.sin),
                buffers.position,
                buffers.keys[index],
                buffers.values[index],
                self._weights[index],
                self._shape,
            )
            buffers.query.copy_(query)
        else:
            self._pick(self._head(self._norm(hidden))[:, -1].float(), buffers)
            buffers.position.add_(1)

    # -- the cache and the graphs -------------------------------------------------------------------------

    def _buffers_for(self, length: int, penalty: float, device: torch.device) -> _Buffers:
        """Buffers for ``length`` tokens (prompt and new), reused when they still fit; the pieces captured on
        CUDA."""
        # taken again each call: moving the model (between devices, to another dtype) can give it new tensors
        self._weights = [LayerWeights.of(layer) for layer in self._layers]
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        buffers = self._buffers
        reusable = (
            buffers is not None
            and buffers.capacity >= length
            and buffers.penalty == penalty
            and buffers.weights == weights
            and buffers.out.device == device
        )
        if reusable:
            return buffers
        self._buffers = None  # the old cache and graphs go before the new ones are allocated
        buffers = self._allocate(math.ceil(length / CACHE_GRANULE) * CACHE_GRANULE, penalty, device)
        buffers.weights = weights
        if device.type == "cuda" and self.cuda_graph:
            buffers.graphs = self._capture(buffers)
        self._buffers = buffers
        return buffers

    def _allocate(self, capacity: int, penalty: float, device: torch.device) -> _Buffers:
        dtype = self._head.weight.dtype
        shape = self._shape
        cache = (1, shape.kv_heads, capacity, shape.head_dim)

        def zeros(*size, dtype=dtype):
            return torch.zeros(size, dtype=dtype, device=device)

        # zeros, not empty: nothing a step reads may be uninitialised memory (NaN patterns) before the prefill
        return _Buffers(
            keys=[zeros(*cache) for _ in self._layers],
            values=[zeros(*cache) for _ in self._layers],
            token=zeros(1, 1, dtype=torch.long),
            position=zeros(1, dtype=torch.long),
            rope_delta=zeros(1, dtype=torch.long),
            count=zeros(dtype=torch.long),
            min_new=zeros(dtype=torch.long),
            seen=zeros(1, self._vocab, dtype=torch.bool),
            eos=zeros(self._vocab, dtype=torch.bool),
            out=zeros(capacity, dtype=torch.long),
            hidden=zeros(1, 1, self._head.in_features),
            cos=zeros(1, 1, shape.head_dim),
            sin=zeros(1, 1, shape.head_dim),
            query=zeros(1, shape.heads, 1, shape.head_dim),
            attended=zeros(1, shape.heads, 1, shape.head_dim),
            penalty=penalty,
        )

    def _capture(self, buffers: _Buffers) -> list[torch.cuda.CUDAGraph] | None:
        """The pieces of a step as CUDA graphs over ``buffers`` (one memory pool); None (they then run eagerly)
        where capture fails.

        The warm-up steps leave values in the buffers; the prefill overwrites every one that a later step reads."""
        device = buffers.out.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream):
                for step in range(2):  # compilation, kernel selection and library handles happen before the capture
                    self._step(buffers, step + 1)
            torch.cuda.current_stream(device).wait_stream(stream)
            pool = torch.cuda.graph_pool_handle()
            graphs = []
            for index in range(len(self._layers) + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(index, buffers)
                graphs.append(graph)
        except RuntimeError as e:
            logger.warning("caption: the decoding step could not be captured as CUDA graphs (%s); running eagerly", e)
            torch.cuda.synchronize(device)
            return None
        return graphs


class _Clock:
    """Seconds per phase into ``seconds``, waiting for the device at each lap; does nothing without ``seconds``."""

    def __init__(self, device: torch.device, seconds: dict[str, float] | None):
        self.device, self.seconds = device, seconds
        self.start = self._now()

    def _now(self) -> float:
        if self.seconds is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.seconds is not None:
            now = self._now()
            self.seconds[name] = now - self.start
            self.start = now
