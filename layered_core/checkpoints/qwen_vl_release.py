"""What the Qwen2.5-VL-7B-Instruct release ships beside its weights, for the checkpoints that carry only weights.

A transformers folder has config.json, generation_config.json and preprocessor_config.json; ComfyUI's single file
(``text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors``) has tensors alone. The settings here are the release's
own, so a model read from that file captions and encodes as the folder's model does. The tiny test models use
the same functions with their own sizes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# Settings no tensor shape gives, as the 7B sets them.
HEAD_DIM = 128
VISION_HEAD_DIM = 80  # 1280 wide, 16 heads
WINDOW_SIZE = 112
# The vision tower attends across the whole image in the last block of every group of this many, windowed
# elsewhere (blocks 7, 15, 23 and 31 of the 7B's 32).
FULL_ATTENTION_EVERY = 8
ROPE_THETA = 1000000.0
RMS_NORM_EPS = 1e-6
MAX_POSITION_EMBEDDINGS = 128000
TOKENS_PER_SECOND = 2

# The image processor of preprocessor_config.json: CLIP's normalisation, 14-pixel patches merged 2x2.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The special tokens whose ids the config holds; a tokenizer gives their ids (its vocabulary numbers them).
END_OF_TEXT = "<|endoftext|>"
END_OF_TURN = "<|im_end|>"
VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def full_attention_blocks(depth: int) -> list[int]:
    """The vision blocks that attend across the whole image, in the 7B's pattern, for a tower ``depth`` deep."""
    return [index for index in range(depth) if index % FULL_ATTENTION_EVERY == FULL_ATTENTION_EVERY - 1]


def mrope_section(head_dim: int) -> list[int]:
    """The multimodal rotary split of a head's rotary pairs into (time, height, width): a quarter for time and
    three eighths for each image axis, the 7B's [16, 24, 24] of 64 pairs."""
    pairs = head_dim // 2
    spatial = pairs * 3 // 8
    return [pairs - 2 * spatial, spatial, spatial]


def token_id(tokenizer, token: str) -> int:
    """The id of a Qwen special token; KeyError when the tokenizer does not have it as one token."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise KeyError(token)
    return ids[0]


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The config's image and video token ids in ``tokenizer``'s vocabulary (keyword arguments of
    Qwen2_5_VLConfig); KeyError naming a token the tokenizer does not have as one token."""
    return {name: token_id(tokenizer, token) for name, token in VISION_TOKENS.items()}


def generation_config(tokenizer):
    """generation_config.json of the release: sampling at top_k 1 (so it picks the argmax), repetition penalty
    1.05, ending at ``<|im_end|>`` or ``<|endoftext|>``."""
    from transformers import GenerationConfig

    end_of_text = token_id(tokenizer, END_OF_TEXT)
    return GenerationConfig(
        bos_token_id=end_of_text,
        pad_token_id=end_of_text,
        eos_token_id=[token_id(tokenizer, END_OF_TURN), end_of_text],
        do_sample=True,
        top_k=1,
        top_p=0.001,
        temperature=0.1,
        repetition_penalty=1.05,
    )


def image_processor_config(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> dict:
    """preprocessor_config.json of the release; the pixel budget can be changed (the tiny set's is small)."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "merge_size": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "resample": 3,
        "rescale_factor": 1 / 255,
    }


def image_processor(config: dict | None = None):
    """The image processor of ``config`` (the release's by default), with the backend a processor/ folder gets
    (torchvision's when installed, else PIL's)."""
    from transformers import AutoImageProcessor

    # Loading from a config file picks the backend the same way a real processor/ folder does.
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(config or image_processor_config()))
        return AutoImageProcessor.from_pretrained(folder, local_files_only=True)
