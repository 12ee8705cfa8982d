"""ComfyUI's single-file Qwen2.5-VL text encoder, ``text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors``, read into
transformers' ``Qwen2_5_VLForConditionalGeneration``.

The file holds the names of the original Qwen2.5-VL release, which ComfyUI's ``Qwen25_7BVLI`` loads:
``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, the vision tower ``visual.*`` and, when there is
one, ``lm_head``; transformers 5 nests the first three under ``model.language_model.`` and the tower under
``model.visual.`` (names already in that form are read as they are). The fp8 file stores the linears of both
towers in float8 e4m3 in ComfyUI's older scaled layout (a ``scaled_fp8`` marker, one ``scale_weight`` per
layer, read by :mod:`.quantized`); embeddings, norms, biases, the patch embedding and the head stay bf16.

Everything but the weights comes from elsewhere. The model's shape is read off the tensor shapes; what no shape
tells (head widths, which vision blocks attend globally) is the 7B's (:mod:`.qwen_vl_release`), or the file's own
``layered_core.qwen_vl`` metadata where this package wrote it (the tiny test files). The special token ids come
from the tokenizer. The tokenizer is not in the file: ComfyUI ships it in its own package
(``comfy/text_encoders/qwen25_tokenizer``), where it is looked for above the file; or it is given (a folder with
the tokenizer files, or a diffusers folder with ``tokenizer/``). The image processor is that folder's
``preprocessor_config.json`` where it has one, else the release's settings. A file without ``lm_head`` encodes
prompts but cannot caption: the head stays a placeholder that refuses, naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..ops import FP8_DTYPES, FP8Linear, dequantize_fp8, quantize_fp8
from . import qwen_vl_release as release
from .files import (
    CheckpointError,
    TensorSource,
    describe_keys,
    key_set_problems,
    open_checkpoint,
    read_safetensors_header,
    save_safetensors,
)
from .quantized import (
    SCALED_FP8_MARKER,
    QuantizedLayer,
    auxiliary_keys,
    quantized_layers,
    read_fp8_weight,
    weights_precision,
)

COMFY_FILE = "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"
# Where ComfyUI keeps the Qwen2.5 tokenizer, relative to its own folder.
COMFY_TOKENIZER = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
PROCESSOR_CONFIG = "preprocessor_config.json"
SETTINGS_METADATA_KEY = "layered_core.qwen_vl"
# The original release's prefixes -> transformers 5's; names that already carry the new prefix are kept.
RENAMES = (("model.", "model.language_model."), ("visual.", "model.visual."))
TRANSFORMERS_PREFIXES = ("model.language_model.", "model.visual.", "lm_head.")
LANGUAGE = "model.language_model."
VISION = "model.visual."
HEAD = "lm_head.weight"
NO_HEAD = "holds no language-model head (lm_head.weight), which prompt embeddings do not use"
FP8_MODES = ("keep", "dequantize")


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer transformers can load (tokenizer.json, or vocab.json + merges.txt)."""
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def transformers_name(key: str) -> str:
    """The transformers 5 name of a tensor of the single file."""
    if key.startswith(TRANSFORMERS_PREFIXES):
        return key
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def is_qwen_vl_file(source: TensorSource) -> bool:
    """Whether ``source`` holds a Qwen2.5-VL language model in the single-file names (headers only).

    Qwen2.5's attention has a bias on its key projection (ComfyUI tells its Qwen2.5 text encoders by that
    tensor) and no query norm (Qwen3 has one)."""
    names = {transformers_name(k) for k in source.keys()}
    return (
        f"{LANGUAGE}embed_tokens.weight" in names
        and f"{LANGUAGE}layers.0.self_attn.k_proj.bias" in names
        and f"{LANGUAGE}layers.0.self_attn.q_norm.weight" not in names
    )


