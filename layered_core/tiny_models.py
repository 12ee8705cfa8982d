"""Tiny random model sets, built offline and deterministically from a seed.

Tests and ``python -m layered_core selftest`` need every component of a Qwen-Image-Layered folder
without the 54 GB of weights and without a model hub. Each part has an in-memory builder and a
writer that saves it in the layout of the real ``Qwen/Qwen-Image-Layered`` diffusers folder, so
the same files go through our loaders and through diffusers' ``from_pretrained``.

Writers are registered in :data:`TINY_WRITERS` (component name -> ``writer(folder, seed=...)``);
:func:`write_tiny_set` runs any subset of them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .atomic import new_file_mode
from .checkpoints import save_mmdit, save_vae
from .checkpoints.qwen_vl_release import (
    generation_config,
    image_processor,
    image_processor_config,
    mrope_section,
    vision_token_ids,
)
from .checkpoints.text_encoder import COMFY_FILE as COMFY_TEXT_ENCODER_FILE
from .checkpoints.text_encoder import is_written_here, save_text_encoder_file
from .mmdit import MMDiTConfig, VLDMMDiT
from .text import CAPTION_INSTRUCTIONS, ENCODE_TEMPLATE, TEMPLATE_PREFIX_TOKENS
from .vae import RGBAVAE, VAEConfig

logger = logging.getLogger(__name__)

# The Qwen2.5-VL special tokens, in the order the real vocabulary numbers them (151643 onwards).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Words a test prompt is likely to use, made whole tokens so short prompts stay short.
EXTRA_WORDS = (
    "a red cat sitting on blue sofa in front of white wall with green plant poster that says hello world "
    "A photo picture logo title sun sky tree house person dog"
)

# Real processor settings except the pixel budget: a 64x64 image gives 2x2 merged vision tokens and
# no image gives more than 4x4, so captioning a tiny image stays cheap.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


# --------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (what byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def _vocabulary_texts() -> list[str]:
    special = "|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS)
    texts = [ENCODE_TEMPLATE.replace("{}", " "), CAPTION_INSTRUCTIONS["en"], EXTRA_WORDS]
    return [piece for text in texts for piece in re.split(special, text) if piece]


def tiny_tokenizer():
    """A byte-level BPE tokenizer with the Qwen pre-tokenizer and special tokens, built in code.

    The vocabulary is the 256 byte symbols plus every word of the prompt template and the English
    caption instruction as a whole token (so the template prefix is 34 tokens, as with the real
    tokenizer), then the Qwen special tokens. Any text still encodes: unknown words fall back to bytes.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    alphabet = _byte_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    splitter = Qwen2Tokenizer(vocab=dict(vocab), merges=[])._tokenizer.pre_tokenizer
    words: list[str] = []
    for text in _vocabulary_texts():
        for word, _ in splitter.pre_tokenize_str(text):
            if word not in words:
                words.append(word)
    # Each word is built left to right, one merge per symbol, so BPE rebuilds it whole.
    for word in words:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[: end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
    )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])
    prefix = ENCODE_TEMPLATE.split("{}")[0]
    count = len(tokenizer(prefix).input_ids)
    if count != TEMPLATE_PREFIX_TOKENS:  # a property of the word list; guards edits to it
        raise RuntimeError(f"tiny tokenizer splits the template prefix into {count} tokens, expected 34")
    return tokenizer


def tiny_image_processor_config() -> dict:
    """preprocessor_config.json of the tiny set: the real Qwen2.5-VL one with a small pixel budget."""
    return image_processor_config(TINY_MIN_PIXELS, TINY_MAX_PIXELS)


def tiny_image_processor():
    """The image processor of the tiny set (torchvision backend when installed, else the PIL one)."""
    return image_processor(tiny_image_processor_config())


# --------------------------------------------------------------------------- Qwen2.5-VL


