"""The arithmetic of one greedy decoding step of Qwen2.5-VL's language model, as pure functions of tensors.

Two ways through a step share these functions (:class:`.caption.GreedyDecoder` runs both):

- in pieces: :func:`attention_inputs` and :func:`layer_output` are a decoder layer before and after its attention,
  and :func:`attend` is the attention call transformers makes for a decoding step, over exactly the cached length
  (which the host passes in);
- whole: :func:`whole_step` is the step from the token to the next token, every shape fixed by the cache's
  capacity, so that it can be captured as one CUDA graph: :func:`decode_layer` attends over the cache up to the
  current position, which the attention reads on the device (:mod:`.decode_attention`). Its parts
  (:class:`StepParts`) are compiled one by one: one compilation of :func:`decode_layer` serves every layer.
  Where a layer's linears are all plain ``torch.nn.Linear``, its weights are :class:`FusedLayerWeights`: one
  matrix-vector product for the query, key and value, one for the MLP's gate and up projections
  (:mod:`.caption_fusion`).

A linear kept in float8 (:class:`.ops.FP8Linear`, as ComfyUI's fp8 text encoder loads with ``fp8="keep"``) enters the
step as an :class:`FP8Weight` in place of its weight tensor, and its product is :func:`.ops.fp8_linear`, the
arithmetic of FP8Linear's own forward, with the choice between the fp8 matmul and the dequantised weight made once,
as FP8Linear makes it for the step's input. Layers with such linears stay unfused in a whole step too: their parts
have scales of their own.

Both end in :func:`pick`: the repetition penalty, the minimum-length rule and the argmax of ``generate``, and the
bookkeeping of the new tokens, all on the device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import row_norm
from .caption_fusion import fuse_rows
from .caption_settings import GreedyDecoderUnavailable, layer_linears, mlp_linears
from .decode_attention import decode_attention
from .ops import FP8Linear, fp8_linear


class FP8Weight(NamedTuple):
    """An :class:`.ops.FP8Linear`'s weight as a step multiplies by it (:func:`product`): the float8 weight, its float32
    per-tensor scale, and the layer's choices for the step's input, fixed when the step's weights are taken (static
    flags: a compiled step traces one branch, and no token decides anything on the host)."""

    weight: torch.Tensor  # (out, in) float8
    scale: torch.Tensor  # () float32
    fp8_matmul: bool  # torch._scaled_mm on rows quantised to e4m3, else the weight dequantised
    fast_accum: bool

    @classmethod
    def of(cls, linear: FP8Linear, dtype: torch.dtype) -> FP8Weight:
        """``linear``'s weight for a step whose activations are in ``dtype`` on the weight's device, with the
        choice :meth:`.ops.FP8Linear.uses_fp8_matmul` makes for them (no autograd in a step)."""
        step_input = torch.empty(1, linear.in_features, dtype=dtype, device=linear.weight.device)
        try:
            fp8_matmul = linear.uses_fp8_matmul(step_input)
        except ValueError as e:  # compute="fp8" where it cannot run: generate refuses it as well, saying why
            raise GreedyDecoderUnavailable(str(e)) from e
        return cls(linear.weight, linear.weight_scale, fp8_matmul, linear.fast_accum)


Weight = torch.Tensor | FP8Weight
"""A linear's weight in a step: a plain (out, in) matrix, or an fp8 one with its scale."""


def weight_of(linear, dtype: torch.dtype) -> Weight:
    """What a step multiplies by for ``linear`` (a ``torch.nn.Linear`` or an :class:`.ops.FP8Linear`), whose input is
    in ``dtype``."""
    return FP8Weight.of(linear, dtype) if type(linear) is FP8Linear else linear.weight