@dataclass(frozen=True)
class QwenVLShape:
    """The model a single file holds, from its tensor table: the shape (with the settings no shape gives), whether
    the head is there, the precision of the language model's weights ("fp8", "bf16", ...)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_heads: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    full_attention_blocks: tuple[int, ...]
    has_lm_head: bool
    precision: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def config(self, tokenizer):
        """transformers' Qwen2_5_VLConfig of this shape, with the special token ids of ``tokenizer``."""
        from transformers import Qwen2_5_VLConfig

        try:
            ids = release.vision_token_ids(tokenizer)
            end_of_text = release.token_id(tokenizer, release.END_OF_TEXT)
            end_of_turn = release.token_id(tokenizer, release.END_OF_TURN)
        except KeyError as e:
            raise ValueError(f"the tokenizer has no {e.args[0]} token: it is not Qwen2.5-VL's tokenizer") from None
        return Qwen2_5_VLConfig(
            text_config={
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "max_position_embeddings": release.MAX_POSITION_EMBEDDINGS,
                "rms_norm_eps": release.RMS_NORM_EPS,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": release.ROPE_THETA,
                    "mrope_section": release.mrope_section(self.head_dim),
                },
                "bos_token_id": end_of_text,
                "eos_token_id": end_of_turn,
                "tie_word_embeddings": False,
            },
            vision_config={
                "depth": self.vision_depth,
                "hidden_size": self.vision_hidden_size,
                "intermediate_size": self.vision_intermediate_size,
                "num_heads": self.vision_heads,
                "patch_size": self.patch_size,
                "spatial_merge_size": self.spatial_merge_size,
                "temporal_patch_size": self.temporal_patch_size,
                "window_size": self.window_size,
                "fullatt_block_indexes": list(self.full_attention_blocks),
                "tokens_per_second": release.TOKENS_PER_SECOND,
                "out_hidden_size": self.hidden_size,
            },
            tie_word_embeddings=False,
            **ids,
        )


def _settings(source: TensorSource) -> dict:
    """The settings no shape gives: the file's own metadata where this package wrote it, else the 7B's."""
    raw = source.metadata.get(SETTINGS_METADATA_KEY)
    if raw is None:
        return {}
    try:
        settings = json.loads(raw)
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(source.location, f"unreadable {SETTINGS_METADATA_KEY} metadata ({e})") from None
    return settings


def infer_shape(source: TensorSource) -> QwenVLShape:
    """The Qwen2.5-VL model ``source`` holds, from its tensor table alone. Raises :class:`CheckpointError`
    naming the tensor that is missing or the shape that does not fit."""
    shapes = {transformers_name(k): v for k, v in source.shapes.items()}
    settings = _settings(source)

    def shape(name: str, what: str) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError(
                source.location,
                f"no {what} ('{name}', or its single-file name); expected ComfyUI's Qwen2.5-VL text encoder "
                f"({COMFY_FILE})",
            )
        return shapes[name]

    def count(prefix: str) -> int:
        pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.")
        return 1 + max((int(m.group(1)) for name in shapes if (m := pattern.match(name))), default=-1)

    def require(holds: bool, problem: str) -> None:
        if not holds:
            raise CheckpointError(source.location, problem)

    def divide(total: int, part: int, what: str) -> int:
        require(part > 0 and total % part == 0, f"{what}: {total} is not a multiple of {part}")
        return total // part

    vocab_size, hidden_size = shape(f"{LANGUAGE}embed_tokens.weight", "token embedding")
    layer = f"{LANGUAGE}layers.0."
    query_width = shape(f"{layer}self_attn.q_proj.weight", "query projection")[0]
    key_width = shape(f"{layer}self_attn.k_proj.weight", "key projection")[0]
    intermediate_size = shape(f"{layer}mlp.gate_proj.weight", "gated MLP")[0]
    require(query_width == hidden_size, f"the query projection is {query_width} wide, not the model's {hidden_size}")
    head_dim = int(settings.get("head_dim", release.HEAD_DIM))
    num_heads = divide(hidden_size, head_dim, f"the width (heads of {head_dim})")
    num_kv_heads = divide(key_width, head_dim, f"the key projection (heads of {head_dim})")
    divide(num_heads, num_kv_heads, "the attention heads (shared by the key/value heads)")

    patch = shape(f"{VISION}patch_embed.proj.weight", "vision tower (visual.patch_embed)")
    require(
        len(patch) == 5 and patch[1] == 3 and patch[3] == patch[4],
        f"the vision patch embedding is {list(patch)}, expected [C, 3, T, P, P]",
    )
    vision_hidden_size, _, temporal_patch_size, patch_size, _ = patch
    vision_intermediate_size = shape(f"{VISION}blocks.0.mlp.gate_proj.weight", "gated vision MLP (Qwen2.5-VL's)")[0]
    merged = shape(f"{VISION}merger.mlp.0.weight", "vision merger")[1]
    spatial_merge_size = round((merged / vision_hidden_size) ** 0.5)
    require(
        spatial_merge_size**2 * vision_hidden_size == merged,
        f"the vision merger takes {merged} features, not a square of patches",
    )
    merger_out = shape(f"{VISION}merger.mlp.2.weight", "vision merger output")[0]
    require(
        merger_out == hidden_size,
        f"the vision tower gives {merger_out} features, the language model takes {hidden_size}",
    )
    vision_head_dim = int(settings.get("vision_head_dim", release.VISION_HEAD_DIM))
    vision_heads = divide(vision_hidden_size, vision_head_dim, f"the vision width (heads of {vision_head_dim})")
    vision_depth = count(f"{VISION}blocks.")
    blocks = settings.get("full_attention_blocks", release.full_attention_blocks(vision_depth))

    head = shapes.get(HEAD)
    require(
        head is None or tuple(head) == (vocab_size, hidden_size),
        f"lm_head.weight is {list(head or ())}, expected {[vocab_size, hidden_size]}",
    )
    return QwenVLShape(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=count(f"{LANGUAGE}layers."),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vision_depth=vision_depth,
        vision_hidden_size=vision_hidden_size,
        vision_intermediate_size=vision_intermediate_size,
        vision_heads=vision_heads,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        spatial_merge_size=spatial_merge_size,
        window_size=int(settings.get("window_size", release.WINDOW_SIZE)),
        full_attention_blocks=tuple(int(b) for b in blocks),
        has_lm_head=head is not None,
        precision=weights_precision(source, "model."),
    )


