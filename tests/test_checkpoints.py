"""Loading the transformer from every real layout, and refusing what cannot be loaded."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layered_core.checkpoints import (
    CheckpointError,
    infer_mmdit_config,
    load_mmdit,
    load_vae,
    open_checkpoint,
    save_mmdit,
)
from layered_core.checkpoints.vae import wan_names_from_diffusers
from layered_core.mmdit import MMDiTConfig
from layered_core.ops import FP8Linear

from .conftest import reference_transformer
from .test_mmdit import reference_velocity, relative_max_error

LAYOUTS = ["diffusers", "comfy", "comfy-prefixed", "fp8-comfy-quant", "fp8-scaled"]


def inputs(config, layers=2, h=6, w=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 16, layers + 1, h, w, generator=gen),
        torch.randn(2, 16, h, w, generator=gen),
        torch.randn(2, 5, config.text_dim, generator=gen),
        torch.tensor([0.9, 0.35]),
        torch.tensor([[True] * 5, [True] * 3 + [False] * 2]),
    )


def weights_in_file(path: Path) -> dict[str, torch.Tensor]:
    """The float32 weights a file stands for, decoded here independently of the loader."""
    raw = load_file(str(path))
    out = {}
    for key, tensor in raw.items():
        name = key.removeprefix("model.diffusion_model.")
        if name.endswith((".comfy_quant", ".weight_scale", ".scale_weight")) or name == "scaled_fp8":
            continue
        scale = raw.get(key.replace(".weight", ".weight_scale"), raw.get(key.replace(".weight", ".scale_weight")))
        value = tensor.to(torch.float32)
        out[name] = value * scale.to(torch.float32) if (scale is not None and key.endswith(".weight")) else value
    return out


def write(layout, tmp_path, reference, config) -> Path:
    target = tmp_path / ("transformer" if layout == "diffusers" else f"{layout}.safetensors")
    return save_mmdit(reference.state_dict(), target, layout=layout, config=config, shard_bytes=200_000)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_and_matches_diffusers(layout, tmp_path, tiny_reference, tiny_config):
    path = write(layout, tmp_path, tiny_reference, tiny_config)
    model = load_mmdit(path, dtype=torch.float32)
    if layout == "diffusers":
        assert len(list(path.glob("*.safetensors"))) > 1  # really sharded
        expected = tiny_reference
    else:
        expected = reference_transformer(tiny_config)
        expected.load_state_dict(weights_in_file(path))
    if layout.startswith("fp8"):
        assert len(load_file(str(path))) > len(tiny_reference.state_dict())  # scales are stored
        assert any(t.dtype == torch.float8_e4m3fn for t in load_file(str(path)).values())
    latents, condition, text, sigma, mask = inputs(tiny_config)
    with torch.no_grad():
        got = model(latents, condition, text, sigma, mask)
        want = reference_velocity(expected, latents, condition, text, sigma, mask)
    assert relative_max_error(got, want) <= 1e-5


@pytest.mark.parametrize("layout", ["fp8-comfy-quant", "fp8-scaled"])
def test_fp8_kept_in_fp8(layout, tmp_path, tiny_reference, tiny_config):
    path = write(layout, tmp_path, tiny_reference, tiny_config)
    kept = load_mmdit(path, dtype=torch.float32, fp8="keep")
    dequantized = load_mmdit(path, dtype=torch.float32, fp8="dequantize")
    linear = kept.transformer_blocks[0].attn.to_q
    assert isinstance(linear, FP8Linear) and linear.weight.dtype == torch.float8_e4m3fn
    assert kept.img_in.weight.dtype == torch.float32  # mixed: embeddings stay high precision
    kept_bytes = sum(p.numel() * p.element_size() for p in kept.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in dequantized.parameters())
    assert kept_bytes < 0.5 * full_bytes
    latents, condition, text, sigma, mask = inputs(tiny_config)
    with torch.no_grad():
        a = kept(latents, condition, text, sigma, mask)
        b = dequantized(latents, condition, text, sigma, mask)
    assert relative_max_error(a, b) <= 1e-6


def test_pipeline_folder_picks_transformer(tmp_path, tiny_reference, tiny_config):
    save_mmdit(tiny_reference.state_dict(), tmp_path / "transformer", layout="diffusers", config=tiny_config)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageLayeredPipeline"}))
    model = load_mmdit(tmp_path, dtype=torch.float32)
    assert torch.equal(model.img_in.weight, tiny_reference.img_in.weight)


def test_bf16_file_loads_in_bf16(tmp_path, tiny_reference, tiny_config):
    path = save_mmdit(tiny_reference.state_dict(), tmp_path / "m.safetensors", config=tiny_config, dtype=torch.bfloat16)
    model = load_mmdit(path, dtype=torch.bfloat16)
    assert model.img_in.weight.dtype == torch.bfloat16
    assert torch.equal(model.img_in.weight, tiny_reference.img_in.weight.to(torch.bfloat16))
    latents, condition, text, sigma, mask = inputs(tiny_config)
    with torch.no_grad():
        out = model(latents, condition, text, sigma, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_config_inferred_from_shapes_of_a_comfy_file(tmp_path):
    # A file without our metadata (like the real ComfyUI files): the shape must come from the tensors.
    config = MMDiTConfig(num_layers=3, num_heads=1, head_dim=128, text_dim=24)
    reference = reference_transformer(config, seed=1)
    path = tmp_path / "plain.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    source = open_checkpoint(path)
    assert infer_mmdit_config(source, "model.diffusion_model.") == config
    assert load_mmdit(path, dtype=torch.float32).config == config


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_same_dtype_load_is_memory_mapped(tmp_path):
    config = MMDiTConfig(num_layers=2, num_heads=4, head_dim=128, text_dim=64)
    reference = reference_transformer(config, seed=2)
    path = save_mmdit(reference.state_dict(), tmp_path / "big.safetensors", config=config)
    file_mb = path.stat().st_size / 2**20
    del reference
    before = _rss_anon_mb()
    model = load_mmdit(path, dtype=torch.float32)
    grown = _rss_anon_mb() - before
    assert file_mb > 60
    assert grown < 0.25 * file_mb, f"loading a {file_mb:.0f} MB file grew anonymous memory by {grown:.0f} MB"
    assert model.transformer_blocks[1].img_mlp.net[2].weight.abs().sum() > 0


# ----------------------------------------------------------------------------- refusals


def test_plain_qwen_image_transformer_is_refused(tmp_path, tiny_reference, tiny_config):
    state = {k: v for k, v in tiny_reference.state_dict().items() if "addition_t_embedding" not in k}
    path = tmp_path / "qwen_image_bf16.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match="plain Qwen-Image.*not Qwen-Image-Layered") as err:
        load_mmdit(path)
    assert "qwen_image_bf16.safetensors" in str(err.value)
    assert "qwen_image_layered_bf16.safetensors" in str(err.value)


def test_truncated_file_is_named(tmp_path, tiny_reference, tiny_config):
    path = write("comfy", tmp_path, tiny_reference, tiny_config)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated file") as err:
        load_mmdit(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "content", [b"", b"hello world, not a model", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}....."]
)
def test_corrupt_file_is_named(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a (valid )?safetensors file") as err:
        load_mmdit(path)
    assert "broken.safetensors" in str(err.value)


def test_missing_shard_is_named(tmp_path, tiny_reference, tiny_config):
    folder = write("diffusers", tmp_path, tiny_reference, tiny_config)
    shards = sorted(folder.glob("*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing 1 of {len(shards)} shards: {shards[1].name}"):
        load_mmdit(folder)


@pytest.mark.parametrize("change", ["drop", "add"])
def test_wrong_key_set_is_named(change, tmp_path, tiny_reference, tiny_config):
    state = dict(tiny_reference.state_dict())
    if change == "drop":
        del state["transformer_blocks.1.attn.to_k.weight"]
        expected = r"1 missing tensors: transformer_blocks\.1\.attn\.to_k\.weight"
    else:
        state["transformer_blocks.0.extra_adapter.weight"] = torch.zeros(2, 2)
        expected = r"1 unexpected tensors: transformer_blocks\.0\.extra_adapter\.weight"
    path = save_mmdit(state, tmp_path / "m.safetensors", config=tiny_config)
    with pytest.raises(CheckpointError, match=expected):
        load_mmdit(path)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["LAYERED_PICKLE_MARKER"]),))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused_unopened(suffix, tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("LAYERED_PICKLE_MARKER", str(marker))
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"weights": _Boom()}))
    with pytest.raises(CheckpointError, match="pickle checkpoint; only .safetensors") as err:
        load_mmdit(path)
    assert path.name in str(err.value)
    assert not marker.exists()


def test_folder_of_pickles_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        load_mmdit(tmp_path)


def test_vae_file_given_to_transformer_loader(tmp_path):
    path = tmp_path / "qwen_image_layered_vae.safetensors"
    save_file(
        {"encoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3), "decoder.conv1.weight": torch.zeros(2, 2)}, str(path)
    )
    with pytest.raises(CheckpointError, match="holds a VAE, not a transformer"):
        load_mmdit(path)


def test_unsupported_quantisation_is_named(tmp_path, tiny_reference, tiny_config):
    path = write("fp8-comfy-quant", tmp_path, tiny_reference, tiny_config)
    tensors = load_file(str(path))
    key = "model.diffusion_model.transformer_blocks.0.attn.to_q.comfy_quant"
    tensors[key] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file(tensors, str(path), metadata={"layered_core.config": json.dumps(tiny_config.to_dict())})
    with pytest.raises(CheckpointError, match="quantised as 'nvfp4'"):
        load_mmdit(path)


# ----------------------------------------------------------------------------- VAE files


def _vae_files(tmp_path, reference, latents_mean=None):
    """The reference VAE as ComfyUI's single file (Wan names, 5D kernels) and as a diffusers folder."""

    comfy = tmp_path / "qwen_image_layered_vae.safetensors"
    save_file({k: v.contiguous() for k, v in wan_names_from_diffusers(reference.state_dict()).items()}, str(comfy))
    folder = tmp_path / "pipeline" / "vae"
    folder.mkdir(parents=True)
    config = dict(reference.config)
    if latents_mean is not None:
        config["latents_mean"] = latents_mean
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()},
        str(folder / "diffusion_pytorch_model.safetensors"),
    )
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    return comfy, folder