def tiny_qwen_vl_config(hidden_size: int = 48, tokenizer=None):
    """A 2-layer Qwen2.5-VL config (4 heads, 2 KV heads) with a 2-block vision tower."""
    from transformers import Qwen2_5_VLConfig

    if hidden_size % 8:
        raise ValueError(f"hidden_size must be a multiple of 8 (4 heads of an even size), got {hidden_size}")
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope_section(hidden_size // 4),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "out_hidden_size": hidden_size,
        },
        **vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Seeded noise in every parameter: norm weights around 1, the rest around 0.

    Larger than the usual 0.02 init so a tiny model's outputs depend visibly on every weight, which
    is what makes a parity test discriminating.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            is_norm = param.ndim == 1 and name.endswith("weight") and ("norm" in name or "ln_q" in name)
            param.copy_(1.0 + noise if is_norm else noise)
    return module


def tiny_text_encoder_set(hidden_size: int = 48, seed: int = 0):
    """(model, tokenizer, image_processor): a random tiny Qwen2.5-VL in float32 eval mode and its inputs' makers."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_tokenizer()
    config = tiny_qwen_vl_config(hidden_size, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    randomize_(model, seed)
    model.generation_config = generation_config(tokenizer)
    return model.eval().requires_grad_(False), tokenizer, tiny_image_processor()


def write_text_encoder_set(folder: str | Path, model, tokenizer) -> Path:
    """Save a text encoder set as ``text_encoder/`` (safetensors), ``tokenizer/`` and ``processor/`` under folder."""
    from transformers.utils import logging as transformers_logging

    folder = Path(folder)
    # save_pretrained draws a progress bar per file; a tiny set is written in milliseconds.
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder / "text_encoder")
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()
    # safetensors' save_file makes its files private (0600); these get what any new file gets, like the rest
    for path in (folder / "text_encoder").iterdir():
        os.chmod(path, new_file_mode())
    tokenizer.save_pretrained(folder / "tokenizer")
    processor = folder / "processor"
    tokenizer.save_pretrained(processor)
    image_config = tiny_image_processor_config()
    (processor / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2))
    # Loading the processor with a video backend installed looks for this file as well.
    video_config = {key: image_config[key] for key in image_config if key != "image_processor_type"}
    video_config["video_processor_type"] = "Qwen2VLVideoProcessor"
    (processor / "video_preprocessor_config.json").write_text(json.dumps(video_config, indent=2))
    return folder


def write_tiny_text_encoder(folder: str | Path, hidden_size: int = 48, seed: int = 0) -> Path:
    """Build the tiny text encoder set and save it under folder in the diffusers layout; returns folder."""
    model, tokenizer, _ = tiny_text_encoder_set(hidden_size, seed)
    return write_text_encoder_set(folder, model, tokenizer)


# --------------------------------------------------------------------------- sets


def tiny_transformer(seed: int = 0):
    """The tiny VLD-MMDiT (``MMDiTConfig.tiny()``) with seeded weights at PyTorch's default scales."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VLDMMDiT(MMDiTConfig.tiny()).eval().requires_grad_(False)


def tiny_vae(seed: int = 0):
    """The tiny RGBA-VAE (``VAEConfig.tiny()``) with seeded weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return RGBAVAE(VAEConfig.tiny()).eval().requires_grad_(False)


def write_tiny_transformer(folder: str | Path, seed: int = 0) -> Path:
    """``transformer/``: config.json + sharded safetensors + index, as in the real folder."""
    model = tiny_transformer(seed)
    return save_mmdit(model.state_dict(), Path(folder) / "transformer", layout="diffusers", config=model.config)


def write_tiny_vae(folder: str | Path, seed: int = 0) -> Path:
    """``vae/``: config.json (4 input channels, the latent statistics) + diffusers-named safetensors."""
    return save_vae(tiny_vae(seed), Path(folder) / "vae", layout="diffusers")


def write_model_index(folder: str | Path, seed: int = 0) -> Path:
    index = {
        "_class_name": "QwenImageLayeredPipeline",
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    path = Path(folder) / "model_index.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(index, indent=2))
    return path


# component name -> writer(folder, seed=...) saving that component in the diffusers folder layout.
TINY_WRITERS: dict[str, Callable[..., object]] = {
    "model_index": write_model_index,
    "transformer": write_tiny_transformer,
    "vae": write_tiny_vae,
    "text_encoder": write_tiny_text_encoder,
}


def write_tiny_set(folder: str | Path, components: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Write the named tiny components (all registered ones by default) under folder."""
    folder = Path(folder)
    names = list(TINY_WRITERS) if components is None else list(components)
    unknown = [name for name in names if name not in TINY_WRITERS]
    if unknown:
        raise ValueError(f"unknown tiny components {unknown}; known: {sorted(TINY_WRITERS)}")
    for name in names:
        logger.debug("writing tiny %s under %s", name, folder)
        TINY_WRITERS[name](folder, seed=seed)
    return folder


