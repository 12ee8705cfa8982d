"""Text conditioning with Qwen2.5-VL: prompt embeddings for the MMDiT, and the auto-caption.

The prompt goes through the chat template Qwen-Image-Layered was trained with; the last hidden
state of the language model is kept for every token after the template's 34-token system/user
prefix (the prompt and the closing ``<|im_end|>\\n<|im_start|>assistant\\n``). This is the
reference's ``encode_prompt``, number for number.

The caption is what the reference pipeline writes when the prompt is empty: Qwen2.5-VL is asked,
with a fixed image-annotator instruction (English or Chinese), to describe the resized input image.

Loading reads a diffusers folder (``text_encoder/`` + ``tokenizer/`` + optional ``processor/``),
its ``text_encoder/`` folder, a single folder holding model and tokenizer files (the layout of
``Qwen/Qwen2.5-VL-7B-Instruct``), or ComfyUI's single file ``qwen_2.5_vl_7b_fp8_scaled.safetensors`` with a
tokenizer from elsewhere (:mod:`.checkpoints.text_encoder`). Only safetensors weights are read, never from a hub.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .caption import GreedyDecoder, GreedyDecoderUnavailable, greedy_settings
from .checkpoints import qwen_vl_release
from .checkpoints.files import PICKLE_SUFFIXES, CheckpointError, read_safetensors_header
from .checkpoints.text_encoder import (
    NO_HEAD,
    check_text_encoder_file,
    find_tokenizer,
    has_tokenizer,
    load_text_encoder_file,
)

logger = logging.getLogger(__name__)

ENCODE_TEMPLATE = (
    "<|im_start|>system\n"
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
    "objects and background:<|im_end|>\n"
    "<|im_start|>user\n"
    "{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# The system turn and "<|im_start|>user\n" are 34 Qwen tokens; the model was trained without them.
TEMPLATE_PREFIX_TOKENS = 34
MAX_SEQUENCE_LENGTH = 1024
IMAGE_PLACEHOLDER = "<|image_pad|>"
CAPTION_MAX_NEW_TOKENS = 512
# More than either caption instruction's text tokens (the English one is about 290 with Qwen's tokenizer); the
# image brings tokens of its own.
CAPTION_INSTRUCTION_TOKENS = 512

# The reference's caption instructions, reproduced exactly (their line breaks included) because they
# are what the model was prompted with.
CAPTION_INSTRUCTIONS = {
    "en": (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "# Image Annotator\n"
        "You are a professional\n"
        "image annotator. Please write an image caption based on the input image:\n"
        "1. Write the caption using natural,\n"
        "descriptive language without structured formats or rich text.\n"
        "2. Enrich caption details by including: \n"
        " - Object\n"
        "attributes, such as quantity, color, shape, size, material, state, position, actions, and so on\n"
        " - Vision Relations\n"
        "between objects, such as spatial relations, functional relations, possessive relations, attachment "
        "relations, action\n"
        "relations, comparative relations, causal relations, and so on\n"
        " - Environmental details, such as weather, lighting,\n"
        "colors, textures, atmosphere, and so on\n"
        " - Identify the text clearly visible in the image, without translation or\n"
        "explanation, and highlight it in the caption with quotation marks\n"
        "3. Maintain authenticity and accuracy:\n"
        " - Avoid\n"
        "generalizations\n"
        " - Describe all visible information in the image, while do not add information not explicitly shown in\n"
        "the image\n"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "zh": (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "# 图像标注器\n"
        "你是一个专业的图像标注器。请基于输入图像，撰写图注:\n"
        "1.\n"
        "使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n"
        "2. 通过加入以下内容，丰富图注细节：\n"
        " - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n"
        " -\n"
        "对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n"
        " - 环境细节：例如天气、光照、颜色、纹理、气氛等\n"
        " - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n"
        "3.\n"
        "保持真实性与准确性：\n"
        " - 不要使用笼统的描述\n"
        " -\n"
        "描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}

WEIGHT_INDEX = "model.safetensors.index.json"


def text_encoder_tokens(max_sequence_length: int, caption: bool = False) -> int:
    """The most text tokens in one sequence of the text encoder: a prompt of ``max_sequence_length`` tokens after
    the template's prefix, or with ``caption`` also a caption's instruction and the words it writes (its image
    brings tokens of its own)."""
    prompt = TEMPLATE_PREFIX_TOKENS + max_sequence_length
    return max(prompt, CAPTION_INSTRUCTION_TOKENS + CAPTION_MAX_NEW_TOKENS) if caption else prompt


def mask_or_none(mask: torch.Tensor) -> torch.Tensor | None:
    """None when every token is kept (what the reference passes on then), else the mask itself."""
    return None if bool(mask.all()) else mask


@dataclass
class PromptEncoder:
    """A Qwen2.5-VL model with what turns text and images into its inputs.

    ``tokenizer`` encodes prompts (the diffusers folder's ``tokenizer/``). Captions need
    ``image_processor`` and use ``caption_tokenizer`` (both from ``processor/``; the tokenizer falls
    back to ``tokenizer``). From a transformers processor, pass its ``image_processor`` and ``tokenizer``.
    ``fast_caption`` False captions through transformers' ``generate`` instead of the greedy decoder of
    ``caption.py`` (slower; the same tokens, but in bf16 on CUDA, where the decoder's attention rounds otherwise).
    ``compile_caption`` compiles the decoder's step (``GreedyDecoder(compile_step=True)``: faster per token after
    a compilation on the first caption; :func:`.compile_policy.caption_compile_choice` says when that pays).
    """

    model: Any  # transformers.Qwen2_5_VLForConditionalGeneration
    tokenizer: Any
    image_processor: Any | None = None
    caption_tokenizer: Any | None = None
    source: str = "<in memory>"
    fast_caption: bool = True
    compile_caption: bool = False
    # its key/value cache and CUDA graph are kept for the next caption
    _decoder: GreedyDecoder | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        prefix = ENCODE_TEMPLATE.split("{}")[0]
        count = len(self.tokenizer(prefix).input_ids)
        if count != TEMPLATE_PREFIX_TOKENS:
            # Dropping 34 tokens is only right for Qwen's vocabulary; another tokenizer gives other embeddings.
            logger.warning(
                "%s: the tokenizer splits the prompt template's prefix into %d tokens, not the %d of the Qwen2.5-VL "
                "tokenizer; embeddings will not be those the model was trained with",
                self.source,
                count,
                TEMPLATE_PREFIX_TOKENS,
            )

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings (3584 for Qwen2.5-VL-7B, the MMDiT's text_dim)."""
        return self.model.config.text_config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def encode(
        self, prompts: str | list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH, truncate: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings (B, L, hidden) in the model's dtype and a boolean mask (B, L).

        L is the longest prompt's token count; shorter rows are zero-padded and masked out. The mask
        is all True when no row is padded; ``mask_or_none`` turns that into the reference's None.
        A prompt longer than ``max_sequence_length`` tokens (at most 1024) raises ValueError, unless
        ``truncate`` keeps its first ``max_sequence_length`` tokens as the reference pipeline does
        (its ``__call__`` truncates at 512 by default).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be in 1..{MAX_SEQUENCE_LENGTH}, got {max_sequence_length}")
        tokens = self.tokenizer([ENCODE_TEMPLATE.format(p) for p in prompts], padding=True, return_tensors="pt")
        token_mask = tokens.attention_mask.bool()
        lengths = token_mask.sum(dim=1) - TEMPLATE_PREFIX_TOKENS
        if not truncate and bool((lengths > max_sequence_length).any()):
            index = int(lengths.argmax())
            raise ValueError(
                f"prompt {index} is {int(lengths[index])} tokens long with the template's closing tokens; at most "
                f"{max_sequence_length} are used. Shorten it, or pass truncate=True to keep the first "
                f"{max_sequence_length} tokens."
            )

        # The bare Qwen2.5-VL model skips the language-model head: its (tokens x 152k) logits would be
        # the largest tensor of the call and are not used.
        hidden = self.model.model(
            input_ids=tokens.input_ids.to(self.device),
            attention_mask=tokens.attention_mask.to(self.device),
            use_cache=False,
        ).last_hidden_state

        lengths = lengths.clamp(max=max_sequence_length)
        width = int(lengths.max())
        embeddings = hidden.new_zeros(len(prompts), width, hidden.shape[-1])
        for row, keep in enumerate(token_mask.to(hidden.device)):
            kept = hidden[row][keep][TEMPLATE_PREFIX_TOKENS:][:width]
            embeddings[row, : kept.shape[0]] = kept
        mask = torch.arange(width) < lengths[:, None]
        return embeddings, mask.to(hidden.device)

    @torch.inference_mode()
    def caption(self, image, language: str = "en", max_new_tokens: int = CAPTION_MAX_NEW_TOKENS) -> str:
        """The reference's auto-caption of a PIL image: greedy decoding, special tokens dropped, stripped.

        Pass the image already resized to the decomposition bucket, as the reference does; alpha is
        left to the image processor (transformers 5.23 composites it onto white). With Qwen2.5-VL's
        sampling settings (top_k 1) the reference's sampling picks the argmax every step, so greedy
        decoding with the model's other settings (its repetition penalty) gives the same text
        without drawing random numbers.
        """
        if language not in CAPTION_INSTRUCTIONS:
            raise ValueError(f"language must be one of {sorted(CAPTION_INSTRUCTIONS)}, got {language!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if self.image_processor is None:
            raise ValueError(
                f"{self.source}: captioning needs the image processor (processor/preprocessor_config.json), "
                "and none was loaded; pass a prompt instead or load a folder that has processor/"
            )
        inputs = {name: value.to(self.device) for name, value in self.caption_inputs(image, language).items()}
        tokens = self.caption_tokens(inputs, self.greedy_config(max_new_tokens))
        tokenizer = self.caption_tokenizer or self.tokenizer
        text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
        if not text:
            logger.warning("%s: the caption came out empty", self.source)
        return text

    def release_caption_state(self) -> None:
        """Drop the caption decoder's key/value cache and CUDA graphs, which hold device memory: for when the model
        leaves the device (the next caption builds them again)."""
        self._decoder = None

    @torch.inference_mode()
    def caption_tokens(self, inputs: dict[str, torch.Tensor], generation_config) -> torch.Tensor:
        """The new tokens (1-D, on the CPU) of ``model.generate(**inputs, generation_config=generation_config)``
        after the prompt, end token included where one was reached: through the greedy decoder where it computes
        generate's step (its tokens are generate's but for bf16 rounding on CUDA, see ``caption.py``), else through
        generate, saying why in the log."""
        try:
            if not self.fast_caption:
                raise GreedyDecoderUnavailable("fast_caption is off")
            settings = greedy_settings(self.model, generation_config, inputs)
            decoder = self._decoder
            if decoder is None or decoder.model is not self.model or decoder.compile_step != self.compile_caption:
                self._decoder = GreedyDecoder(self.model, compile_step=self.compile_caption)
            return self._decoder.generate(inputs, settings)
        except GreedyDecoderUnavailable as reason:
            logger.info("%s: captioning through transformers' generate: %s", self.source, reason)
        generated = self.model.generate(**inputs, generation_config=generation_config)
        return generated[0, inputs["input_ids"].shape[1] :].cpu()

    def caption_inputs(self, image, language: str = "en") -> dict[str, torch.Tensor]:
        """The model inputs of a caption request, as the Qwen2-VL processor builds them for one image.

        Built here from the image processor and tokenizer because transformers' processor class
        cannot be made without torchvision, which this package does not need otherwise.
        """
        features = self.image_processor(images=[image], return_tensors="pt")
        grid = features["image_grid_thw"]
        merge = self.image_processor.merge_size
        placeholders = int(grid[0].prod()) // (merge * merge)
        text = CAPTION_INSTRUCTIONS[language].replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * placeholders, 1)
        tokens = (self.caption_tokenizer or self.tokenizer)(text, return_tensors="pt")
        inputs = {
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
            "pixel_values": features["pixel_values"],
            "image_grid_thw": grid,
        }
        # transformers 5 places the image tokens' 3D rotary positions from this; without it they would get
        # plain text positions. Versions whose forward takes no such argument get none.
        if "mm_token_type_ids" in inspect.signature(self.model.forward).parameters:
            inputs["mm_token_type_ids"] = (tokens.input_ids == self.model.config.image_token_id).long()
        return inputs

    def greedy_config(self, max_new_tokens: int):
        """The model's generation config for a caption: greedy (see :meth:`caption`), its other settings kept."""
        config = copy.deepcopy(self.model.generation_config)
        config.do_sample = False
        # Neutral values rather than None: generate() fills None from the model's sampling settings.
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
        config.num_beams = 1
        config.max_new_tokens = max_new_tokens
        config.max_length = None
        if config.pad_token_id is None:
            config.pad_token_id = (self.caption_tokenizer or self.tokenizer).pad_token_id
        return config


# --------------------------------------------------------------------------- loading


NO_PROCESSOR = "no processor/ (preprocessor_config.json) beside text_encoder/ and tokenizer/"


@dataclass(frozen=True)
class TextEncoderFolders:
    """Where a text encoder's parts are: the model (a folder with config.json + safetensors, or ComfyUI's single
    file), the tokenizer, the image processor (None: a folder has none, a single file uses the release's
    settings), and why captions cannot be made (None when they can)."""

    model: Path
    tokenizer: Path
    processor: Path | None
    caption_problem: str | None = None


def find_text_encoder(path: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None) -> TextEncoderFolders:
    """The parts of the text encoder at ``path`` (see :func:`load_text_encoder`), checked without loading
    anything: the config is Qwen2.5-VL's, the weights are readable safetensors, a tokenizer is there.
    ``tokenizer_folder`` is where a single file's tokenizer is (see :func:`~.checkpoints.text_encoder.find_tokenizer`).
    Raises :class:`CheckpointError` naming the folder or file."""
    path = Path(path)
    if path.is_file():
        shape = check_text_encoder_file(path)
        tokenizer_dir, processor_dir = find_tokenizer(path, tokenizer_folder)
        return TextEncoderFolders(path, tokenizer_dir, processor_dir, None if shape.has_lm_head else NO_HEAD)
    model_dir, tokenizer_dir, processor_dir = _locate(path)
    if tokenizer_dir is None:
        raise CheckpointError(
            path,
            f"no tokenizer: expected {model_dir.parent / 'tokenizer'} (or the text encoder folder itself) to hold "
            "tokenizer.json or vocab.json + merges.txt",
        )
    _check_text_encoder_folder(model_dir)
    return TextEncoderFolders(model_dir, tokenizer_dir, processor_dir, None if processor_dir else NO_PROCESSOR)


def _locate(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(text_encoder folder, tokenizer folder or None, processor folder or None) for a user's path."""
    if not path.exists():
        raise CheckpointError(
            path,
            "folder not found; expected a Qwen-Image-Layered diffusers folder (text_encoder/, tokenizer/, processor/) "
            "or its text_encoder/ folder",
        )
    if not path.is_dir():
        raise CheckpointError(
            path,
            "not a folder or a file; the text encoder loads from a diffusers folder (text_encoder/ + tokenizer/), its "
            "text_encoder/ folder, or ComfyUI's single file",
        )
    if (path / "text_encoder").is_dir():
        model_dir, siblings = path / "text_encoder", path
    elif (path / "config.json").is_file():
        model_dir, siblings = path, path.parent
    else:
        raise CheckpointError(
            path,
            "neither a text_encoder/ subfolder nor a config.json here; expected a Qwen-Image-Layered diffusers "
            "folder or its text_encoder/ folder",
        )
    tokenizer_dir = next((d for d in (siblings / "tokenizer", model_dir) if has_tokenizer(d)), None)
    processor_dir = next(
        (d for d in (siblings / "processor", model_dir) if (d / "preprocessor_config.json").is_file()), None
    )
    return model_dir, tokenizer_dir, processor_dir


def _check_text_encoder_folder(folder: Path) -> None:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(folder, "no config.json; expected the Qwen2.5-VL config of the text encoder")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(config_path, f"unreadable config ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "qwen2_5_vl":
        raise CheckpointError(
            config_path,
            f"model_type is {model_type!r}, expected 'qwen2_5_vl' (Qwen2.5-VL-7B-Instruct, the text encoder of "
            "Qwen-Image-Layered)",
        )

    index = folder / WEIGHT_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(index, f"unreadable shard index ({type(e).__name__}: {e})") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise CheckpointError(index, f"lists shards that are not in the folder: {', '.join(missing)}")
        weights = sorted(folder / s for s in shards)
    else:
        weights = sorted(folder.glob("*.safetensors"))
    if weights:
        # Truncated downloads and non-safetensors files are named here instead of failing inside transformers.
        for weight in weights:
            read_safetensors_header(weight)
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            folder / pickles[0],
            "is a pickle checkpoint and there are no .safetensors weights; only safetensors are loaded, because "
            "unpickling a file can run arbitrary code. Use the safetensors release of the text encoder.",
        )
    raise CheckpointError(folder, "no weights: expected model.safetensors or model.safetensors.index.json + shards")


def _load_part(what: str, cls, folder: Path, **kwargs):
    """cls.from_pretrained(folder) offline, its failures as CheckpointError naming the folder."""
    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as e:
        raise CheckpointError(folder, f"could not load the {what} ({type(e).__name__}: {e})") from None


def load_text_encoder(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    load_processor: bool = True,
    tokenizer_folder: str | os.PathLike | None = None,
    fp8: str = "dequantize",
) -> PromptEncoder:
    """Load Qwen2.5-VL, its tokenizer and (for captions) its image processor, offline.

    ``path``: a diffusers Qwen-Image-Layered folder, its ``text_encoder/`` folder (the tokenizer is
    then looked for in ``../tokenizer``), one folder holding model and tokenizer files, or ComfyUI's single file
    (``tokenizer_folder`` says where its tokenizer is; ``fp8`` keeps its fp8 linears in float8 or widens them, see
    :func:`~.checkpoints.text_encoder.load_text_encoder_file`). ``dtype`` defaults to the checkpoint's own;
    ``device`` to CPU. Every problem raises :class:`CheckpointError` naming the folder or file.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    folders = find_text_encoder(path, tokenizer_folder)
    model_dir, tokenizer_dir, processor_dir = folders.model, folders.tokenizer, folders.processor

    tokenizer = _load_part("tokenizer", AutoTokenizer, tokenizer_dir)
    if model_dir.is_file():
        model = load_text_encoder_file(model_dir, tokenizer, dtype=dtype, device=device, fp8=fp8)
    else:
        kwargs = {"use_safetensors": True, "dtype": dtype if dtype is not None else "auto"}
        model = _load_part("text encoder", Qwen2_5_VLForConditionalGeneration, model_dir, **kwargs)
    # moved after loading: transformers' device_map would need accelerate, which is no dependency here
    if device is not None:
        model.to(torch.device(device))
    model.eval().requires_grad_(False)

    image_processor = caption_tokenizer = None
    if load_processor and processor_dir is not None:
        image_processor = _load_part("image processor", AutoImageProcessor, processor_dir)
        if has_tokenizer(processor_dir) and processor_dir != tokenizer_dir:
            caption_tokenizer = _load_part("tokenizer", AutoTokenizer, processor_dir)
    elif load_processor and model_dir.is_file():
        image_processor = qwen_vl_release.image_processor()
    elif load_processor:
        logger.info("%s: no processor/ folder; auto-captions are unavailable", path)
    return PromptEncoder(model, tokenizer, image_processor, caption_tokenizer, source=str(path))