def is_written_here(path: Path) -> bool:
    """Whether the safetensors file at ``path`` was written by :func:`save_text_encoder_file` (it carries the
    settings metadata; ComfyUI's release does not)."""
    try:
        return SETTINGS_METADATA_KEY in read_safetensors_header(path)[1]
    except CheckpointError:
        return False


def settings_metadata(config) -> dict[str, str]:
    """The safetensors metadata that lets :func:`infer_shape` rebuild ``config`` (a Qwen2_5_VLConfig) exactly,
    for files this package writes of a model whose unshaped settings are not the 7B's."""
    text, vision = config.text_config, config.vision_config
    settings = {
        "head_dim": text.hidden_size // text.num_attention_heads,
        "vision_head_dim": vision.hidden_size // vision.num_heads,
        "window_size": vision.window_size,
        "full_attention_blocks": list(vision.fullatt_block_indexes),
    }
    return {SETTINGS_METADATA_KEY: json.dumps(settings)}


def check_text_encoder_file(path: str | os.PathLike) -> QwenVLShape:
    """The shape of the Qwen2.5-VL single file at ``path``, from its header; :class:`CheckpointError` naming the
    file when it is unreadable or holds something else."""
    source = open_checkpoint(path)
    if not is_qwen_vl_file(source):
        raise CheckpointError(
            source.location, f"holds {describe_keys(source.keys())}, not Qwen2.5-VL; expected ComfyUI's {COMFY_FILE}"
        )
    return infer_shape(source)


# --------------------------------------------------------------------------- where the rest comes from


def _tokenizer_in(folder: Path) -> tuple[Path, Path | None] | None:
    """(tokenizer folder, processor folder or None) in a folder given for the tokenizer, None if it has none."""
    for tokenizer_dir, processor_dir in ((folder / "tokenizer", folder / "processor"), (folder, folder)):
        if has_tokenizer(tokenizer_dir):
            return tokenizer_dir, processor_dir if (processor_dir / PROCESSOR_CONFIG).is_file() else None
    return None


