"""The RGBA-VAE's checkpoints: Wan <-> diffusers key names, the 3D <-> 2D kernel conversion, reading and writing.

ComfyUI's single file ``vae/qwen_image_layered_vae.safetensors`` uses the original Wan names
(``encoder.conv1``, ``decoder.head.2``, ``conv1``/``conv2``, ``downsamples``, ``upsamples``, ``middle``); the
diffusers ``vae/`` folder uses ``conv_in``, ``conv_out``, ``quant_conv``/``post_quant_conv``, ``down_blocks``, ...
Both hold causal 3D kernels; :class:`~layered_core.vae.RGBAVAE` is 2D (see its module), so reading keeps
each kernel's last temporal tap and writing puts it back with zero earlier taps.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..vae import QWEN_IMAGE_LATENTS_MEAN, QWEN_IMAGE_LATENTS_STD, RGBA_VAE_HINT, RGBAVAE, VAEConfig
from .files import (
    CheckpointError,
    TensorSource,
    describe_keys,
    find_prefix,
    key_set_problems,
    name_some,
    open_checkpoint,
    save_safetensors,
)

log = logging.getLogger(__name__)

VAE_PREFIXES = ("first_stage_model.", "vae.")
FULL_VAE_FILES = "vae/qwen_image_layered_vae.safetensors or the vae/ folder of Qwen/Qwen-Image-Layered"

# Weights in the 3D checkpoint that a single frame never uses: the temporal resampling convs.
_TIME_CONV = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.time_conv\.(weight|bias)$")

_DIFFUSERS_MARKERS = ("encoder.conv_in.", "decoder.conv_in.", "encoder.down_blocks.", "decoder.up_blocks.")


def _is_diffusers_layout(keys) -> bool:
    return any(k.startswith(_DIFFUSERS_MARKERS) or k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys)


# The diffusers and Wan names of the same weights: one rule per line for both directions, first match wins.
# {part} is encoder or decoder, {rest} the rest of the name (copied), {block} the rest inside a residual block
# (renamed by _BLOCK_NAMES), {i} and {j} diffusers indices. Wan's index {n} is i * stride + offset with the
# rule's (stride, offset): stride "s" is up_stride, offset -1 the last slot of a level, offset "j" the index j.
_KEY_RULES = (
    ("quant_conv.{rest}", "conv1.{rest}", None),
    ("post_quant_conv.{rest}", "conv2.{rest}", None),
    ("{part}.conv_in.{rest}", "{part}.conv1.{rest}", None),
    ("{part}.norm_out.{rest}", "{part}.head.0.{rest}", None),
    ("{part}.conv_out.{rest}", "{part}.head.2.{rest}", None),
    ("{part}.mid_block.resnets.{i}.{block}", "{part}.middle.{n}.{block}", (2, 0)),
    ("{part}.mid_block.attentions.{i}.{rest}", "{part}.middle.{n}.{rest}", (2, 1)),
    ("{part}.down_blocks.{i}.{block}", "{part}.downsamples.{i}.{block}", None),
    ("{part}.up_blocks.{i}.upsamplers.0.{rest}", "{part}.upsamples.{n}.{rest}", ("s", -1)),
    ("{part}.up_blocks.{i}.resnets.{j}.{block}", "{part}.upsamples.{n}.{block}", ("s", "j")),
)
# Inside a residual block: (diffusers, Wan).
_BLOCK_NAMES = (
    ("norm1", "residual.0"),
    ("conv1", "residual.2"),
    ("norm2", "residual.3"),
    ("conv2", "residual.6"),
    ("conv_shortcut", "shortcut"),
)
_FIELDS = {"part": "encoder|decoder", "rest": ".+", "block": ".+", "i": r"\d+", "j": r"\d+", "n": r"\d+"}


def _compile(template: str) -> re.Pattern:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, ...
    return re.compile("".join(f"(?P<{p}>{_FIELDS[p]})" if k % 2 else re.escape(p) for k, p in enumerate(pieces)))


_RULES = [(_compile(diffusers), diffusers, _compile(wan), wan, index) for diffusers, wan, index in _KEY_RULES]


def _rename_key(key: str, up_stride: int, to_wan: bool) -> str:
    """``key`` renamed by the first rule of _KEY_RULES that matches it; keys none matches come back unchanged."""
    block_names = _BLOCK_NAMES if to_wan else [(wan, diffusers) for diffusers, wan in _BLOCK_NAMES]
    for diffusers_pattern, diffusers, wan_pattern, wan, index in _RULES:
        pattern, target = (diffusers_pattern, wan) if to_wan else (wan_pattern, diffusers)
        if not (m := pattern.fullmatch(key)):
            continue
        fields = m.groupdict()
        if index:
            stride, offset = index
            stride = up_stride if stride == "s" else stride
            if to_wan:
                fields["n"] = int(fields["i"]) * stride + (int(fields["j"]) if offset == "j" else offset % stride)
            else:
                fields["i"], fields["j"] = divmod(int(fields["n"]), stride)
                if offset != "j" and fields["j"] != offset % stride:
                    continue  # another rule's slot
        if "block" in fields:
            for old, new in block_names:
                if fields["block"].startswith(old + "."):
                    fields["block"] = new + fields["block"][len(old) :]
                    break
        return target.format(**fields)
    return key


def wan_key_from_diffusers(key: str, up_stride: int) -> str:
    """The Wan name of one diffusers-named VAE key; keys it does not know come back unchanged.

    ``up_stride`` is the number of Wan ``decoder.upsamples`` entries per decoder level: num_res_blocks + 2.
    """
    return _rename_key(key, up_stride, to_wan=True)


def wan_names_from_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKLQwenImage`` state dict to the original Wan names (tensors untouched)."""
    resnets = [int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))]
    up_stride = max(resnets, default=0) + 2
    return {wan_key_from_diffusers(k, up_stride): v for k, v in state_dict.items()}