def product(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` times a linear's weight, plus ``bias``: ``F.linear``, or :func:`.ops.fp8_linear` for an fp8 weight,
    the arithmetic of the layer's own forward either way."""
    if isinstance(weight, FP8Weight):
        return fp8_linear(x, weight.weight, weight.scale, bias, weight.fp8_matmul, weight.fast_accum)
    return F.linear(x, weight, bias)


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, what :func:`attention_inputs` and :func:`layer_output` compute with: each linear's
    weight plain or fp8 (:data:`Weight`), whichever the layer holds."""

    input_norm: torch.Tensor
    q_weight: Weight
    q_bias: torch.Tensor
    k_weight: Weight
    k_bias: torch.Tensor
    v_weight: Weight
    v_bias: torch.Tensor
    o_weight: Weight
    post_norm: torch.Tensor
    gate: Weight
    up: Weight
    down: Weight

    @classmethod
    def of(cls, layer, dtype: torch.dtype) -> LayerWeights:
        """The tensors of ``layer``, whose activations are in ``dtype`` (what its fp8 linears choose by)."""
        q, k, v, o, gate, up, down = (weight_of(linear, dtype) for linear in layer_linears(layer))
        attention = layer.self_attn
        return cls(
            layer.input_layernorm.weight,
            q,
            attention.q_proj.bias,
            k,
            attention.k_proj.bias,
            v,
            attention.v_proj.bias,
            o,
            layer.post_attention_layernorm.weight,
            gate,
            up,
            down,
        )


class FusedLayerWeights(NamedTuple):
    """One decoder layer's tensors with the query, key and value projections as one, and the MLP's gate and up
    projections as one: views of the storage the model's own Parameters are row ranges of. For layers whose linears
    are all plain ``torch.nn.Linear`` (:func:`fusable`)."""

    input_norm: torch.Tensor
    qkv_weight: torch.Tensor  # (heads * head_dim + 2 * kv_heads * head_dim, hidden): [q; k; v]
    qkv_bias: torch.Tensor
    o_weight: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # (2 * intermediate, hidden): [gate; up]
    down: torch.Tensor

    @classmethod
    def of(cls, layer) -> FusedLayerWeights:
        """The fused tensors of ``layer``, its Parameters moved onto them the first time (no second copy)."""
        attention = layer.self_attn
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        gate, up, down = mlp_linears(layer.mlp)
        return cls(
            layer.input_layernorm.weight,
            fuse_rows((q.weight, k.weight, v.weight)),
            fuse_rows((q.bias, k.bias, v.bias)),
            attention.o_proj.weight,
            layer.post_attention_layernorm.weight,
            fuse_rows((gate.weight, up.weight)),
            down.weight,
        )


class StepWeights(NamedTuple):
    """The language model's tensors that a step computes with."""

    embed: torch.Tensor  # (vocab, hidden)
    layers: tuple[LayerWeights | FusedLayerWeights, ...]
    norm: torch.Tensor  # the final RMSNorm's weight
    head: torch.Tensor  # (vocab, hidden)
    head_bias: torch.Tensor | None

    @classmethod
    def of(cls, model, fused: bool = False) -> StepWeights:
        """The tensors of a Qwen2_5_VLForConditionalGeneration (checked by :func:`.caption_settings.check_model`);
        with ``fused``, the fused projections (:class:`FusedLayerWeights`) of the layers that can have them
        (:func:`fusable`), the others' apart. Every layer's activations are in the embedding's dtype."""
        language_model = model.model.language_model
        embed = language_model.embed_tokens.weight

        def layer_weights(layer) -> LayerWeights | FusedLayerWeights:
            if fused and fusable(layer):
                return FusedLayerWeights.of(layer)
            return LayerWeights.of(layer, embed.dtype)

        return cls(
            embed,
            tuple(layer_weights(layer) for layer in language_model.layers),
            language_model.norm.weight,
            model.lm_head.weight,
            model.lm_head.bias,
        )


def fusable(layer) -> bool:
    """Whether a decoder layer's projections can be fused: all plain ``torch.nn.Linear`` (an fp8 one's scale is its
    own, so its rows cannot join another's)."""
    return all(type(linear) is torch.nn.Linear for linear in layer_linears(layer))


def captured_over(weights: StepWeights) -> tuple:
    """What a step captured as CUDA graphs over ``weights`` depends on: the address of each of their tensors and the
    static choices of the fp8 products; graphs captured over one value replay wrongly over another."""

    def flat(item):
        if isinstance(item, torch.Tensor):
            yield item.data_ptr()
        elif isinstance(item, tuple):
            for part in item:
                yield from flat(part)
        else:  # a missing bias, an fp8 product's flags
            yield item

    return tuple(flat(weights))


@dataclass(frozen=True)
class LayerShape:
    """What every decoder layer shares: head counts and size, the attention's scale, the norms' epsilon."""

    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float

    @classmethod
    def of(cls, model) -> LayerShape:
        language_model = model.model.language_model
        text_config = language_model.config
        attention = language_model.layers[0].self_attn
        return cls(
            text_config.num_attention_heads,
            text_config.num_key_value_heads,
            attention.head_dim,
            float(attention.scaling),
            float(text_config.rms_norm_eps),
        )


class Picks(NamedTuple):
    """The device state of the token choice: what :func:`pick` reads and writes."""

    token: torch.Tensor  # (1, 1) the last token picked: the one the next step feeds in
    count: torch.Tensor  # () new tokens so far: the index of the one the next pick makes
    min_new: torch.Tensor  # () end tokens are banned while count < min_new
    seen: torch.Tensor  # (1, vocab) bool: in the prompt or generated
    eos: torch.Tensor  # (vocab,) bool: the end tokens
    out: torch.Tensor  # (capacity,) the new tokens
    end: torch.Tensor  # () index of the first end token among the new ones, -1 while none was picked


class StepState(NamedTuple):
    """Every tensor a whole step reads or writes, at fixed addresses so that a captured graph replays over them."""

    keys: tuple[torch.Tensor, ...]  # per layer (1, kv_heads, capacity, head_dim), in the model's dtype
    values: tuple[torch.Tensor, ...]
    cos: torch.Tensor  # (capacity, head_dim) the rotary table of each cache slot, in the model's dtype
    sin: torch.Tensor
    slots: torch.Tensor  # (capacity,) 0, 1, 2, ...
    position: torch.Tensor  # (1,) the cache slot of the token fed in, which is also its index in the sequence
    picks: Picks


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
    weights: LayerWeights | FusedLayerWeights,
    shape: LayerShape,
    norm: Callable = rms_norm,
) -> torch.Tensor:
    """A decoder layer up to its attention, for one token (1, 1, hidden): the query (1, heads, 1, head_dim) returned,
    the rotated key and the value written into ``keys``/``values`` (1, kv_heads, capacity, head_dim, in the cache's
    dtype) at slot ``position``. The model's own eager arithmetic; a pure function of its tensors, so one
    compilation serves every layer. ``norm`` is :func:`rms_norm` or the same arithmetic in one kernel."""
    query_key, value = project_qkv(norm(hidden, weights.input_norm, shape.eps), weights, shape)
    # query and key heads rotated in one pass (elementwise: the same values as two)
    query_key = query_key.view(1, 1, shape.heads + shape.kv_heads, shape.head_dim).transpose(1, 2)
    rotated = rotate(query_key, *rope)
    value = value.view(1, 1, shape.kv_heads, shape.head_dim).transpose(1, 2)
    keys.index_copy_(2, position, rotated[:, shape.heads :].to(keys.dtype))
    values.index_copy_(2, position, value.to(values.dtype))
    return rotated[:, : shape.heads]


def project_qkv(
    x: torch.Tensor, weights: LayerWeights | FusedLayerWeights, shape: LayerShape
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key projections of normed (1, 1, hidden) side by side, (1, 1, (heads + kv_heads) * head_dim),
    and the value projection: one matrix-vector product with fused weights, three without."""
    if isinstance(weights, FusedLayerWeights):
        query_key = (shape.heads + shape.kv_heads) * shape.head_dim
        return F.linear(x, weights.qkv_weight, weights.qkv_bias).split(
            (query_key, shape.kv_heads * shape.head_dim), dim=-1
        )
    query = product(x, weights.q_weight, weights.q_bias)
    key = product(x, weights.k_weight, weights.k_bias)
    return torch.cat((query, key), dim=-1), product(x, weights.v_weight, weights.v_bias)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scaling: float) -> torch.Tensor:
    """One query token over the first ``length`` cached slots: the call transformers' SDPA attention makes for a
    decoding step (no mask, grouped key/value heads), so the kernel and its rounding are the same."""
    return F.scaled_dot_product_attention(
        query, keys[:, :, :length], values[:, :, :length], scale=scaling, enable_gqa=True
    )


def layer_output(
    hidden: torch.Tensor,
    attended: torch.Tensor,
    weights: LayerWeights | FusedLayerWeights,
    shape: LayerShape,
    norm: Callable = rms_norm,
) -> torch.Tensor:
    """A decoder layer from its attention's output (1, heads, 1, head_dim) on: output projection, residual, MLP,
    residual (the model's own eager arithmetic)."""
    hidden = hidden + product(attended.transpose(1, 2).reshape(1, 1, shape.heads * shape.head_dim), weights.o_weight)
    x = norm(hidden, weights.post_norm, shape.eps)
    if isinstance(weights, FusedLayerWeights):
        gate, up = F.linear(x, weights.gate_up).chunk(2, dim=-1)
    else:
        gate, up = product(x, weights.gate), product(x, weights.up)
    return hidden + product(F.silu(gate) * up, weights.down)


def head_scores(hidden: torch.Tensor, weights: StepWeights, eps: float, norm: Callable = rms_norm) -> torch.Tensor:
    """The final norm and the language-model head of the last token of (1, tokens, hidden): (1, vocab) float32."""
    return F.linear(norm(hidden, weights.norm, eps), weights.head, weights.head_bias)[:, -1].float()


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


def pick(scores: torch.Tensor, picks: Picks, penalty: float) -> None:
    """Choose the next token from (1, vocab) float32 scores and record it: in ``out``, among the seen tokens, as the
    token the next step feeds in, and as the end if it is the first end token. No host sync."""
    banned = picks.eos & (picks.count < picks.min_new)
    token = select_next(scores, picks.seen, banned, penalty)
    picks.out.index_copy_(0, picks.count.view(1), token)
    picks.seen.index_fill_(1, token, True)
    picks.token.copy_(token.view(1, 1))
    first_end = picks.eos.index_select(0, token).view(()) & (picks.end < 0)
    picks.end.copy_(torch.where(first_end, picks.count, picks.end))
    picks.count.add_(1)


class StepParts(NamedTuple):
    """The three functions a whole step runs, each a pure function of tensors (``GreedyDecoder`` compiles each once:
    the layer's compilation serves all the layers)."""

    inputs: Callable  # (state, weights) -> (hidden, rope): the embedding of the token fed in, its rotary tables
    layer: Callable  # (hidden, rope, position, keys, values, layer weights, shape) -> hidden
    finish: Callable  # (hidden, state, weights, shape, penalty) -> None: the next token picked, the position advanced


def step_inputs(state: StepState, weights: StepWeights) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The embedding (1, 1, hidden) of the token ``state.picks.token`` and the rotary tables of its slot."""
    position = state.position
    hidden = F.embedding(state.picks.token, weights.embed)
    return hidden, (state.cos.index_select(0, position).unsqueeze(0), state.sin.index_select(0, position).unsqueeze(0))


def decode_layer(
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    position: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: LayerWeights | FusedLayerWeights,
    shape: LayerShape,
    norm: Callable = rms_norm,
) -> torch.Tensor:
    """One decoder layer for the token at slot ``position``: its key and value written into the cache, the
    attention over the slots up to it (:func:`.decode_attention.decode_attention`), the layer's output."""
    query = attention_inputs(hidden, rope, position, keys, values, weights, shape, norm)
    attended = decode_attention(query, keys, values, position, shape.scaling)
    return layer_output(hidden, attended, weights, shape, norm)


def finish_step(
    hidden: torch.Tensor,
    state: StepState,
    weights: StepWeights,
    shape: LayerShape,
    penalty: float,
    norm: Callable = rms_norm,
) -> None:
    """The next token picked from the last hidden state, the position advanced."""
    pick(head_scores(hidden, weights, shape.eps, norm), state.picks, penalty)
    state.position.add_(1)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm` of one token in one kernel (:mod:`.row_norm`) where it can run, else :func:`rms_norm`."""
    if row_norm.kernel_problem(x, weight) is None:
        return torch.ops.qwen_layered.row_rms_norm(x, weight, float(eps))
    return rms_norm(x, weight, eps)


# What GreedyDecoder compiles: inductor fuses the norms with their neighbours itself.
PLAIN_PARTS = StepParts(step_inputs, decode_layer, finish_step)
# The uncompiled step: its norms one kernel each where they can be.
EAGER_PARTS = StepParts(
    step_inputs,
    functools.partial(decode_layer, norm=fused_rms_norm),
    functools.partial(finish_step, norm=fused_rms_norm),
)


def decode_hidden(
    state: StepState, weights: StepWeights, shape: LayerShape, parts: StepParts = EAGER_PARTS
) -> torch.Tensor:
    """The last hidden state (1, 1, hidden) of the token ``state.picks.token`` at slot ``state.position``, its keys
    and values written into the cache: the embedding and every decoder layer, each attending over the whole cache
    up to the position."""
    hidden, rope = parts.inputs(state, weights)
    for index, layer in enumerate(weights.layers):
        hidden = parts.layer(hidden, rope, state.position, state.keys[index], state.values[index], layer, shape)
    return hidden


def whole_step(
    state: StepState, weights: StepWeights, shape: LayerShape, penalty: float, parts: StepParts = EAGER_PARTS
) -> None:
    """One decoding step from the token fed in to the next one picked, the position advanced: fixed shapes, no host
    sync and no data-dependent Python, so that it is captured as one CUDA graph."""
    parts.finish(decode_hidden(state, weights, shape, parts), state, weights, shape, penalty)