def comfyui_tokenizer(path: Path) -> Path | None:
    """ComfyUI's own Qwen2.5 tokenizer in the ComfyUI folder that ``path`` sits in, if there is one.

    Both the path as given and the one its links resolve to are searched, so a models folder linked into
    ComfyUI (or out of it) is found either way."""
    path = Path(os.path.abspath(path))
    for start in dict.fromkeys((path, path.resolve())):
        for folder in start.parents:
            if has_tokenizer(folder / COMFY_TOKENIZER):
                return folder / COMFY_TOKENIZER
    return None


def find_tokenizer(
    path: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None
) -> tuple[Path, Path | None]:
    """(tokenizer folder, image-processor folder or None) for the single file at ``path``.

    ``tokenizer_folder``: a folder holding the tokenizer files, or a diffusers folder with ``tokenizer/`` (and
    ``processor/``); by default ComfyUI's own tokenizer in the ComfyUI folder the file sits in. A processor folder
    is one with ``preprocessor_config.json``; without one captions use the release's image settings."""
    path = Path(path)
    if tokenizer_folder is not None:
        folder = Path(tokenizer_folder).expanduser()
        found = _tokenizer_in(folder) if folder.is_dir() else None
        if found is None:
            raise CheckpointError(
                folder,
                ("folder not found" if not folder.exists() else "no tokenizer here")
                + f": the tokenizer of {path.name} is expected to be a folder with tokenizer.json, or vocab.json + "
                "merges.txt, or a diffusers folder with tokenizer/ (ComfyUI's comfy/text_encoders/qwen25_tokenizer, "
                "Qwen/Qwen2.5-VL-7B-Instruct or Qwen/Qwen-Image-Layered)",
            )
        return found
    found = comfyui_tokenizer(path)
    if found is None:
        raise CheckpointError(
            path,
            f"holds no tokenizer (ComfyUI keeps it in its own {COMFY_TOKENIZER.as_posix()}), and no ComfyUI folder "
            f"above the file has one; give the tokenizer folder (--tokenizer): ComfyUI's {COMFY_TOKENIZER.as_posix()}, "
            "Qwen/Qwen2.5-VL-7B-Instruct, or the Qwen/Qwen-Image-Layered diffusers folder",
        )
    return found, None


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device, their buffers for real.

    The rotary tables are buffers that no checkpoint holds: built for real they are right from the start,
    while the parameters, which the file replaces, cost nothing. (Building everything on the meta device
    would leave those tables empty.) Module construction is patched for the duration, so build one model
    at a time."""
    register = nn.Module.register_parameter

    def on_meta(module, name, parameter):
        if parameter is not None and parameter.device.type != "meta":
            parameter = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
        register(module, name, parameter)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class MissingHead(nn.Module):
    """Stands where the language-model head is when the file holds none: prompt embeddings never call it;
    generating a token (a caption) does, and is refused naming the file."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = str(path)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise CheckpointError(
            self.path, f"{NO_HEAD}, but a caption needs it to pick each word; pass a prompt, or a file that holds it"
        )


def _default_dtype(source: TensorSource, names: dict[str, str]) -> torch.dtype:
    """The dtype the file keeps its unquantised tensors in (that of the token embedding)."""
    dtype = source.dtypes[names[f"{LANGUAGE}embed_tokens.weight"]]
    return dtype if dtype.is_floating_point and dtype not in FP8_DTYPES else torch.bfloat16