def diffusers_key_from_wan(key: str, up_stride: int) -> str:
    """The diffusers name of one Wan-named VAE key (inverse of :func:`wan_key_from_diffusers`)."""
    return _rename_key(key, up_stride, to_wan=False)


# Wan modules that are causal 3D convolutions in the released checkpoints (the rest are 2D convolutions).
_CONV3D = re.compile(r"^(conv[12]|(encoder|decoder)\.(conv1|head\.2|.*\.residual\.[26]|.*\.shortcut))\.weight$")


def checkpoint_state_dict(model: RGBAVAE, layout: str = "wan") -> dict[str, torch.Tensor]:
    """This 2D model's weights in the released 3D layout: ``"wan"`` (ComfyUI's single file) or
    ``"diffusers"`` (the ``vae/`` folder of Qwen/Qwen-Image-Layered).

    A 3x3 kernel becomes a 3x3x3 one whose earlier temporal taps are zero, and the temporal resamplers
    get zero weights: on a single frame (the only input this model sees) the 3D network computes
    exactly what this one does.
    """
    if layout not in ("wan", "diffusers"):
        raise ValueError(f"layout must be 'wan' or 'diffusers', got {layout!r}")
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if _CONV3D.match(key):
            taps = value.shape[-1]
            kernel = value.new_zeros(*value.shape[:2], taps, *value.shape[2:])
            kernel[:, :, -1] = value
            value = kernel
        elif key.endswith(".gamma") and ".middle.1." not in key:
            value = value.reshape(-1, 1, 1, 1)
        out[key] = value
    levels = len(config.dim_mult)
    dims = [config.base_dim * m for m in config.dim_mult]
    stride = config.num_res_blocks + 1
    # Qwen-Image's temporal layout: the encoder's last two downsamplers and the decoder's first two
    # upsamplers are the 3D ones.
    for level in range(1, levels - 1):
        index = level * stride + config.num_res_blocks
        dim = dims[level]
        out[f"encoder.downsamples.{index}.time_conv.weight"] = torch.zeros(dim, dim, 3, 1, 1)
        out[f"encoder.downsamples.{index}.time_conv.bias"] = torch.zeros(dim)
    up_stride = config.num_res_blocks + 2
    decoder_dims = [config.base_dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
    for level in range(min(2, levels - 1)):
        dim = decoder_dims[level + 1]
        index = level * up_stride + up_stride - 1
        out[f"decoder.upsamples.{index}.time_conv.weight"] = torch.zeros(2 * dim, dim, 3, 1, 1)
        out[f"decoder.upsamples.{index}.time_conv.bias"] = torch.zeros(2 * dim)
    if layout == "diffusers":
        out = {diffusers_key_from_wan(k, up_stride): v for k, v in out.items()}
    return out


def _wan_names(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return wan_names_from_diffusers(state_dict) if _is_diffusers_layout(state_dict) else state_dict


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"not a Qwen-Image RGBA-VAE state dict: key {key!r} is missing "
            f"({len(state_dict)} keys, e.g. {name_some(state_dict, 3)})"
        )
    return state_dict[key]


def _infer_shape(sd: Mapping[str, torch.Tensor]) -> dict:
    """VAEConfig's shape fields from a Wan-named state dict."""
    conv_in = _require(sd, "encoder.conv1.weight")
    image_channels = conv_in.shape[1]
    if image_channels == 3:
        raise ValueError(
            "this is the 3-channel (RGB) Qwen-Image / Wan 2.1 VAE (encoder.conv1 takes 3 channels); " + RGBA_VAE_HINT
        )
    base_dim = conv_in.shape[0]
    z_dim = _require(sd, "decoder.conv1.weight").shape[1]
    encoder_blocks = 1 + max(
        (int(m[1]) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))), default=-1
    )
    decoder_blocks = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.upsamples\.(\d+)\.", k))), default=-1)
    # Per level the encoder has R resnets plus a downsampler and the decoder R + 1 resnets plus an upsampler,
    # the last level without one: E = L * R + L - 1 and D = L * (R + 1) + L - 1, so D - E = L.
    levels = decoder_blocks - encoder_blocks
    if levels < 1 or (encoder_blocks + 1) % levels or (encoder_blocks + 1) // levels < 2:
        raise ValueError(
            f"not a Wan-style VAE layout: {encoder_blocks} encoder.downsamples and {decoder_blocks} "
            "decoder.upsamples entries do not fit L levels of R residual blocks"
        )
    num_res_blocks = (encoder_blocks + 1) // levels - 1
    dim_mult = []
    for level in range(levels):
        width = _require(sd, f"encoder.downsamples.{level * (num_res_blocks + 1)}.residual.2.weight").shape[0]
        if width % base_dim:
            raise ValueError(f"encoder level {level} has {width} channels, not a multiple of base_dim {base_dim}")
        dim_mult.append(width // base_dim)
    return {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": tuple(dim_mult),
        "num_res_blocks": num_res_blocks,
        "image_channels": image_channels,
    }


def vae_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], latents_mean=None, latents_std=None
) -> VAEConfig:
    """Infer the VAEConfig of a checkpoint (Wan or diffusers names, 5D or 4D kernels) from tensor shapes.

    latents_mean / latents_std: the checkpoint's config values if it has them; default Qwen-Image's.
    Raises ValueError for the 3-channel Qwen-Image / Wan 2.1 VAE and for state dicts that are not a VAE.
    """
    shape = _infer_shape(_wan_names(state_dict))
    z_dim = shape["z_dim"]
    if (latents_mean is None or latents_std is None) and z_dim != len(QWEN_IMAGE_LATENTS_MEAN):
        raise ValueError(f"the VAE has z_dim={z_dim}; pass latents_mean and latents_std with {z_dim} values each")
    return VAEConfig(
        **shape,
        latents_mean=QWEN_IMAGE_LATENTS_MEAN if latents_mean is None else tuple(float(v) for v in latents_mean),
        latents_std=QWEN_IMAGE_LATENTS_STD if latents_std is None else tuple(float(v) for v in latents_std),
    )


