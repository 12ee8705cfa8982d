"""Text conditioning against diffusers' QwenImageLayeredPipeline on a tiny random Qwen2.5-VL."""

from __future__ import annotations

import functools
import json
import shutil
from unittest.mock import patch

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from layered_core.checkpoints import CheckpointError
from layered_core.mmdit import MMDiTConfig
from layered_core.text import (
    CAPTION_INSTRUCTIONS,
    ENCODE_TEMPLATE,
    TEMPLATE_PREFIX_TOKENS,
    PromptEncoder,
    load_text_encoder,
    mask_or_none,
)
from layered_core.tiny_models import tiny_text_encoder_set, write_text_encoder_set, write_tiny_text_encoder

CPU = torch.device("cpu")
SHORT = "a red cat"
LONGER = "a red cat sitting on a blue sofa in front of a white wall with a poster that says 'hello world'"
LONG = " ".join(["a green plant next to a red cat,"] * 40) + " and 123 unknown-ish wordz"


def reference_processor(image_processor, tokenizer):
    """transformers' Qwen2VLProcessor, the one the reference pipeline captions with."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    try:
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2)
    except ImportError:  # it needs torchvision
        video_processor = None
    if video_processor is not None:
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)
    # Without torchvision transformers refuses to build the processor for want of a video processor,
    # which captions never use: skip only that class check.
    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, argument):
        return None if (name == "video_processor" and argument is None) else check(self, name, argument)

    with patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


@pytest.fixture(scope="module")
def tiny_set():
    return tiny_text_encoder_set(hidden_size=48, seed=0)


@pytest.fixture(scope="module")
def encoder(tiny_set):
    model, tokenizer, image_processor = tiny_set
    return PromptEncoder(model, tokenizer, image_processor)


@pytest.fixture(scope="module")
def reference(tiny_set):
    from diffusers import QwenImageLayeredPipeline

    model, tokenizer, image_processor = tiny_set
    # The transformer, VAE and scheduler take no part in text encoding or captions.
    return QwenImageLayeredPipeline(
        scheduler=None,
        vae=None,
        text_encoder=model,
        tokenizer=tokenizer,
        processor=reference_processor(image_processor, tokenizer),
        transformer=None,
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_text_encoder(tmp_path_factory.mktemp("tiny") / "Qwen-Image-Layered", hidden_size=48, seed=0)


def relative_max_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


def test_template_and_instructions_are_the_references(reference, encoder):
    assert ENCODE_TEMPLATE == reference.prompt_template_encode
    assert TEMPLATE_PREFIX_TOKENS == reference.prompt_template_encode_start_idx
    assert CAPTION_INSTRUCTIONS["en"] == reference.image_caption_prompt_en
    assert CAPTION_INSTRUCTIONS["zh"] == reference.image_caption_prompt_cn
    # The tiny vocabulary splits the template like Qwen's, so the 34 dropped tokens are the system turn.
    prefix_ids = encoder.tokenizer(ENCODE_TEMPLATE.format(SHORT)).input_ids[:TEMPLATE_PREFIX_TOKENS]
    assert encoder.tokenizer.decode(prefix_ids) == ENCODE_TEMPLATE.split("{}")[0]
    assert encoder.hidden_size == MMDiTConfig.tiny().text_dim == 48


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_of_two_lengths_matches_reference(encoder, reference, padding_side, monkeypatch):
    monkeypatch.setattr(encoder.tokenizer, "padding_side", padding_side)
    expected, expected_mask = reference.encode_prompt([SHORT, LONGER], device=CPU)
    embeddings, mask = encoder.encode([SHORT, LONGER])

    assert embeddings.shape == expected.shape and embeddings.dtype == expected.dtype
    assert relative_max_error(embeddings, expected) <= 1e-5
    assert expected_mask is not None and torch.equal(mask, expected_mask.bool())
    assert mask.dtype == torch.bool and 0 < int(mask[0].sum()) < int(mask[1].sum()) == mask.shape[1]
    assert embeddings[0][~mask[0]].abs().max() == 0  # padding rows are zeros
    assert embeddings[0][mask[0]].abs().min() > 0


@pytest.mark.parametrize("prompt", [" ", "", SHORT, LONG], ids=["space", "empty", "short", "long"])
def test_single_prompt_matches_reference(encoder, reference, prompt):
    expected, expected_mask = reference.encode_prompt(prompt, device=CPU)
    embeddings, mask = encoder.encode(prompt)

    assert embeddings.shape == expected.shape
    assert relative_max_error(embeddings, expected) <= 1e-5
    assert expected_mask is None and bool(mask.all()) and mask_or_none(mask) is None
    if prompt == LONG:
        assert embeddings.shape[1] > 200


def test_prompt_over_1024_tokens(encoder, reference):
    too_long = " cat" * 1100
    with pytest.raises(ValueError, match=r"prompt 0 is 1105 tokens long.*at most 1024.*truncate=True"):
        encoder.encode(too_long)
    with pytest.raises(ValueError, match="prompt 1 is 1105 tokens"):
        encoder.encode([SHORT, too_long])
    with pytest.raises(ValueError, match="max_sequence_length must be in 1..1024, got 1025"):
        encoder.encode(SHORT, max_sequence_length=1025)

    # truncate=True keeps the first tokens, as the reference pipeline does.
    for limit in (1024, 512):
        expected, expected_mask = reference.encode_prompt([SHORT, too_long], device=CPU, max_sequence_length=limit)
        embeddings, mask = encoder.encode([SHORT, too_long], max_sequence_length=limit, truncate=True)
        assert embeddings.shape == expected.shape == (2, limit, 48)
        assert relative_max_error(embeddings, expected) <= 1e-5
        assert torch.equal(mask, expected_mask.bool())


def test_caption_inputs_equal_the_processors(encoder, reference):
    image = Image.fromarray(np.random.RandomState(3).randint(0, 256, (64, 80, 3), dtype=np.uint8))
    expected = reference.vl_processor(text=CAPTION_INSTRUCTIONS["en"], images=image, padding=True, return_tensors="pt")
    ours = encoder.caption_inputs(image, "en")
    assert sorted(ours) == sorted(expected.keys())
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name
    # 64x80 resizes to 56x84: 4x6 patches of 14, merged 2x2 into 6 image tokens
    assert int((ours["input_ids"] == encoder.model.config.image_token_id).sum()) == 6


@pytest.mark.parametrize(
    ("language", "mode", "size"), [("en", "RGB", (64, 64)), ("zh", "RGBA", (80, 48))], ids=["en-rgb", "zh-rgba"]
)
def test_caption_matches_reference(encoder, reference, language, mode, size):
    pixels = np.random.RandomState(1).randint(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels, mode)
    expected = reference.get_image_caption(image, use_en_prompt=language == "en", device=CPU)
    before = encoder.encode([SHORT, LONGER])
    caption = encoder.caption(image, language=language)  # 512 new tokens, as the reference
    assert caption == expected
    assert len(caption) > 100 and caption == caption.strip()
    assert encoder.caption(image, language=language, max_new_tokens=8) != caption
    after = encoder.encode([SHORT, LONGER])  # the model's rotary state from generation does not leak
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_compile_caption_captions_through_a_compiled_step(encoder, monkeypatch):
    """With compile_caption the decoder is rebuilt with its step compiled (aot_eager here: inductor's tracing without
    a C++ build), and gives the caption of the uncompiled one; switched off, an uncompiled one again."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    image = Image.fromarray(np.random.RandomState(5).randint(0, 256, (64, 64, 3), dtype=np.uint8))
    plain = encoder.caption(image, max_new_tokens=12)
    assert not encoder._decoder.compile_step
    monkeypatch.setattr(encoder, "compile_caption", True)
    assert encoder.caption(image, max_new_tokens=12) == plain
    assert encoder._decoder.compile_step
    monkeypatch.setattr(encoder, "compile_caption", False)
    assert encoder.caption(image, max_new_tokens=12) == plain
    assert not encoder._decoder.compile_step


