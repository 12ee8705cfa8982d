"""A ComfyUI models folder: the three models found by what their files hold (headers only), never by name."""

from __future__ import annotations

import shutil

import pytest
import torch

from layered_core.checkpoints import CheckpointError, save_mmdit
from layered_core.checkpoints.files import LAYERED_MARKER, TensorSource, save_safetensors
from layered_core.checkpoints.models_folder import find_models, models_folder
from layered_core.checkpoints.vae import checkpoint_state_dict
from layered_core.tiny_models import tiny_transformer, tiny_vae, write_tiny_text_encoder


@pytest.fixture(scope="module")
def comfy_root(tmp_path_factory):
    """A ComfyUI folder whose models have unhelpful names, beside decoys with the names of the right ones."""
    root = tmp_path_factory.mktemp("ComfyUI")
    models = root / "models"
    transformer = tiny_transformer()
    state = transformer.state_dict()
    config = transformer.config
    bf16 = torch.bfloat16
    save_mmdit(
        state, models / "diffusion_models/mine/a.safetensors", layout="comfy-prefixed", config=config, dtype=bf16
    )
    save_mmdit(state, models / "unet/b.safetensors", layout="fp8-comfy-quant", config=config)
    plain = {k: v for k, v in state.items() if not k.endswith(LAYERED_MARKER)}
    save_mmdit(plain, models / "diffusion_models/qwen_image_layered_bf16.safetensors", layout="comfy", config=config)
    (models / "diffusion_models/broken.safetensors").write_bytes(b"\x00" * 12)

    vae = checkpoint_state_dict(tiny_vae())
    save_safetensors(vae, models / "vae/z.safetensors")
    rgb = dict(vae, **{"encoder.conv1.weight": vae["encoder.conv1.weight"][:, :3].contiguous()})
    save_safetensors(rgb, models / "vae/qwen_image_layered_vae.safetensors")

    write_tiny_text_encoder(models / "text_encoders/qwen-vl")
    save_safetensors({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, models / "clip/qwen_2.5_vl.safetensors")
    return root


@pytest.fixture
def headers_only(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"read tensor {name}: the choice must come from headers")

    monkeypatch.setattr(TensorSource, "get", refuse)


def test_the_models_are_found_by_content_and_the_choice_is_said(comfy_root, headers_only):
    models = models_folder(comfy_root)  # the ComfyUI folder above models/ will do
    assert models == comfy_root / "models"
    found = find_models(models, need_processor=True)
    assert found.transformer == models / "diffusion_models/mine/a.safetensors"  # bf16 over fp8
    assert found.vae == models / "vae/z.safetensors"
    assert found.text_encoder == models / "text_encoders/qwen-vl"
    lines = found.summary()
    assert lines[0] == f"models from {models} (a ComfyUI models folder):"
    assert lines[1] == (
        "  transformer: diffusion_models/mine/a.safetensors (bf16); also there: unet/b.safetensors (fp8) "
        "(pass --transformer FILE to use another)"
    )
    assert lines[2] == "  VAE: vae/z.safetensors (Wan layout)"
    assert lines[3] == "  text encoder: text_encoders/qwen-vl (with processor/)"
    details = {c.path.name: c.detail for c in found.looked_at["transformer"]}
    assert details["qwen_image_layered_bf16.safetensors"] == "a plain Qwen-Image (or Qwen-Image-Edit) transformer"
    assert details["broken.safetensors"].startswith("unreadable: ")
    rejected = next(c for c in found.looked_at["VAE"] if c.path.name == "qwen_image_layered_vae.safetensors")
    assert not rejected.usable and "3-channel" in rejected.detail


def test_what_is_missing_is_named_with_what_was_looked_at(comfy_root, tmp_path, headers_only):
    (tmp_path / "diffusion_models").mkdir()
    (tmp_path / "vae").symlink_to(comfy_root / "models" / "vae")
    with pytest.raises(CheckpointError, match=r"no Qwen-Image-Layered transformer in diffusion_models/ or unet/ "):
        find_models(tmp_path)
    found = find_models(tmp_path, kinds=("vae",))
    assert found.vae == tmp_path / "vae/z.safetensors" and found.transformer is None
    assert models_folder(comfy_root / "models" / "vae") is None


def test_a_text_encoder_without_processor_will_not_do_for_captions(comfy_root, tmp_path, headers_only):
    models = tmp_path / "models"
    shutil.copytree(
        comfy_root / "models" / "text_encoders", models / "text_encoders", ignore=shutil.ignore_patterns("processor")
    )
    assert find_models(models, kinds=("text_encoder",)).text_encoder == models / "text_encoders/qwen-vl"
    with pytest.raises(CheckpointError) as error:
        find_models(models, kinds=("text_encoder",), need_processor=True)
    assert "qwen-vl: no processor/: no auto-captions" in str(error.value)
    assert "processor/ for the auto-caption" in str(error.value)


def single_file_root(root, tokenizer_from=None, lm_head=True):
    """A ComfyUI folder holding ComfyUI's single-file text encoder, its tokenizer where ComfyUI keeps it."""
    from layered_core.checkpoints.text_encoder import save_text_encoder_file
    from layered_core.tiny_models import tiny_text_encoder_set

    model, tokenizer, _ = tiny_text_encoder_set()
    save_text_encoder_file(model, root / "models/text_encoders/te.safetensors", fp8=True, lm_head=lm_head)
    tokenizer.save_pretrained(root / "comfy/text_encoders/qwen25_tokenizer")
    return root / "models"


def test_the_single_file_text_encoder_is_found_by_its_header(comfy_root, tmp_path, headers_only):
    models = single_file_root(tmp_path / "ComfyUI")
    found = find_models(models, kinds=("text_encoder",), need_processor=True)
    assert found.text_encoder == models / "text_encoders/te.safetensors"
    assert found.summary()[1] == "  text encoder: text_encoders/te.safetensors (fp8 single file)"

    # beside a folder that can caption, the folder is chosen and the file offered
    shutil.copytree(comfy_root / "models/text_encoders/qwen-vl", models / "text_encoders/qwen-vl")
    found = find_models(models, kinds=("text_encoder",))
    assert found.text_encoder == models / "text_encoders/qwen-vl"
    assert found.summary()[1] == (
        "  text encoder: text_encoders/qwen-vl (with processor/); also there: text_encoders/te.safetensors "
        "(fp8 single file) (pass --text-encoder PATH to use another)"
    )


def test_a_single_file_without_head_or_tokenizer_is_said_why(tmp_path, headers_only):
    models = single_file_root(tmp_path / "ComfyUI", lm_head=False)
    assert find_models(models, kinds=("text_encoder",)).text_encoder == models / "text_encoders/te.safetensors"
    with pytest.raises(CheckpointError, match=r"te\.safetensors: fp8 single file, no lm_head: no auto-captions"):
        find_models(models, kinds=("text_encoder",), need_processor=True)
    shutil.rmtree(tmp_path / "ComfyUI/comfy")
    with pytest.raises(CheckpointError, match=r"te\.safetensors: holds no tokenizer \(ComfyUI keeps it in its own"):
        find_models(models, kinds=("text_encoder",))
    # a tokenizer given is used instead
    tokenizer = tmp_path / "tokenizer"
    single_file_root(tmp_path / "other")
    shutil.copytree(tmp_path / "other/comfy/text_encoders/qwen25_tokenizer", tokenizer)
    found = find_models(models, kinds=("text_encoder",), tokenizer_folder=tokenizer)
    assert found.text_encoder == models / "text_encoders/te.safetensors"
