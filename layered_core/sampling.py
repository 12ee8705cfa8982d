"""Flow-matching sampling of the VLD-MMDiT: the reference schedule, Euler steps on the velocity and
true classifier-free guidance, cond and uncond in one batched forward or two (a step's "branches"; across
processes, one branch per process: :mod:`.distributed.cfg`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .mmdit import LATENT_CHANNELS, image_token_count, pack_latents, unpack_latents

MAX_LAYERS = 20  # the model was trained with up to 20 layers


def check_layer_count(count, what: str = "layer count") -> int:
    """``count`` if it is a layer count the model takes (an int from 1 to :data:`MAX_LAYERS`), else ValueError."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_LAYERS:
        raise ValueError(f"{what} must be an integer from 1 to {MAX_LAYERS}, got {count!r}")
    return count


def is_guided(cfg_scale: float, has_negative: bool = True) -> bool:
    """Whether true CFG runs: a scale above 1 and a negative prompt to guide against."""
    return cfg_scale > 1.0 and has_negative


def forward_batch(batch: int, cfg_scale: float, has_negative: bool = True) -> int:
    """The transformer's batch for ``batch`` images: cond and uncond together when guided."""
    return batch * (2 if is_guided(cfg_scale, has_negative) else 1)


class Cancelled(RuntimeError):
    """Raised when a step callback asks to stop."""


def schedule_shift(condition_tokens: int) -> float:
    """mu = sqrt(tokens / 256): 2.5 for the 640 bucket (1600 tokens), 4.0 for 1024 (4096 tokens)."""
    return math.sqrt(condition_tokens / 256)


def sigmas(steps: int, mu: float) -> torch.Tensor:
    """float32 (steps + 1,): linspace(1, 0) without its end, the linear time shift
    mu / (mu + 1/sigma - 1) applied, then a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    shifted = mu / (mu + (1.0 / base - 1.0))
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


def initial_noise(batch: int, layer_count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Seeded Gaussian noise (B, 16, N+1, h, w), drawn on the CPU in the reference's (B, N+1, 16, h, w)
    order, so a seed gives the same noise on every device and in diffusers."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(batch, layer_count + 1, LATENT_CHANNELS, height, width, generator=generator)
    return noise.permute(0, 2, 1, 3, 4).contiguous()


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float, normalize: bool) -> torch.Tensor:
    """True CFG, uncond + s * (cond - uncond); with ``normalize`` each 2x2 patch token is rescaled to the
    norm of the conditional prediction (as the reference does on packed tokens)."""
    guided = uncond + scale * (cond - uncond)
    if not normalize:
        return guided
    frames, height, width = guided.shape[2:]
    cond_tokens, guided_tokens = pack_latents(cond), pack_latents(guided)
    ratio = cond_tokens.norm(dim=-1, keepdim=True) / guided_tokens.norm(dim=-1, keepdim=True)
    return unpack_latents(guided_tokens * ratio, frames, height, width)


@dataclass
class StepInfo:
    step: int  # 0-based index of the step just finished
    total: int
    sigma: float
    latents: torch.Tensor  # the noisy latents after this step
    denoised: torch.Tensor  # the model's estimate of the clean latents at this step (for previews)


@dataclass
class PromptEmbeddings:
    """Prompt embeddings (B, L, D) with an optional boolean mask (B, L), True = real token."""

    embeddings: torch.Tensor
    mask: torch.Tensor | None = None

    def to(self, device, dtype: torch.dtype | None = None) -> PromptEmbeddings:
        mask = None if self.mask is None else self.mask.to(device)
        return PromptEmbeddings(self.embeddings.to(device=device, dtype=dtype), mask)


def _unpadded_length(c: PromptEmbeddings) -> int | None:
    """The prompt length when no row of it is padded, else None."""
    if c.mask is not None and not bool(c.mask.all()):
        return None
    return c.embeddings.shape[1]


def _batched_text(
    prompt: PromptEmbeddings, negative: PromptEmbeddings, image_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both prompts as one batch: zero-padded to the longer one, with a mask when any row is padded.

    Padded, the length is rounded up so that text and image tokens together are a multiple of 8: on other
    lengths cuDNN's masked attention runs at about half speed. The extra tokens are masked out like the rest of
    the padding."""
    length = max(prompt.embeddings.shape[1], negative.embeddings.shape[1])
    if any(_unpadded_length(c) != length for c in (prompt, negative)):
        length += -(length + image_tokens) % 8
    embeddings, masks = [], []
    for c in (prompt, negative):
        batch, own = c.embeddings.shape[:2]
        mask = c.mask if c.mask is not None else torch.ones(batch, own, dtype=torch.bool, device=c.embeddings.device)
        embeddings.append(torch.nn.functional.pad(c.embeddings, (0, 0, 0, length - own)))
        masks.append(torch.nn.functional.pad(mask.bool(), (0, length - own), value=False))
    mask = torch.cat(masks)
    return torch.cat(embeddings), None if bool(mask.all()) else mask


GuidedBranches = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
"""One step's forwards: (latents, sigma per sample) -> float32 velocities of the prompt's branch and of the
negative prompt's (None when unguided)."""

BranchFactory = Callable[..., GuidedBranches]
"""``factory(model, condition, prompt, negative, layer_count)`` -> the :data:`GuidedBranches` of one sampling run
(``negative`` is None when the run is unguided)."""


