"""ComfyUI's single-file text encoder (qwen_2.5_vl_7b_fp8_scaled.safetensors) against transformers' Qwen2.5-VL on
the same weights: a tiny random model written in that layout (bf16, fp8-scaled, with and without the head)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from layered_core.checkpoints import CheckpointError, open_checkpoint, save_vae
from layered_core.checkpoints.files import TensorSource, save_safetensors
from layered_core.checkpoints.quantized import quantized_layers
from layered_core.checkpoints.text_encoder import (
    COMFY_FILE,
    COMFY_TOKENIZER,
    NO_HEAD,
    check_text_encoder_file,
    find_tokenizer,
    infer_shape,
    parameters_on_meta,
    save_text_encoder_file,
    settings_metadata,
    transformers_name,
)
from layered_core.ops import FP8Linear
from layered_core.text import PromptEncoder, find_text_encoder, load_text_encoder
from layered_core.tiny_models import tiny_text_encoder_set, tiny_vae, write_text_encoder_set

SHORT = "a red cat"
LONGER = "a red cat sitting on a blue sofa in front of a white wall with a poster that says 'hello world'"
COMFYUI = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI"))
COMFYUI_PYTHON = COMFYUI / ".venv" / "bin" / "python"

# The variants a ComfyUI user may hold, by file name: (fp8, with the head, dtype of the unquantised tensors).
VARIANTS = {
    "fp32.safetensors": (False, True, torch.float32),
    "bf16.safetensors": (False, True, torch.bfloat16),
    "fp8_scaled.safetensors": (True, True, torch.bfloat16),
    "fp8_scaled_headless.safetensors": (True, False, torch.bfloat16),
}


def released_layout() -> dict[str, tuple[list[int], torch.dtype]]:
    """The tensor table of the released qwen_2.5_vl_7b_fp8_scaled.safetensors: 1446 tensors, every linear of both
    towers in fp8 with a scalar scale_weight and scale_input, the rest in bf16, lm_head included."""
    fp8, bf16, f32 = torch.float8_e4m3fn, torch.bfloat16, torch.float32
    table: dict[str, tuple[list[int], torch.dtype]] = {}

    def linear(name, out_features, in_features, bias=True):
        table[f"{name}.weight"] = ([out_features, in_features], fp8)
        table[f"{name}.scale_weight"] = ([], f32)
        table[f"{name}.scale_input"] = ([], f32)
        if bias:
            table[f"{name}.bias"] = ([out_features], bf16)

    for i in range(28):
        layer = f"model.layers.{i}"
        linear(f"{layer}.self_attn.q_proj", 3584, 3584)
        linear(f"{layer}.self_attn.k_proj", 512, 3584)
        linear(f"{layer}.self_attn.v_proj", 512, 3584)
        linear(f"{layer}.self_attn.o_proj", 3584, 3584, bias=False)
        for projection in ("gate_proj", "up_proj"):
            linear(f"{layer}.mlp.{projection}", 18944, 3584, bias=False)
        linear(f"{layer}.mlp.down_proj", 3584, 18944, bias=False)
        table[f"{layer}.input_layernorm.weight"] = ([3584], bf16)
        table[f"{layer}.post_attention_layernorm.weight"] = ([3584], bf16)
    for i in range(32):
        block = f"visual.blocks.{i}"
        linear(f"{block}.attn.qkv", 3840, 1280)
        linear(f"{block}.attn.proj", 1280, 1280)
        linear(f"{block}.mlp.gate_proj", 3420, 1280)
        linear(f"{block}.mlp.up_proj", 3420, 1280)
        linear(f"{block}.mlp.down_proj", 1280, 3420)
        table[f"{block}.norm1.weight"] = ([1280], bf16)
        table[f"{block}.norm2.weight"] = ([1280], bf16)
    table["visual.merger.ln_q.weight"] = ([1280], bf16)
    linear("visual.merger.mlp.0", 5120, 5120)
    linear("visual.merger.mlp.2", 3584, 5120)
    table["visual.patch_embed.proj.weight"] = ([1280, 3, 2, 14, 14], bf16)
    table["model.embed_tokens.weight"] = ([152064, 3584], bf16)
    table["model.norm.weight"] = ([3584], bf16)
    table["lm_head.weight"] = ([152064, 3584], bf16)
    table["scaled_fp8"] = ([0], fp8)
    return table


def metadata(model) -> dict[str, str]:
    """What the tiny files carry for the settings no shape gives (head widths, full-attention blocks)."""
    return settings_metadata(model.config)


def pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


class QwenIds:
    """Stands in for the real Qwen2.5-VL tokenizer: the special tokens at their real ids."""

    IDS = {
        "<|endoftext|>": 151643,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    }

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [self.IDS[text]]})()


def comfy_key(name: str) -> str:
    """The single-file name of a transformers name, spelled out here rather than taken from the package."""
    return name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)


def reference_model(model, path: Path):
    """transformers' model holding the weights ``path`` stores, widened to float32: fp8 values times their
    scale_weight, read with safetensors alone."""
    stored = load_file(path)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            key = comfy_key(name)
            if key not in stored:
                assert name == "lm_head.weight"
                continue
            tensor = stored[key].to(torch.float32)
            scale = key.removesuffix(".weight") + ".scale_weight"
            if key.endswith(".weight") and scale in stored:
                tensor = tensor * stored[scale]
            parameter.copy_(tensor)
    return reference


@pytest.fixture(scope="module")
def tiny_set():
    return tiny_text_encoder_set(hidden_size=48, seed=0)


@pytest.fixture(scope="module")
def comfy_root(tmp_path_factory, tiny_set):
    """A ComfyUI folder: its own tokenizer in comfy/text_encoders/qwen25_tokenizer (the tiny one) and the tiny
    model in models/text_encoders/ in every variant."""
    model, tokenizer, _ = tiny_set
    root = tmp_path_factory.mktemp("ComfyUI")
    tokenizer.save_pretrained(root / COMFY_TOKENIZER)
    for name, (fp8, head, dtype) in VARIANTS.items():
        save_text_encoder_file(model, root / "models/text_encoders" / f"qwen_2.5_vl_7b_{name}", fp8, head, dtype)
    return root


def variant(comfy_root, name: str) -> Path:
    return comfy_root / "models/text_encoders" / f"qwen_2.5_vl_7b_{name}"


def noise_image(seed: int = 2) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- the layout


def test_the_released_layout_is_the_7b():
    table = released_layout()
    assert len(table) == 1446
    source = TensorSource(Path(COMFY_FILE))
    for name, (shape, dtype) in table.items():
        source.files[name], source.shapes[name], source.dtypes[name] = Path(COMFY_FILE), tuple(shape), dtype
    shape = infer_shape(source)
    assert (shape.vocab_size, shape.hidden_size, shape.intermediate_size) == (152064, 3584, 18944)
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (28, 28, 4, 128)
    assert (shape.vision_depth, shape.vision_hidden_size, shape.vision_intermediate_size) == (32, 1280, 3420)
    assert (shape.vision_heads, shape.patch_size, shape.temporal_patch_size, shape.spatial_merge_size) == (16, 14, 2, 2)
    assert shape.full_attention_blocks == (7, 15, 23, 31) and shape.window_size == 112
    assert shape.has_lm_head and shape.precision == "fp8"

    # Qwen2.5-VL-7B-Instruct's own config.json, as transformers reads it
    config = shape.config(QwenIds())
    text, vision = config.text_config, config.vision_config
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    assert (text.rms_norm_eps, text.max_position_embeddings, text.tie_word_embeddings) == (1e-6, 128000, False)
    assert (config.image_token_id, config.video_token_id) == (151655, 151656)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (151652, 151653)
    assert (vision.out_hidden_size, vision.tokens_per_second) == (3584, 2)

    # the model of that config has every weight of the file, under the renamed names and at the same shapes
    from transformers import Qwen2_5_VLForConditionalGeneration

    with parameters_on_meta():
        model = Qwen2_5_VLForConditionalGeneration(config)
    quantized = quantized_layers(source, "")
    assert len(quantized) == 28 * 7 + 32 * 5 + 2
    weights = {n: s for n, (s, _) in table.items() if not n.endswith(("scale_weight", "scale_input", "scaled_fp8"))}
    assert {transformers_name(n): s for n, s in weights.items()} == {
        name: list(tensor.shape) for name, tensor in model.state_dict().items()
    }


def test_the_tiny_file_has_the_released_layout(comfy_root):
    stored = load_file(variant(comfy_root, "fp8_scaled.safetensors"))
    released = {pattern(n): (len(s), d) for n, (s, d) in released_layout().items()}
    assert {pattern(n): (t.ndim, t.dtype) for n, t in stored.items()} == released
    assert all(float(t) == 1.0 for n, t in stored.items() if n.endswith("scale_input"))
    headless = load_file(variant(comfy_root, "fp8_scaled_headless.safetensors"))
    assert set(stored) - set(headless) == {"lm_head.weight"}


def test_inferred_config_is_the_tiny_models(comfy_root, tiny_set):
    model, tokenizer, _ = tiny_set
    for name, (_, head, _) in VARIANTS.items():
        shape = check_text_encoder_file(variant(comfy_root, name))
        assert shape.has_lm_head is head
        assert shape.precision == ("fp8" if "fp8" in name else name.split(".")[0])
        inferred = shape.config(tokenizer).to_dict()
        expected = model.config.to_dict()
        for part in ("text_config", "vision_config"):
            for key, value in inferred[part].items():
                if key not in ("max_position_embeddings", "dtype"):  # not in the weights; the tiny model's is small
                    assert value == expected[part][key], (part, key)
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            assert inferred[key] == expected[key]


# --------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize(
    "name, fp8",
    [
        ("fp32.safetensors", "dequantize"),
        ("bf16.safetensors", "dequantize"),
        ("fp8_scaled.safetensors", "dequantize"),
        ("fp8_scaled.safetensors", "keep"),
        ("fp8_scaled_headless.safetensors", "keep"),
    ],
)
def test_prompt_embeddings_equal_transformers_on_the_same_weights(comfy_root, tiny_set, name, fp8):
    model, tokenizer, _ = tiny_set
    path = variant(comfy_root, name)
    loaded = load_text_encoder(path, dtype=torch.float32, fp8=fp8)
    reference = PromptEncoder(reference_model(model, path), tokenizer)
    embeddings, mask = loaded.encode([SHORT, LONGER])
    expected, expected_mask = reference.encode([SHORT, LONGER])
    assert torch.equal(embeddings, expected) and torch.equal(mask, expected_mask)

    kept = sum(isinstance(m, FP8Linear) for m in loaded.model.modules())
    assert kept == (26 if fp8 == "keep" else 0)
    original, _ = PromptEncoder(model, tokenizer).encode([SHORT, LONGER])
    error = ((embeddings - original).norm() / original.norm()).item()
    if name == "fp32.safetensors":
        assert error == 0
    else:  # the weights' rounding to bf16 (8 significant bits) or e4m3 (4 bits), through a random tiny model
        assert 0 < error < (0.03 if name.startswith("bf16") else 0.25)


def test_bf16_load_keeps_fp8_weights_and_bf16_elsewhere(comfy_root):
    loaded = load_text_encoder(variant(comfy_root, "fp8_scaled.safetensors"), fp8="keep")
    q_proj = loaded.model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FP8Linear) and q_proj.weight.dtype == torch.float8_e4m3fn
    assert q_proj.bias.dtype == torch.bfloat16 and loaded.dtype == torch.bfloat16  # the file's own dtype
    assert isinstance(loaded.model.model.visual.merger.mlp[0], FP8Linear)
    assert loaded.encode(SHORT)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("name, fp8", [("fp8_scaled.safetensors", "keep"), ("bf16.safetensors", "dequantize")])
def test_caption_matches_generate_on_the_same_weights(comfy_root, tiny_set, name, fp8):
    from transformers import GenerationConfig

    model, tokenizer, image_processor = tiny_set
    path = variant(comfy_root, name)
    loaded = load_text_encoder(path, dtype=torch.float32, fp8=fp8)
    # The file carries no generation settings: the release's are given, its repetition penalty included.
    settings = loaded.model.generation_config
    assert settings.repetition_penalty == 1.05 and settings.top_k == 1
    assert settings.eos_token_id == [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    image = noise_image()
    inputs = loaded.caption_inputs(image)
    reference = reference_model(model, path)
    # min_new_tokens keeps the end of turn from stopping it early: all 16 tokens are compared
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=16,
        min_new_tokens=16,
        repetition_penalty=1.05,
        eos_token_id=settings.eos_token_id,
        pad_token_id=settings.pad_token_id,
    )
    ours = loaded.model.generate(**inputs, generation_config=greedy)
    expected = reference.generate(**inputs, generation_config=greedy)
    assert ours.shape[1] == inputs["input_ids"].shape[1] + 16 and torch.equal(ours, expected)

    caption = loaded.caption(image, max_new_tokens=16)
    assert caption == PromptEncoder(reference, tokenizer, loaded.image_processor).caption(image, max_new_tokens=16)


def test_the_release_image_processor_when_the_tokenizer_folder_has_none(comfy_root):
    loaded = load_text_encoder(variant(comfy_root, "fp8_scaled.safetensors"))
    assert loaded.image_processor.size == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
    assert loaded.image_processor.merge_size == 2 and loaded.caption_tokenizer is None


def test_without_the_head_prompts_encode_and_a_caption_is_refused(comfy_root, tiny_set):
    model, tokenizer, _ = tiny_set
    path = variant(comfy_root, "fp8_scaled_headless.safetensors")
    parts = find_text_encoder(path)
    assert parts.caption_problem == NO_HEAD and "lm_head.weight" in NO_HEAD
    assert find_text_encoder(variant(comfy_root, "fp8_scaled.safetensors")).caption_problem is None
    headless = load_text_encoder(path, dtype=torch.float32)
    with_head = load_text_encoder(variant(comfy_root, "fp8_scaled.safetensors"), dtype=torch.float32)
    assert torch.equal(headless.encode(LONGER)[0], with_head.encode(LONGER)[0])
    with pytest.raises(
        CheckpointError, match=r"headless\.safetensors: holds no language-model head \(lm_head\.weight\)"
    ):
        headless.caption(noise_image(), max_new_tokens=4)


def test_names_already_in_transformers_form_are_read(tmp_path, tiny_set):
    model, tokenizer, _ = tiny_set
    folder = write_text_encoder_set(tmp_path / "set", model, tokenizer)
    # transformers 5's own names (model.language_model.*, model.visual.*), as its state_dict has them
    single = save_safetensors(model.state_dict(), tmp_path / "transformers-names.safetensors", metadata(model))
    loaded = load_text_encoder(single, dtype=torch.float32, tokenizer_folder=folder)
    assert torch.equal(loaded.encode(SHORT)[0], PromptEncoder(model, tokenizer).encode(SHORT)[0])
    assert loaded.image_processor.size["longest_edge"] == 112 * 112  # the diffusers folder's processor/


# --------------------------------------------------------------------------- the tokenizer, and refusals


def test_the_tokenizer_comes_from_the_comfyui_folder_or_is_given(comfy_root, tmp_path, tiny_set):
    _, tokenizer, _ = tiny_set
    path = variant(comfy_root, "fp8_scaled.safetensors")
    assert find_tokenizer(path) == (comfy_root / COMFY_TOKENIZER, None)
    # a models folder linked from elsewhere still finds the ComfyUI it belongs to
    (tmp_path / "linked").symlink_to(comfy_root / "models", target_is_directory=True)
    assert find_tokenizer(tmp_path / "linked/text_encoders" / path.name)[0] == comfy_root / COMFY_TOKENIZER

    diffusers = tmp_path / "Qwen-Image-Layered"
    tokenizer.save_pretrained(diffusers / "tokenizer")
    (diffusers / "processor").mkdir()
    (diffusers / "processor/preprocessor_config.json").write_text("{}")
    assert find_tokenizer(path, diffusers) == (diffusers / "tokenizer", diffusers / "processor")
    assert find_tokenizer(path, diffusers / "tokenizer") == (diffusers / "tokenizer", None)

    lone = tmp_path / "elsewhere" / path.name
    lone.parent.mkdir()
    lone.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"fp8_scaled\.safetensors: holds no tokenizer") as error:
        find_text_encoder(lone)
    assert "comfy/text_encoders/qwen25_tokenizer" in str(error.value) and "--tokenizer" in str(error.value)
    with pytest.raises(CheckpointError, match=r"nothing: folder not found: the tokenizer of qwen_2\.5_vl"):
        find_text_encoder(lone, tmp_path / "nothing")
    with pytest.raises(CheckpointError, match=r"elsewhere: no tokenizer here"):
        find_text_encoder(lone, lone.parent)


def test_a_tokenizer_of_another_vocabulary_is_refused(comfy_root, tmp_path, tiny_set):
    _, tokenizer, _ = tiny_set
    bigger = copy.deepcopy(tokenizer)
    bigger.add_tokens([f"word{i}" for i in range(10)])
    bigger.save_pretrained(tmp_path / "bigger")
    path = variant(comfy_root, "bf16.safetensors")
    with pytest.raises(CheckpointError, match=r"bf16\.safetensors: the tokenizer has 918 tokens, more than the 908"):
        load_text_encoder(path, tokenizer_folder=tmp_path / "bigger")


def test_files_that_are_not_the_text_encoder_are_named(comfy_root, tmp_path, tiny_set):
    model = tiny_set[0]
    vae = save_vae(tiny_vae(), tmp_path / "vae.safetensors", layout="wan")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: holds a VAE, not Qwen2\.5-VL; expected ComfyUI's"):
        load_text_encoder(vae, tokenizer_folder=comfy_root / COMFY_TOKENIZER)

    stored = load_file(variant(comfy_root, "bf16.safetensors"))
    broken = tmp_path / "ComfyUI/models/text_encoders/broken.safetensors"
    missing = "model.layers.1.mlp.up_proj.weight"
    save_safetensors({k: v for k, v in stored.items() if k != missing}, broken, metadata(model))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: .*1 missing tensors: .*layers\.1\.mlp\.up_proj"):
        load_text_encoder(broken, tokenizer_folder=comfy_root / COMFY_TOKENIZER)

    no_vision = {k: v for k, v in stored.items() if not k.startswith("visual.")}
    save_safetensors(no_vision, broken, metadata(model))
    with pytest.raises(CheckpointError, match=r"no vision tower \(visual\.patch_embed\)"):
        find_text_encoder(broken, comfy_root / COMFY_TOKENIZER)


# --------------------------------------------------------------------------- ComfyUI itself

COMFY_CHECK = r"""
import json, os, sys, torch
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, os.environ["COMFYUI"])
import comfy.options
comfy.options.enable_args_parsing(True)
import comfy.ops, comfy.sd, comfy.utils
from comfy.text_encoders import llama