# The file names ComfyUI users hold (the Comfy-Org release), so shared workflows find the tiny set too.
COMFY_FILES = {
    "bf16": "diffusion_models/qwen_image_layered_bf16.safetensors",
    "fp8": "diffusion_models/qwen_image_layered_fp8mixed.safetensors",
    "vae": "vae/qwen_image_layered_vae.safetensors",
    "text_encoder": "text_encoders/Qwen2.5-VL-7B-Instruct-tiny",
    "text_encoder_file": COMFY_TEXT_ENCODER_FILE,
}


def write_comfy_models(models_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Tiny random models under ComfyUI's real file names in a ``models/`` folder: the transformer as
    the bf16 file and as the fp8mixed file (per-layer comfy_quant), the VAE in its Wan 3D layout, and
    a transformers Qwen2.5-VL folder (text_encoder/, tokenizer/, processor/) for this pack's text nodes, and the
    same text encoder as ComfyUI's fp8 single file (with its head). That file's tokenizer is the folder's: a real
    ComfyUI's own tokenizer has the full vocabulary, which the tiny model does not. A text-encoder file already
    there that this package did not write is left alone: Qwen-Image users hold the real one under that name."""
    models_dir = Path(models_dir)
    written = {}
    transformer = tiny_transformer(seed)
    for kind, layout in (("bf16", "comfy-prefixed"), ("fp8", "fp8-comfy-quant")):
        target = models_dir / COMFY_FILES[kind]
        written[kind] = save_mmdit(
            transformer.state_dict(), target, layout=layout, config=transformer.config, dtype=torch.bfloat16
        )
    written["vae"] = save_vae(tiny_vae(seed), models_dir / COMFY_FILES["vae"], layout="wan")
    text_encoder, tokenizer, _ = tiny_text_encoder_set(seed=seed)
    written["text_encoder"] = write_text_encoder_set(models_dir / COMFY_FILES["text_encoder"], text_encoder, tokenizer)
    target = models_dir / COMFY_FILES["text_encoder_file"]
    if target.exists() and not is_written_here(target):
        logger.warning("%s: already there and not a tiny file (the real text encoder?); left as it is", target)
    else:
        written["text_encoder_file"] = save_text_encoder_file(text_encoder, target, fp8=True)
    return written


def random_lora(
    weights: dict[str, torch.Tensor],
    targets: dict[str, tuple[str, str, float | None]],
    rank: int,
    generator: torch.Generator,
    weight_key: str = "{}.weight",
    alpha_key: Callable[[str, str], str] = lambda module, down_key: f"{module}.alpha",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A seeded rank-``rank`` LoRA for tests, and ``weights`` with it merged by hand at strength 1.

    ``targets`` maps each module to (down key, up key, alpha), the keys with ``{}`` for the module's name, in
    whichever naming the test exercises (diffusers/PEFT, kohya); ``weight_key`` finds the module's weight in
    ``weights`` (float32), ``alpha_key(module, down_key)`` names an alpha entry. Entries of up @ down are about 0.05,
    the size of a tiny model's weights: a change no rounding hides. Merged: W + (alpha / rank or 1) * up @ down."""
    lora, merged = {}, dict(weights)
    for module, (down_name, up_name, alpha) in targets.items():
        weight = weight_key.format(module)
        out_features, in_features = merged[weight].shape
        down = 0.25 * torch.randn(rank, in_features, generator=generator)
        up = 0.25 * torch.randn(out_features, rank, generator=generator)
        lora[down_name.format(module)], lora[up_name.format(module)] = down, up
        scale = 1.0
        if alpha is not None:
            lora[alpha_key(module, down_name.format(module))] = torch.tensor(alpha)
            scale = alpha / rank
        merged[weight] = merged[weight] + scale * (up @ down)
    return lora, merged