@pytest.fixture(scope="module")
def vae_reference():
    from .test_vae import make_reference

    return make_reference(seed=5)


@pytest.mark.parametrize("layout", ["comfy", "diffusers-folder", "pipeline-root"])
def test_vae_layouts_load_and_match_diffusers(layout, tmp_path, vae_reference):
    from .test_vae import reference_decode, reference_encode

    comfy, folder = _vae_files(tmp_path, vae_reference)
    path = {"comfy": comfy, "diffusers-folder": folder, "pipeline-root": folder.parent}[layout]
    vae = load_vae(path)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 4, 48, 80, generator=gen)
    latent = torch.randn(2, 16, 6, 10, generator=gen)
    got_latent, want_latent = vae.encode(image), reference_encode(vae_reference, image)
    got_image, want_image = vae.decode(latent), reference_decode(vae_reference, latent)
    assert relative_max_error(got_latent, want_latent) <= 1e-5
    assert relative_max_error(got_image, want_image) <= 1e-5


def test_vae_latent_stats_come_from_config(tmp_path, vae_reference):
    mean = [0.01 * i for i in range(16)]
    _, folder = _vae_files(tmp_path, vae_reference, latents_mean=mean)
    assert list(load_vae(folder).config.latents_mean) == mean


def test_three_channel_vae_is_refused(tmp_path):
    from .test_vae import make_reference

    rgb = make_reference(image_channels=3, seed=1)
    comfy, folder = _vae_files(tmp_path, rgb)
    for path in (comfy, folder):
        with pytest.raises(CheckpointError, match=r"3-channel.*Qwen-Image.*4-channel RGBA-VAE") as err:
            load_vae(path)
        assert "qwen_image_layered_vae.safetensors" in str(err.value) and str(path) in str(err.value)


def test_transformer_file_given_to_vae_loader(tmp_path, tiny_reference, tiny_config):
    path = write("comfy-prefixed", tmp_path, tiny_reference, tiny_config)
    with pytest.raises(CheckpointError, match="holds a Qwen-Image-Layered transformer, not a VAE"):
        load_vae(path)


def test_truncated_vae_is_named(tmp_path, vae_reference):
    comfy, _ = _vae_files(tmp_path, vae_reference)
    comfy.write_bytes(comfy.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated file"):
        load_vae(comfy)


def test_vae_with_missing_tensor_is_named(tmp_path, vae_reference):
    comfy, _ = _vae_files(tmp_path, vae_reference)
    tensors = load_file(str(comfy))
    del tensors["decoder.head.2.bias"]
    save_file(tensors, str(comfy))
    with pytest.raises(CheckpointError, match=r"decoder\.head\.2\.bias"):
        load_vae(comfy)