def test_caption_stops_at_the_end_token_like_reference(encoder, reference, monkeypatch):
    image = Image.fromarray(np.random.RandomState(4).randint(0, 256, (64, 64, 3), dtype=np.uint8))
    inputs = encoder.caption_inputs(image)
    first_tokens = encoder.model.generate(**inputs, max_new_tokens=8)[0, inputs["input_ids"].shape[1] :]
    # The random model never picks <|im_end|>; make its sixth token the end token instead.
    monkeypatch.setattr(encoder.model.generation_config, "eos_token_id", [int(first_tokens[5])])
    expected = reference.get_image_caption(image, device=CPU)
    caption = encoder.caption(image)
    assert caption == expected
    assert 0 < len(caption) < 40


def test_caption_refusals(encoder, tiny_set):
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match=r"language must be one of \['en', 'zh'\], got 'fr'"):
        encoder.caption(image, language="fr")
    model, tokenizer, _ = tiny_set
    with pytest.raises(ValueError, match="captioning needs the image processor"):
        PromptEncoder(model, tokenizer).caption(image)


def test_tiny_set_round_trips(tiny_folder, encoder):
    assert {p.name for p in (tiny_folder / "text_encoder").iterdir()} >= {"config.json", "model.safetensors"}
    image = Image.fromarray(np.random.RandomState(2).randint(0, 256, (64, 64, 3), dtype=np.uint8))
    expected, expected_mask = encoder.encode([SHORT, LONGER])
    for path in (tiny_folder, tiny_folder / "text_encoder"):
        loaded = load_text_encoder(path, dtype=torch.float32)
        embeddings, mask = loaded.encode([SHORT, LONGER])
        assert torch.equal(embeddings, expected) and torch.equal(mask, expected_mask)
        assert loaded.caption(image, max_new_tokens=32) == encoder.caption(image, max_new_tokens=32)
    in_bf16 = load_text_encoder(tiny_folder, dtype=torch.bfloat16, device="cpu")
    assert in_bf16.encode(SHORT)[0].dtype == torch.bfloat16 and in_bf16.device == CPU


