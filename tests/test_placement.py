"""Where the text encoder runs under a VRAM budget: on the GPU where its weights and activations fit (decided with
the real Qwen2.5-VL-7B's sizes), else on the CPU, said in the log and in the decomposition's report; and the handover
of GPU memory between it and the transformer's blocks (accounting, on the CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from layered_core.checkpoints.text_encoder import QwenVLShape, is_quantized_in_comfy_file
from layered_core.memory import GiB, tensor_bytes, text_encoder_visit_bytes
from layered_core.ops import FP8Linear
from layered_core.pipeline import DecomposeOptions, LayeredPipeline
from layered_core.text import PromptEncoder, text_encoder_tokens
from layered_core.tiny_models import tiny_text_encoder_set, tiny_tokenizer

from .test_offload import BLOCKS, CONFIG, RecordingBudget, models, picture

# The full VLD-MMDiT's non-block weights, which stay on the GPU while the text encoder visits (test_memory).
TRANSFORMER_OTHER_BYTES = 81_058_944
CAPTION_TOKENS = text_encoder_tokens(512, caption=True)


def qwen_vl_7b(fp8: bool) -> nn.Module:
    """Qwen2.5-VL-7B-Instruct on the meta device, shaped as the loader builds it from ComfyUI's single file; with
    ``fp8`` the linears that file stores in float8 are FP8Linear, as ``fp8="keep"`` loads them."""
    shape = QwenVLShape(152064, 3584, 18944, 28, 28, 4, 32, 1280, 3420, 16, 14, 2, 2, 112, (7, 15, 23, 31), True, "")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(shape.config(tiny_tokenizer()))
    finally:
        torch.set_default_dtype(default)
    if fp8:
        for name, linear in list(model.named_modules()):
            if type(linear) is nn.Linear and is_quantized_in_comfy_file(f"{name}.weight", linear.weight):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, FP8Linear.like(linear))
    return model


def test_the_real_captioner_visits_a_12_gib_budget_in_fp8_and_no_16_gib_one_in_bf16():
    bf16, fp8 = qwen_vl_7b(fp8=False), qwen_vl_7b(fp8=True)
    assert sum(p.numel() for p in bf16.parameters()) == 8_292_166_656
    assert tensor_bytes(bf16) / GiB == pytest.approx(15.45, abs=0.01)
    assert tensor_bytes(fp8) / GiB == pytest.approx(8.74, abs=0.01)  # token embedding and head stay bf16

    def needed(model, image_size=(640, 640), tokens=CAPTION_TOKENS) -> float:
        return text_encoder_visit_bytes(model, TRANSFORMER_OTHER_BYTES, tokens, image_size) / GiB

    # a 640 px caption: fp8 kept fits 12 GiB (not 8); bf16 needs more than 16 GiB (it fits 24)
    assert 11.0 < needed(fp8) < 12 and needed(bf16) == pytest.approx(17.6, abs=0.1)
    # other 640-bucket shapes take the same; a 1024 px caption's vision tower does not fit 12 GiB
    assert needed(fp8, (832, 480)) < 12 < needed(fp8, (1024, 1024)) < 16
    # the prompts alone (no caption) do not fit 8 GiB either
    assert needed(fp8, None, text_encoder_tokens(512)) > 8


class WatchedEncoder(PromptEncoder):
    """A tiny Qwen2.5-VL that notes, at each caption and encode, the transformer's block memory on the device and
    whether it is visiting the device; captions are 8 tokens."""

    budget = None

    def caption(self, image, language="en", max_new_tokens=8):
        self.seen.append(("caption", self.budget.streamer.device_bytes, id(self.model) in self.budget._visiting))
        return super().caption(image, language, max_new_tokens)

    def encode(self, prompts, max_sequence_length=512, truncate=False):
        self.seen.append(("encode", self.budget.streamer.device_bytes, id(self.model) in self.budget._visiting))
        return super().encode(prompts, max_sequence_length, truncate)


def watched_pipeline(spare: int):
    """The tiny models under a budget of what the visit of an 832x480 caption takes and ``spare`` bytes more (or
    less), the transformer's block memory noted at each forward."""
    transformer, vae, _ = models()
    model, tokenizer, image_processor = tiny_text_encoder_set(hidden_size=CONFIG.text_dim)
    text = WatchedEncoder(model, tokenizer, image_processor)
    text.seen = []
    other = tensor_bytes(transformer) - sum(tensor_bytes(block) for block in transformer.transformer_blocks)
    needed = text_encoder_visit_bytes(model, other, CAPTION_TOKENS, (832, 480))
    budget = RecordingBudget(transformer, vae, text, "cpu", budget=needed + spare)
    text.budget = budget
    held = []
    transformer.register_forward_pre_hook(lambda module, args: held.append(budget.streamer.device_bytes))
    return LayeredPipeline(transformer, vae, text, vram_budget=budget), text, budget, held


def test_the_captioner_visits_with_the_blocks_given_back_and_sampling_takes_them_again():
    pipeline, text, budget, held = watched_pipeline(spare=0)
    streamer = budget.streamer
    assert budget.text_encoder_fits(CAPTION_TOKENS, (832, 480))
    streamer.load(BLOCKS)  # the blocks on the device, as an earlier decomposition could have left them
    assert streamer.device_bytes == sum(streamer.block_bytes)
    result = pipeline(picture(), "", DecomposeOptions(layer_count=1, steps=2, seed=1))
    # caption and both prompts while the text encoder visits, with no block memory held
    assert text.seen == [("caption", 0, True), ("encode", 0, True), ("encode", 0, True)]
    (plan,) = budget.plans
    assert (plan.resident_blocks, plan.streamed_blocks) == (BLOCKS, 0)
    assert held == [sum(streamer.block_bytes)] * 4  # sampling took the blocks again: 2 steps of cond + uncond
    assert streamer.device_bytes == 0 and not streamer.loaded  # and gave them back after
    assert text._decoder is None  # the caption's cache went with the weights
    assert result.devices == dict.fromkeys(("encode image", "caption", "text", "sampling", "decode"), "cpu")
    assert list(result.seconds) == ["encode image", "caption", "text", "sampling", "decode"]


def test_a_captioner_that_does_not_fit_runs_on_the_cpu_and_says_so(caplog):
    pipeline, text, budget, _ = watched_pipeline(spare=-1)
    assert not budget.text_encoder_fits(CAPTION_TOKENS, (832, 480))
    assert budget.text_encoder_fits(text_encoder_tokens(16))  # short prompts alone would fit
    budget.streamer.load(2)
    with caplog.at_level(logging.INFO, logger="layered_core.placement"):
        caption = pipeline.caption(picture(832, 480))
    assert caption and text.seen == [("caption", budget.streamer.device_bytes, False)]  # no visit, blocks kept
    assert budget.streamer.device_bytes > 0
    (record,) = [r for r in caplog.records if "runs on the CPU" in r.getMessage()]
    assert record.levelno == logging.WARNING and "for a 832x480 caption" in record.getMessage()
    assert f"more than the {budget.budget / GiB:.2f} GiB VRAM budget" in record.getMessage()