def load_text_encoder_file(
    path: str | os.PathLike,
    tokenizer,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    fp8: str = "dequantize",
):
    """transformers' Qwen2_5_VLForConditionalGeneration with the weights of the single file at ``path``.

    ``tokenizer`` (loaded) gives the special token ids and is checked against the vocabulary. ``dtype`` is that
    of the unquantised weights (default: the file's own). The fp8 linears are widened to ``dtype`` with their
    scales (``fp8="dequantize"``), or kept in float8 as :class:`~..ops.FP8Linear` (``"keep"``: half the memory;
    on GPUs with fp8 tensor cores the products run in fp8, as ComfyUI runs this file). Every problem raises
    :class:`CheckpointError` naming the file."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)}, got {fp8!r}")
    path = Path(path)
    shape = check_text_encoder_file(path)
    source = open_checkpoint(path)
    if len(tokenizer) > shape.vocab_size:
        raise CheckpointError(
            path,
            f"the tokenizer has {len(tokenizer)} tokens, more than the {shape.vocab_size} rows of the file's token "
            "embedding: it is not this model's tokenizer",
        )
    quantized = quantized_layers(source, "")
    aux = auxiliary_keys(source, "", quantized)
    names = {transformers_name(k): k for k in source.keys() if k not in aux}
    quantized = {transformers_name(name): layer for name, layer in quantized.items()}
    dtype = dtype or _default_dtype(source, names)

    try:
        config = shape.config(tokenizer)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    with parameters_on_meta():
        model = Qwen2_5_VLForConditionalGeneration(config)
    if not shape.has_lm_head:
        model.lm_head = MissingHead(path)
    expected = set(model.state_dict())
    if problems := key_set_problems(expected, names):
        raise CheckpointError(path, f"the tensors do not match Qwen2.5-VL's: {problems}")

    kept = _keep_fp8_linears(model, quantized) if fp8 == "keep" else set()
    model.load_state_dict(_state(source, names, quantized, kept, dtype, device or "cpu"), strict=True, assign=True)
    source.close()
    model.generation_config = release.generation_config(tokenizer)
    return model.eval().requires_grad_(False)


def _keep_fp8_linears(model: nn.Module, quantized: dict[str, QuantizedLayer]) -> set[str]:
    """Each quantised Linear of ``model`` replaced by an empty FP8Linear; returns their names."""
    kept = set()
    for name in quantized:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        # Only linears have an fp8 forward; anything else quantised (an embedding) is widened.
        if type(module) is nn.Linear:
            setattr(parent, child, FP8Linear.like(module))
            kept.add(name)
    return kept


def _state(
    source: TensorSource,
    names: dict[str, str],
    quantized: dict[str, QuantizedLayer],
    kept: set[str],
    dtype: torch.dtype,
    device: str | torch.device,
) -> dict[str, torch.Tensor]:
    state = {}
    for name, key in names.items():
        module, _, leaf = name.rpartition(".")
        layer = quantized.get(module) if leaf == "weight" else None
        if layer is not None:
            weight, scale = read_fp8_weight(source, key, layer, device)
            if module in kept:
                state[name], state[f"{module}.weight_scale"] = weight, scale
            else:
                state[name] = dequantize_fp8(weight, scale, dtype)
            continue
        tensor = source.get(key).to(device)
        state[name] = tensor.to(dtype) if tensor.dtype.is_floating_point else tensor
    return state


# --------------------------------------------------------------------------- writing


def comfy_name(name: str) -> str:
    """The single-file name of a transformers 5 tensor name (the inverse of :func:`transformers_name`)."""
    for old, new in RENAMES:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def is_quantized_in_comfy_file(name: str, tensor: torch.Tensor) -> bool:
    """The tensors ComfyUI's fp8 file stores in float8: every linear weight of both towers, the vision merger's
    included; the token embedding and the head stay full precision."""
    return (
        name.endswith(".weight")
        and tensor.ndim == 2
        and name.startswith((f"{LANGUAGE}layers.", f"{VISION}blocks.", f"{VISION}merger.mlp."))
    )


def save_text_encoder_file(
    model,
    path: str | os.PathLike,
    fp8: bool = False,
    lm_head: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a transformers Qwen2.5-VL ``model`` as ComfyUI's single file: the original names, unquantised
    tensors in ``dtype``, with ``fp8`` the linears in scaled float8 e4m3 as qwen_2.5_vl_7b_fp8_scaled holds
    them (``scaled_fp8`` marker, ``scale_weight``, ``scale_input`` of 1), without ``lm_head`` if asked. The
    settings no shape gives go into the metadata, so :func:`load_text_encoder_file` rebuilds the same model."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == HEAD and not lm_head:
            continue
        key = comfy_name(name)
        if fp8 and is_quantized_in_comfy_file(name, tensor):
            weight, scale = quantize_fp8(tensor)
            layer = key.removesuffix(".weight")
            tensors[key] = weight
            tensors[f"{layer}.scale_weight"] = scale
            tensors[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if fp8:
        tensors[SCALED_FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return save_safetensors(tensors, path, settings_metadata(model.config))
