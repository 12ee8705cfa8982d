"""What the greedy caption decoder can reproduce: the generation settings and the models it gives ``generate``'s
tokens for.

The decoder (:mod:`.caption`) does what ``generate`` does under greedy settings (no sampling, one beam): its
repetition penalty over the prompt and the generated tokens, its minimum-length rules, the argmax, and the stop at an
end token or at ``max_new_tokens``. :func:`greedy_settings` refuses, with the reason, whatever else a generation
config asks for, and a model whose step the decoder cannot compute from its weights (plain ``torch.nn.Linear`` or kept
in float8 as :class:`.ops.FP8Linear`); the caller then uses ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import FP8Linear

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


# The linears whose products the step computes (:mod:`.caption_step`): plain, and kept in float8.
STEP_LINEARS = (torch.nn.Linear, FP8Linear)


class GreedyDecoderUnavailable(Exception):
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
    """The settings of ``generate(**inputs, generation_config=...)`` when the greedy decoder can reproduce its
    tokens; raises :class:`GreedyDecoderUnavailable` saying why not (the model, the input or a generation setting)."""
    check_model(model)
    input_ids = inputs.get("input_ids")
    if input_ids is None or input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise GreedyDecoderUnavailable("only one prompt at a time (input_ids of shape (1, length))")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise GreedyDecoderUnavailable("the attention mask hides tokens (padding)")

    config = generation_config
    for name, neutral in NEUTRAL_SETTINGS.items():
        value = getattr(config, name, None)
        if not any(value is n or (n is not None and value == n) for n in neutral):
            raise GreedyDecoderUnavailable(f"generation setting {name}={value!r}")
    if config.max_new_tokens is None or config.max_new_tokens < 1:
        raise GreedyDecoderUnavailable(f"max_new_tokens={config.max_new_tokens!r}; a positive count is needed")
    penalty = 1.0 if config.repetition_penalty is None else float(config.repetition_penalty)
    if not penalty > 0:
        raise GreedyDecoderUnavailable(f"repetition_penalty={config.repetition_penalty!r}")

    eos = config.eos_token_id
    eos_ids = () if eos is None else tuple(int(t) for t in ([eos] if isinstance(eos, int) else eos))
    prompt_length = input_ids.shape[1]
    # min_length counts the prompt; both rules only mask end tokens, so the larger one decides
    min_new = max(config.min_new_tokens or 0, (config.min_length or 0) - prompt_length) if eos_ids else 0
    return GreedySettings(int(config.max_new_tokens), max(min_new, 0), penalty, eos_ids)


def check_model(model) -> None:
    """Raises :class:`GreedyDecoderUnavailable` unless ``model`` is a Qwen2.5-VL whose decoding step the decoder
    computes from its weights (eval mode, on one device, no offloading hooks, every decoder-layer linear a
    ``torch.nn.Linear`` or an :class:`.ops.FP8Linear`, the head and the embedding plain, no other wrapped or quantised
    layer)."""
    if not any(c.__name__ == "Qwen2_5_VLForConditionalGeneration" for c in type(model).__mro__):
        raise GreedyDecoderUnavailable(
            f"the model is a {type(model).__name__}, not a Qwen2_5_VLForConditionalGeneration"
        )
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None or not hasattr(language_model, "layers") or not hasattr(model, "lm_head"):
        raise GreedyDecoderUnavailable("the model lacks model.language_model.layers or lm_head (another transformers?)")
    if type(model.lm_head) is not torch.nn.Linear:
        # a quantised head computes something else than its weight; a single file without one has a placeholder
        # that refuses in generate, naming the file
        raise GreedyDecoderUnavailable(
            f"the language-model head is a {type(model.lm_head).__name__}, not torch.nn.Linear"
        )
    embed = language_model.embed_tokens
    if type(embed) is not torch.nn.Embedding or embed.max_norm is not None:
        raise GreedyDecoderUnavailable(
            f"the token embedding is a {type(embed).__name__}, not a plain torch.nn.Embedding"
        )
    if model.training:
        raise GreedyDecoderUnavailable("the model is in training mode")
    text_config = language_model.config
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
    if getattr(text_config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        raise GreedyDecoderUnavailable("sliding-window attention")
    rope_type = getattr(language_model.rotary_emb, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        raise GreedyDecoderUnavailable(f"rotary embedding {rope_type!r} changes with the sequence length")
    if getattr(text_config, "hidden_act", "silu") != "silu":
        raise GreedyDecoderUnavailable(f"the MLP's activation is {text_config.hidden_act!r}, not silu")
    for index, layer in enumerate(language_model.layers):
        linears = layer_linears(layer)
        # a LoRA wrapper, another quantised linear or another norm would compute something else than the step does
        # with their weights (exact types: a subclass may compute otherwise)
        if any(type(linear) not in STEP_LINEARS for linear in linears):
            names = sorted({type(linear).__name__ for linear in linears if type(linear) not in STEP_LINEARS})
            raise GreedyDecoderUnavailable(
                f"layer {index} has a linear layer that is not torch.nn.Linear or FP8Linear ({', '.join(names)})"
            )
        with_bias = [linear.bias is not None for linear in linears]
        if with_bias != [True, True, True, False, False, False, False]:
            raise GreedyDecoderUnavailable(f"layer {index}'s linear layers have biases {with_bias}, not Qwen2's")
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if getattr(norm, "variance_epsilon", None) != text_config.rms_norm_eps:
                raise GreedyDecoderUnavailable(f"layer {index}'s norm is a {type(norm).__name__}, not Qwen2's RMSNorm")
    if getattr(language_model.norm, "variance_epsilon", None) != text_config.rms_norm_eps:
        raise GreedyDecoderUnavailable(f"the final norm is a {type(language_model.norm).__name__}, not Qwen2's RMSNorm")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise GreedyDecoderUnavailable(f"the weights are on {sorted(map(str, devices))}, not on one device")
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        raise GreedyDecoderUnavailable("the model has accelerate hooks (offloaded or dispatched weights)")


def mlp_linears(mlp) -> tuple:
    """A Qwen2 MLP's gate, up and down projections."""
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def layer_linears(layer) -> tuple:
    """A Qwen2 decoder layer's seven linears: the query, key, value and output projections, the MLP's gate, up and
    down projections."""
    attention = layer.self_attn
    return attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, *mlp_linears(layer.mlp)