def branch_velocity(model: Callable, latents, condition, c: PromptEmbeddings, sigma: torch.Tensor) -> torch.Tensor:
    """One branch's forward: the velocity for the prompt ``c``, in float32."""
    return model(latents, condition, c.embeddings, sigma, c.mask).float()


def separate_branches(
    model: Callable, condition: torch.Tensor, prompt: PromptEmbeddings, negative: PromptEmbeddings | None, layer_count
) -> GuidedBranches:
    """cond and uncond as two forwards of the images' batch, each at its own prompt's length."""

    def run(latents: torch.Tensor, sigma: torch.Tensor):
        cond = branch_velocity(model, latents, condition, prompt, sigma)
        return cond, None if negative is None else branch_velocity(model, latents, condition, negative, sigma)

    return run


def batched_branches(
    model: Callable, condition: torch.Tensor, prompt: PromptEmbeddings, negative: PromptEmbeddings, layer_count: int
) -> GuidedBranches:
    """cond and uncond as one forward of twice the images' batch; the shorter prompt is padded under a mask."""
    if negative is None:
        raise ValueError("batched_branches runs cond and uncond together: it needs a negative prompt (true CFG)")
    batch, _, height, width = condition.shape
    text, text_mask = _batched_text(prompt, negative, image_token_count(layer_count, height, width))
    both_conditions = torch.cat([condition, condition])

    def run(latents: torch.Tensor, sigma: torch.Tensor):
        both = model(torch.cat([latents, latents]), both_conditions, text, sigma.repeat(2), text_mask).float()
        return both[:batch], both[batch:]

    return run


def default_branches(
    prompt: PromptEmbeddings, negative: PromptEmbeddings | None, batch_guidance: bool = False
) -> BranchFactory:
    """How :func:`sample` runs a step's branches unless told: one batched forward when guided and the prompts are
    equally long (or ``batch_guidance``), else two. Padding would need an attention mask, and masked attention runs
    far slower than the unmasked kernels; streamed weights, though, cost a copy per forward, so they batch."""
    length = _unpadded_length(prompt)
    if negative is not None and (batch_guidance or (length is not None and length == _unpadded_length(negative))):
        return batched_branches
    return separate_branches


@torch.no_grad()
def sample(
    model: Callable,
    condition: torch.Tensor,
    prompt: PromptEmbeddings,
    negative: PromptEmbeddings | None,
    layer_count: int,
    steps: int = 50,
    cfg_scale: float = 4.0,
    cfg_normalize: bool = True,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    callback: Callable[[StepInfo], bool | None] | None = None,
    batch_guidance: bool = False,
    branches: BranchFactory | None = None,
) -> torch.Tensor:
    """Denoise N+1 frames (frame 0 the composite, 1..N the layer_count) for a condition latent.

    model: ``model(latents, condition, text, sigma, text_mask)`` -> velocity, as :class:`VLDMMDiT`.
    condition: normalised latent of the input image (B, 16, h, w). With ``cfg_scale > 1`` and a
    negative prompt, cond and uncond run as one batch of 2B when their prompts have the same length,
    else as two forwards; ``batch_guidance`` batches them always, padding the shorter prompt under an
    attention mask (slower attention, but one pass over the weights: what streamed weights want).
    ``branches`` overrides that choice (:func:`separate_branches`, :func:`batched_branches`, or a factory of
    its own, as CFG-parallel sampling in :mod:`.distributed` has). ``callback`` is called after every step;
    returning False (or raising) stops the run with :class:`Cancelled`.
    Returns float32 latents (B, 16, N+1, h, w).
    """
    check_layer_count(layer_count)
    if condition.ndim != 4 or condition.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"condition latent must be (B, {LATENT_CHANNELS}, h, w), got {tuple(condition.shape)}")
    batch, _, height, width = condition.shape
    if height % 2 or width % 2:
        raise ValueError(f"condition latent height and width must be even, got {height}x{width}")
    if cfg_scale <= 0:
        raise ValueError(f"cfg_scale must be positive, got {cfg_scale}")
    device = condition.device

    if not is_guided(cfg_scale, negative is not None):
        negative = None
    factory = branches or default_branches(prompt, negative, batch_guidance)
    run = factory(model, condition, prompt, negative, layer_count)

    if noise is None:
        noise = initial_noise(batch, layer_count, height, width, seed)
    expected = (batch, LATENT_CHANNELS, layer_count + 1, height, width)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must be {expected}, got {tuple(noise.shape)}")
    latents = noise.to(device=device, dtype=torch.float32)
    schedule = sigmas(steps, schedule_shift((height // 2) * (width // 2))).tolist()

    for index in range(steps):
        sigma, sigma_next = schedule[index], schedule[index + 1]
        cond, uncond = run(latents, torch.full((batch,), sigma, device=device))
        velocity = cond if uncond is None else guided_velocity(cond, uncond, cfg_scale, cfg_normalize)
        denoised = latents - sigma * velocity
        latents = latents + (sigma_next - sigma) * velocity
        if callback is not None and callback(StepInfo(index, steps, sigma, latents, denoised)) is False:
            raise Cancelled(f"stopped after step {index + 1} of {steps}")
    return latents