# the tiny file, read as ComfyUI's CLIPLoader reads it
sd, metadata = comfy.utils.load_torch_file(os.environ["TINY"], safe_load=True, return_metadata=True)
sd, metadata = comfy.utils.convert_old_quants(sd, model_prefix="", metadata=metadata)
quantized = sorted(k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant"))
# the released layout, as meta tensors: what ComfyUI detects and what its Qwen2.5-VL-7B model holds
table = json.load(open(os.environ["LAYOUT"]))
released = {k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, (s, d) in table.items()}
with torch.device("meta"):
    model = llama.Qwen25_7BVLI({}, dtype=torch.bfloat16, device="meta", operations=comfy.ops.manual_cast)
print(json.dumps({
    "quantized": quantized,
    "detected": str(comfy.sd.detect_te_model(released)),
    "model": {k: list(v.shape) for k, v in model.state_dict().items()},
}))
"""


@pytest.mark.skipif(not COMFYUI_PYTHON.is_file(), reason=f"no ComfyUI with a .venv at {COMFYUI}")
def test_comfyui_reads_this_layout(comfy_root, tmp_path):
    table = {k: (s, str(d).removeprefix("torch.")) for k, (s, d) in released_layout().items()}
    (tmp_path / "layout.json").write_text(json.dumps(table))
    tiny = variant(comfy_root, "fp8_scaled.safetensors")
    environment = {**os.environ, "COMFYUI": str(COMFYUI), "TINY": str(tiny), "LAYOUT": str(tmp_path / "layout.json")}
    result = subprocess.run(
        [str(COMFYUI_PYTHON), "-c", COMFY_CHECK], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    # ComfyUI turns the tiny file's scaled fp8 into its per-layer quantisation, layer for layer
    assert answer["quantized"] == sorted(quantized_layers(open_checkpoint(tiny), ""))
    # and takes the released layout for its Qwen2.5-VL-7B (Qwen-Image's text encoder); its model holds every
    # weight but the head, which ComfyUI does not use
    assert answer["detected"] == "TEModel.QWEN25_7B"
    weights = {n: s for n, (s, _) in table.items() if not n.endswith(("scale_weight", "scale_input", "scaled_fp8"))}
    del weights["lm_head.weight"]
    assert answer["model"] == weights


def test_tiny_models_leave_a_real_text_encoder_alone(tmp_path, comfy_root):
    from layered_core.tiny_models import COMFY_FILES, write_comfy_models

    real = tmp_path / "models" / COMFY_FILES["text_encoder_file"]
    # a file this package did not write (no layered_core metadata), as ComfyUI's release
    save_safetensors(load_file(variant(comfy_root, "fp8_scaled.safetensors")), real)
    before = real.read_bytes()
    written = write_comfy_models(tmp_path / "models")
    assert "text_encoder_file" not in written and real.read_bytes() == before
    real.unlink()
    assert write_comfy_models(tmp_path / "models")["text_encoder_file"] == real and real.is_file()