def test_tiny_set_is_deterministic_and_loads_in_diffusers_classes(tiny_folder, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    again = write_tiny_text_encoder(tmp_path / "again", hidden_size=48, seed=0)
    other = write_tiny_text_encoder(tmp_path / "other", hidden_size=48, seed=1)
    weights = load_file(tiny_folder / "text_encoder" / "model.safetensors")
    same = load_file(again / "text_encoder" / "model.safetensors")
    different = load_file(other / "text_encoder" / "model.safetensors")
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    assert not torch.equal(weights["lm_head.weight"], different["lm_head.weight"])

    # What diffusers' from_pretrained does with each component of the folder.
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_folder / "text_encoder", local_files_only=True)
    assert model.config.text_config.hidden_size == 48
    tokenizer = Qwen2Tokenizer.from_pretrained(tiny_folder / "tokenizer", local_files_only=True)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    processor_tokenizer = Qwen2Tokenizer.from_pretrained(tiny_folder / "processor", local_files_only=True)
    assert processor_tokenizer(LONGER).input_ids == tokenizer(LONGER).input_ids


def test_processor_folder_loads_as_qwen2vl_processor(tiny_folder):
    pytest.importorskip("torchvision", reason="transformers builds Qwen2VLProcessor only with torchvision")
    from transformers import Qwen2VLProcessor

    processor = Qwen2VLProcessor.from_pretrained(tiny_folder / "processor", local_files_only=True)
    assert processor.image_processor.merge_size == 2


def test_hidden_size_is_a_parameter(tmp_path):
    model, tokenizer, image_processor = tiny_text_encoder_set(hidden_size=64, seed=5)
    embeddings, _ = PromptEncoder(model, tokenizer, image_processor).encode(SHORT)
    assert embeddings.shape[-1] == 64


# --------------------------------------------------------------------------- refusals


def copy_set(tiny_folder, tmp_path):
    return shutil.copytree(tiny_folder, tmp_path / "copy")


def test_missing_folder_and_broken_single_file(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: folder not found"):
        load_text_encoder(tmp_path / "nowhere")
    single = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    single.write_bytes(b"x" * 16)
    # a single file is read (tests/test_text_encoder_file.py); this one is no safetensors file at all
    with pytest.raises(CheckpointError, match=r"fp8_scaled\.safetensors: not a valid safetensors file"):
        load_text_encoder(single)
    with pytest.raises(CheckpointError, match="neither a text_encoder/ subfolder nor a config.json"):
        load_text_encoder(tmp_path)


def test_truncated_weights(tiny_folder, tmp_path):
    folder = copy_set(tiny_folder, tmp_path)
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file"):
        load_text_encoder(folder)


def test_missing_tokenizer(tiny_folder, tmp_path):
    folder = copy_set(tiny_folder, tmp_path)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError, match=r"copy: no tokenizer: expected .*copy/tokenizer") as error:
        load_text_encoder(folder)
    assert error.value.path == str(folder)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_text_encoder(folder / "text_encoder")


def test_pickle_only_weights(tiny_folder, tmp_path):
    folder = copy_set(tiny_folder, tmp_path)
    (folder / "text_encoder" / "model.safetensors").unlink()
    # Never opened: refused by name, so its content does not matter.
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: is a pickle checkpoint.*only safetensors"):
        load_text_encoder(folder)


def test_missing_weights_and_missing_shard(tiny_folder, tmp_path):
    folder = copy_set(tiny_folder, tmp_path)
    weights = folder / "text_encoder" / "model.safetensors"
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weights: expected model.safetensors"):
        load_text_encoder(folder)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists shards that are not in the folder: model-00001-of-00002"):
        load_text_encoder(folder)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llama", None])
def test_config_that_is_not_qwen25_vl(tiny_folder, tmp_path, model_type):
    folder = copy_set(tiny_folder, tmp_path)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("model_type")
    if model_type is not None:
        config["model_type"] = model_type
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config.json: model_type is {model_type!r}, expected 'qwen2_5_vl'"):
        load_text_encoder(folder)


def test_folder_without_processor_encodes_but_cannot_caption(tiny_folder, tmp_path):
    folder = copy_set(tiny_folder, tmp_path)
    shutil.rmtree(folder / "processor")
    loaded = load_text_encoder(folder)
    assert loaded.encode(SHORT)[0].shape[-1] == 48
    with pytest.raises(ValueError, match="captioning needs the image processor"):
        loaded.caption(Image.new("RGB", (64, 64)))


def test_in_memory_set_can_be_written(tiny_set, tmp_path):
    model, tokenizer, _ = tiny_set
    folder = write_text_encoder_set(tmp_path / "set", model, tokenizer)
    assert (folder / "processor" / "preprocessor_config.json").is_file()
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
