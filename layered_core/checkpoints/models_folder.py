"""The three models in a ComfyUI ``models/`` folder, found by what their files hold, not by their names.

A ComfyUI user holds ``models/diffusion_models/`` (or the older ``unet/``), ``models/vae/`` and
``models/text_encoders/`` (or ``clip/``), among many other models. Each safetensors file there is told apart by
its tensor table alone (headers only, no tensor is read): the Qwen-Image-Layered transformer has
``time_text_embed.addition_t_embedding``, the RGBA-VAE a 4-channel Wan-style encoder. The text encoder is a
transformers folder of Qwen2.5-VL (``text_encoder/``, ``tokenizer/``, ``processor/``), as ``tiny-models`` writes
it and this pack's loader node reads it, or ComfyUI's single file (``qwen_2.5_vl_7b_fp8_scaled.safetensors``, told
by its Qwen2.5 tensors) with the tokenizer of the ComfyUI folder it sits in (or the one given).

A folder that can caption is chosen over a single file (it is complete, and what the results are compared
against), a single file with its language-model head over a folder or file that cannot caption.

When several files qualify, a full-precision transformer (bf16, then fp32, fp16) is chosen over an fp8 one: bf16
is what the model was released in and what the results are compared against; pass the fp8 file yourself to use
it. Among equals the first name in sorted order wins. :class:`FoundModels` says what was chosen and what else is there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..mmdit import LATENT_CHANNELS
from ..text import find_text_encoder
from .files import CheckpointError, TensorSource, describe_keys, open_checkpoint
from .text_encoder import COMFY_FILE, COMFY_TOKENIZER, check_text_encoder_file, is_qwen_vl_file
from .transformer import layered_prefix, transformer_precision
from .vae import vae_prefix, vae_shape

# ComfyUI's folder names for each kind (folder_paths maps both names of a kind to one list).
TRANSFORMER_FOLDERS = ("diffusion_models", "unet")
VAE_FOLDERS = ("vae",)
TEXT_ENCODER_FOLDERS = ("text_encoders", "clip")
# The order a transformer's precision is preferred in; see the module docstring.
PRECISION_PREFERENCE = ("bf16", "fp32", "fp16", "fp8")
LAYOUT_NAMES = {"wan": "Wan", "diffusers": "diffusers"}


def models_folder(path: str | os.PathLike) -> Path | None:
    """``path`` if it is a ComfyUI models folder, ``path/models`` if ``path`` is a ComfyUI folder, else None.

    A diffusers pipeline folder (``model_index.json``) is not a models folder, although it has ``vae/``."""
    path = Path(path).expanduser()
    for folder in (path, path / "models"):
        if not folder.is_dir() or (folder / "model_index.json").is_file():
            continue
        if any((folder / sub).is_dir() for sub in TRANSFORMER_FOLDERS + VAE_FOLDERS + TEXT_ENCODER_FOLDERS):
            return folder
    return None


@dataclass
class Candidate:
    path: Path
    detail: str  # "bf16", "fp8", "with processor/"; what the choice went by
    usable: bool = True
    rank: tuple = ()


@dataclass
class FoundModels:
    """The files chosen in a models folder (None for a kind not asked for), and every file looked at."""

    folder: Path
    transformer: Path | None = None
    vae: Path | None = None
    text_encoder: Path | None = None
    looked_at: dict[str, list[Candidate]] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """Lines for the user: each kind chosen, why, and the others that would also do."""
        lines = [f"models from {self.folder} (a ComfyUI models folder):"]
        chosen_by_kind = (
            ("transformer", self.transformer, "--transformer FILE"),
            ("VAE", self.vae, "--vae FILE"),
            ("text encoder", self.text_encoder, "--text-encoder PATH"),
        )
        for kind, chosen, flag in chosen_by_kind:
            if chosen is None:
                continue
            candidates = self.looked_at.get(kind, [])
            line = f"  {kind}: {self._shown(next(c for c in candidates if c.path == chosen))}"
            others = [c for c in candidates if c.usable and c.path != chosen]
            if others:
                line += f"; also there: {', '.join(self._shown(c) for c in others)} (pass {flag} to use another)"
            lines.append(line)
        return lines

    def _shown(self, candidate: Candidate) -> str:
        name = self._relative(candidate.path)
        return f"{name} ({candidate.detail})" if candidate.detail else name

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.folder))
        except ValueError:
            return str(path)


def _files(folder: Path, pattern: str) -> list[Path]:
    """Files under ``folder`` matching ``pattern``, any depth (ComfyUI lists subfolders too), hidden ones left
    out, sorted."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob(pattern) if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    return sorted(found)


def _checkpoints(folders: list[Path]) -> list[Path]:
    """Each single safetensors file and each shard index under ``folders``; shards count once, by their index."""
    indexes = [p for folder in folders for p in _files(folder, "*.safetensors.index.json")]
    sharded = {index.parent for index in indexes}
    singles = [p for folder in folders for p in _files(folder, "*.safetensors") if p.parent not in sharded]
    return sorted(singles + indexes)


def _open(path: Path) -> tuple[TensorSource | None, str]:
    try:
        return open_checkpoint(path), ""
    except CheckpointError as e:
        return None, f"unreadable: {e.problem}"


def _transformer_candidate(path: Path) -> Candidate:
    source, problem = _open(path)
    if source is None:
        return Candidate(path, problem, usable=False)
    prefix = layered_prefix(source)
    if prefix is None:
        return Candidate(path, describe_keys(source.keys()), usable=False)
    precision = transformer_precision(source, prefix)
    rank = PRECISION_PREFERENCE.index(precision) if precision in PRECISION_PREFERENCE else len(PRECISION_PREFERENCE)
    return Candidate(path, precision, rank=(rank, str(path)))