def convert_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an RGBA-VAE checkpoint to this module's 2D, Wan-named state dict.

    Accepts ComfyUI's single file (Wan names, 5D kernels) or a diffusers ``vae/`` folder's weights
    (``conv_in``, ``down_blocks``, ``quant_conv``, ...), with 5D or 4D kernels. 3D kernels keep their last
    temporal slice, RMS gammas become (C, 1, 1), and the ``time_conv`` weights are dropped. Missing,
    unexpected or misshapen keys raise ValueError naming them.
    """
    sd = _wan_names(state_dict)
    shape = _infer_shape(sd)
    # The latent statistics do not change any tensor's shape; neutral ones let any z_dim through here.
    config = VAEConfig(**shape, latents_mean=(0.0,) * shape["z_dim"], latents_std=(1.0,) * shape["z_dim"])
    expected = {k: v.shape for k, v in RGBAVAE(config, device="meta").state_dict().items()}

    converted, unused = {}, []
    for key, value in sd.items():
        if m := _TIME_CONV.match(key):
            if f"{m[1]}.{m[2]}.resample.1.weight" in expected:
                unused.append(key)
                continue
        if value.ndim == 5:
            value = value[:, :, -1].contiguous()
        elif key.endswith(".gamma"):
            value = value.reshape(-1, 1, 1)
        converted[key] = value

    if problems := key_set_problems(expected, converted):
        raise ValueError(f"RGBA-VAE state dict does not match the model ({config}): {problems}")
    misshapen = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in converted.items() if v.shape != expected[k]
    ]
    if misshapen:
        raise ValueError(f"RGBA-VAE state dict has {len(misshapen)} misshapen tensors: {', '.join(misshapen[:5])}")
    log.debug("RGBA-VAE conversion dropped %d unused time_conv tensors", len(unused))
    return converted


def vae_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    latents_mean=None,
    latents_std=None,
    dtype=None,
    device=None,
    operations=None,
) -> RGBAVAE:
    """An :class:`RGBAVAE` built on the meta device with a checkpoint's tensors assigned, in either layout
    (see :func:`convert_vae_state_dict`)."""
    converted = convert_vae_state_dict(state_dict)
    config = vae_config_from_state_dict(converted, latents_mean=latents_mean, latents_std=latents_std)
    model = RGBAVAE(config, dtype=dtype, device="meta", operations=operations)
    converted = {k: v.to(device=device, dtype=dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def vae_prefix(source: TensorSource) -> str | None:
    """The tensor-name prefix ("" or one of :data:`VAE_PREFIXES`) if ``source`` holds an encoder and a decoder,
    else None."""
    keys = source.keys()
    prefix = find_prefix(keys, VAE_PREFIXES, "decoder.")
    halves = (f"{prefix}encoder.", f"{prefix}decoder.")
    return prefix if all(any(k.startswith(half) for k in keys) for half in halves) else None


def vae_shape(source: TensorSource, prefix: str = "") -> dict:
    """The VAE's layout ("wan" or "diffusers") and shape (:class:`VAEConfig`'s shape fields) from the
    checkpoint's tensor table alone: no tensor is read. ValueError when it is not a Wan-style RGBA-VAE (for the
    3-channel Qwen-Image VAE, saying so)."""
    # meta tensors: the shapes without the data, which is all the inference looks at
    shapes = {
        k[len(prefix) :]: torch.empty(source.shapes[k], device="meta") for k in source.keys() if k.startswith(prefix)
    }
    layout = "diffusers" if _is_diffusers_layout(shapes) else "wan"
    return {"layout": layout, **_infer_shape(_wan_names(shapes))}


def load_vae(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", operations=None
):
    """Load the RGBA-VAE from the ComfyUI single file (Wan names) or a diffusers folder."""
    source = open_checkpoint(path, component="vae")
    keys = source.keys()
    prefix = vae_prefix(source)
    if prefix is None:
        raise CheckpointError(
            source.location, f"this file holds {describe_keys(keys)}, not a VAE; it needs {FULL_VAE_FILES}"
        )
    stats = {}
    if source.config is not None:
        if source.config.get("input_channels", 4) != 4:
            raise CheckpointError(
                source.location / "config.json",
                f"input_channels is {source.config.get('input_channels')}: this is the 3-channel Qwen-Image VAE; "
                f"Qwen-Image-Layered needs the 4-channel RGBA-VAE ({FULL_VAE_FILES})",
            )
        stats = {k: source.config[k] for k in ("latents_mean", "latents_std") if k in source.config}
    raw = {k[len(prefix) :]: source.get(k) for k in keys if k.startswith(prefix)}
    try:
        model = vae_from_state_dict(raw, **stats, dtype=dtype, device=device, operations=operations)
    except ValueError as e:
        raise CheckpointError(source.location, str(e)) from None
    finally:
        source.close()
    return model.requires_grad_(False)


def save_vae(model: RGBAVAE, path: str | os.PathLike, layout: str = "wan") -> Path:
    """Write the RGBA-VAE in a released layout: ``"wan"``, ComfyUI's single file
    (``vae/qwen_image_layered_vae.safetensors``), or ``"diffusers"``, a ``vae/`` folder with config.json."""
    path = Path(path)
    tensors = checkpoint_state_dict(model, layout)
    if layout == "wan":
        return save_safetensors(tensors, path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    diffusers_config = {
        "_class_name": "AutoencoderKLQwenImage",
        "base_dim": config.base_dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_scales": [],
        # the encoder levels whose downsamplers are temporal in the 3D checkpoint (checkpoint_state_dict)
        "temperal_downsample": [level > 0 for level in range(len(config.dim_mult) - 1)],
        "dropout": 0.0,
        "input_channels": config.image_channels,
        "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
    }
    atomic_write_text(path / "config.json", json.dumps(diffusers_config, indent=2))
    save_safetensors(tensors, path / "diffusion_pytorch_model.safetensors")
    return path