def _vae_candidate(path: Path) -> Candidate:
    source, problem = _open(path)
    if source is None:
        return Candidate(path, problem, usable=False)
    prefix = vae_prefix(source)
    if prefix is None:
        return Candidate(path, describe_keys(source.keys()), usable=False)
    try:
        shape = vae_shape(source, prefix)
    except ValueError as e:
        return Candidate(path, str(e), usable=False)
    if shape["z_dim"] != LATENT_CHANNELS:
        return Candidate(path, f"{shape['z_dim']} latent channels, not {LATENT_CHANNELS}", usable=False)
    return Candidate(path, f"{LAYOUT_NAMES[shape['layout']]} layout", rank=(str(path),))


def _text_encoder_candidates(
    folders: list[Path], need_processor: bool, tokenizer_folder: Path | None = None
) -> list[Candidate]:
    candidates = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                candidates.append(_text_encoder_folder_candidate(entry, need_processor))
            elif entry.name.endswith(".safetensors"):
                candidates.append(_text_encoder_file_candidate(entry, need_processor, tokenizer_folder))
    return candidates


def _text_encoder_folder_candidate(folder: Path, need_processor: bool) -> Candidate:
    try:
        parts = find_text_encoder(folder)
    except CheckpointError as e:
        return Candidate(folder, e.problem, usable=False)
    captions = parts.caption_problem is None
    detail = "with processor/" if captions else "no processor/: no auto-captions"
    return Candidate(folder, detail, usable=captions or not need_processor, rank=(not captions, 0, str(folder)))


def _text_encoder_file_candidate(path: Path, need_processor: bool, tokenizer_folder: Path | None) -> Candidate:
    source, problem = _open(path)
    if source is None:
        return Candidate(path, problem, usable=False)
    if not is_qwen_vl_file(source):
        return Candidate(path, describe_keys(source.keys()), usable=False)
    try:
        shape = check_text_encoder_file(path)
        parts = find_text_encoder(path, tokenizer_folder)
    except CheckpointError as e:
        return Candidate(path, e.problem, usable=False)
    captions = parts.caption_problem is None
    detail = f"{shape.precision} single file" + ("" if captions else ", no lm_head: no auto-captions")
    return Candidate(path, detail, usable=captions or not need_processor, rank=(not captions, 1, str(path)))


def _best(candidates: list[Candidate]) -> Path | None:
    usable = sorted((c for c in candidates if c.usable), key=lambda c: c.rank)
    return usable[0].path if usable else None


def _none_found(folder: Path, what: str, subfolders: tuple[str, ...], candidates: list[Candidate], hint: str) -> str:
    where = " or ".join(f"{name}/" for name in subfolders)
    if candidates:
        seen = "; ".join(f"{c.path.relative_to(folder)}: {c.detail}" for c in candidates[:6])
        more = f" (+{len(candidates) - 6} more)" if len(candidates) > 6 else ""
        return f"no {what} in {where}; looked at {seen}{more}. {hint}"
    return f"no {what} in {where} (nothing there). {hint}"


def find_models(
    folder: str | os.PathLike,
    kinds: tuple[str, ...] = ("transformer", "vae", "text_encoder"),
    need_processor: bool = False,
    tokenizer_folder: str | os.PathLike | None = None,
) -> FoundModels:
    """The Qwen-Image-Layered transformer, RGBA-VAE and text encoder in a ComfyUI models folder (the ``kinds``
    asked for), chosen as the module docstring says. ``need_processor``: only a text encoder that can caption
    will do. ``tokenizer_folder``: the tokenizer of a single-file text encoder, when not ComfyUI's own. A kind
    that is not there raises :class:`CheckpointError` naming the folder, what was looked at, and what to put
    there."""
    folder = Path(folder)
    found = FoundModels(folder)
    if "transformer" in kinds:
        candidates = [_transformer_candidate(p) for p in _checkpoints([folder / f for f in TRANSFORMER_FOLDERS])]
        found.looked_at["transformer"] = candidates
        found.transformer = _best(candidates)
        if found.transformer is None:
            hint = "Put qwen_image_layered_bf16.safetensors (or the fp8mixed file) there, or pass --transformer."
            raise CheckpointError(
                folder, _none_found(folder, "Qwen-Image-Layered transformer", TRANSFORMER_FOLDERS, candidates, hint)
            )
    if "vae" in kinds:
        candidates = [_vae_candidate(p) for p in _checkpoints([folder / f for f in VAE_FOLDERS])]
        found.looked_at["VAE"] = candidates
        found.vae = _best(candidates)
        if found.vae is None:
            hint = "Put qwen_image_layered_vae.safetensors there, or pass --vae."
            raise CheckpointError(folder, _none_found(folder, "RGBA-VAE", VAE_FOLDERS, candidates, hint))
    if "text_encoder" in kinds:
        tokenizer = None if tokenizer_folder is None else Path(tokenizer_folder)
        candidates = _text_encoder_candidates([folder / f for f in TEXT_ENCODER_FOLDERS], need_processor, tokenizer)
        found.looked_at["text encoder"] = candidates
        found.text_encoder = _best(candidates)
        if found.text_encoder is None:
            hint = (
                "Put a transformers folder of Qwen2.5-VL-7B-Instruct there (text_encoder/, tokenizer/"
                + (", processor/ for the auto-caption" if need_processor else ", processor/")
                + f"; the diffusers folder of Qwen/Qwen-Image-Layered has them), or ComfyUI's {COMFY_FILE} in a "
                f"ComfyUI folder (its tokenizer is {COMFY_TOKENIZER.as_posix()}), or pass --text-encoder."
            )
            raise CheckpointError(
                folder, _none_found(folder, "usable text encoder", TEXT_ENCODER_FOLDERS, candidates, hint)
            )
    return found
