"""The VLD-MMDiT of Qwen-Image-Layered: 60 dual-stream blocks over [text ; image] tokens.

Image tokens are 2x2 patches of the 16-channel latent: first the N+1 noisy frames (composite,
then the layers), then the clean condition latent of the input image at frame index -1. The
model predicts the flow-matching velocity of the noisy frames only.

Parameter names follow the released checkpoints (``transformer_blocks.N.attn.to_q`` ...), so a
state dict loads with no renaming and LoRAs made for the checkpoints address the same modules.
"""

from __future__ import annotations

import math
import types
from dataclasses import asdict, dataclass, fields

import torch
from einops import rearrange
from torch import nn

from .attention import attention, attention_override
from .kernels import linear_gelu, norm_rope_join
from .ops import FP8_DTYPES, resolve_operations
from .rope import layered_positions, rope_cos_sin

LATENT_CHANNELS = 16


@dataclass(frozen=True)
class MMDiTConfig:
    """Shape of the transformer. ``full()`` is the released 20.43 B model."""

    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    text_dim: int = 3584
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    axes_dims: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    mlp_ratio: int = 4
    eps: float = 1e-6

    def __post_init__(self):
        for f in (
            "num_layers",
            "num_heads",
            "head_dim",
            "text_dim",
            "in_channels",
            "out_channels",
            "patch_size",
        ):
            if getattr(self, f) < 1:
                raise ValueError(f"MMDiTConfig.{f} must be a positive integer, got {getattr(self, f)}")
        if len(self.axes_dims) != 3 or any(d % 2 for d in self.axes_dims):
            raise ValueError(f"MMDiTConfig.axes_dims must be three even numbers, got {self.axes_dims}")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(
                f"MMDiTConfig.axes_dims {self.axes_dims} sum to {sum(self.axes_dims)}, "
                f"but must sum to head_dim={self.head_dim}"
            )
        if self.in_channels != self.out_channels * self.patch_size**2:
            raise ValueError(
                f"MMDiTConfig.in_channels={self.in_channels} must equal out_channels * patch_size^2 "
                f"= {self.out_channels * self.patch_size**2}"
            )
        if self.out_channels != LATENT_CHANNELS:
            raise ValueError(
                f"MMDiTConfig.out_channels must be {LATENT_CHANNELS} (the VAE latent), got {self.out_channels}"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def full(cls) -> MMDiTConfig:
        return cls()

    @classmethod
    def tiny(cls) -> MMDiTConfig:
        """Two blocks, 64 wide: for tests and the self-test."""
        return cls(num_layers=2, num_heads=2, head_dim=32, text_dim=48, axes_dims=(8, 12, 12))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_diffusers(self) -> dict:
        """The diffusers ``transformer/config.json`` of this shape (the inverse of :meth:`from_diffusers`);
        ``QwenImageTransformer2DModel(**config)`` takes it once ``_class_name`` is dropped."""
        return {
            "_class_name": "QwenImageTransformer2DModel",
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.text_dim,
            "guidance_embeds": False,
            "axes_dims_rope": list(self.axes_dims),
            "zero_cond_t": False,
            "use_additional_t_cond": True,
            "use_layer3d_rope": True,
        }

    @classmethod
    def from_diffusers(cls, config: dict) -> MMDiTConfig:
        """From a diffusers ``transformer/config.json``; refuses a plain Qwen-Image config."""
        if not config.get("use_layer3d_rope", False) or not config.get("use_additional_t_cond", False):
            raise ValueError(
                "this transformer config is not Qwen-Image-Layered (it needs use_layer3d_rope and "
                "use_additional_t_cond set to true); it looks like a plain Qwen-Image or "
                "Qwen-Image-Edit model"
            )
        if config.get("guidance_embeds", False) or config.get("zero_cond_t", False):
            raise ValueError("guidance_embeds and zero_cond_t must be false for Qwen-Image-Layered")
        return cls(
            num_layers=config.get("num_layers", 60),
            num_heads=config.get("num_attention_heads", 24),
            head_dim=config.get("attention_head_dim", 128),
            text_dim=config.get("joint_attention_dim", 3584),
            in_channels=config.get("in_channels", 64),
            out_channels=config.get("out_channels", 16) or config.get("in_channels", 64),
            patch_size=config.get("patch_size", 2),
            axes_dims=tuple(config.get("axes_dims_rope", (16, 56, 56))),
        )

    @classmethod
    def from_dict(cls, config: dict) -> MMDiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig keys: {unknown}")
        values = dict(config)
        if "axes_dims" in values:
            values["axes_dims"] = tuple(values["axes_dims"])
        return cls(**values)


def timestep_features(sigma: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal features of 1000 * sigma, cosines first, in float32 (as ComfyUI computes them)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    angles = (sigma.float()[:, None] * freqs[None, :]) * 1000.0
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        self.linear_1 = ops.Linear(256, hidden, dtype=dtype, device=device)
        self.act = nn.SiLU()
        self.linear_2 = ops.Linear(hidden, hidden, dtype=dtype, device=device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class TimeEmbedding(nn.Module):
    """Timestep MLP plus the learned ``addition_t_embedding`` row that marks Qwen-Image-Layered."""

    def __init__(self, hidden: int, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        self.timestep_embedder = TimestepEmbedder(hidden, dtype=dtype, device=device, operations=operations)
        self.addition_t_embedding = ops.Embedding(2, hidden, dtype=dtype, device=device)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype, flag: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_features(sigma).to(dtype))
        if flag is None:
            # The reference pipeline always passes 0 here.
            flag = torch.zeros(sigma.shape[0], dtype=torch.long, device=sigma.device)
        return emb + self.addition_t_embedding(flag).to(emb.dtype)


class GeluProjection(nn.Module):
    # class-wide choice of GELU epilogue (see kernels.linear_gelu); the benchmarks switch it to compare
    epilogue = "auto"

    def __init__(self, dim_in: int, dim_out: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.proj = resolve_operations(operations).Linear(dim_in, dim_out, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One GEMM with bias and tanh-GELU in its epilogue on GPUs: the 4x-wide hidden state is written once
        # instead of written, read and written again by a separate GELU kernel.
        return linear_gelu(x, self.proj, self.epilogue)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ratio: int, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        # net.1 is the reference's (inactive) dropout; kept as a slot so the weights keep their names.
        self.net = nn.ModuleList(
            [
                GeluProjection(dim, dim * ratio, dtype=dtype, device=device, operations=operations),
                nn.Identity(),
                ops.Linear(dim * ratio, dim, dtype=dtype, device=device),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class JointAttention(nn.Module):
    """Attention over [text ; image] with separate projections per stream, QK RMSNorm and RoPE."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim

        def linear(i, o):
            return ops.Linear(i, o, dtype=dtype, device=device)

        def norm():
            return ops.RMSNorm(head_dim, eps=eps, dtype=dtype, device=device)

        self.to_q, self.to_k, self.to_v = linear(dim, inner), linear(dim, inner), linear(dim, inner)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (
            linear(dim, inner),
            linear(dim, inner),
            linear(dim, inner),
        )
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = norm(), norm(), norm(), norm()
        self.to_out = nn.ModuleList([linear(inner, dim)])
        self.to_add_out = linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def forward(self, img, txt, pe, mask=None):
        """img (B, S_img, dim), txt (B, S_txt, dim); pe: the (S_txt + S_img, 1, D/2, 2) RoPE table."""
        text_len = txt.shape[1]
        # Per stream: project, split heads, RMSNorm, rotate; then join [text ; image] (one fused kernel on GPUs).
        q = norm_rope_join(
            self._heads(self.add_q_proj(txt)), self._heads(self.to_q(img)), self.norm_added_q, self.norm_q, pe
        )
        k = norm_rope_join(
            self._heads(self.add_k_proj(txt)), self._heads(self.to_k(img)), self.norm_added_k, self.norm_k, pe
        )
        v = torch.cat([self._heads(self.add_v_proj(txt)), self._heads(self.to_v(img))], 1)
        out = attention(q, k, v, mask)  # (B, S, H * D)
        # The image projection runs over all S rows and its text rows are dropped: slicing the input instead
        # would copy the image rows out of every sample first (a (B, S - L) slice of (B, S) is not one matrix).
        return self.to_out[0](out)[:, text_len:], self.to_add_out(out[:, :text_len])


class DualStreamBlock(nn.Module):
    """One MMDiT block: AdaLN-modulated attention and MLP, separate weights per stream."""

    def __init__(self, config: MMDiTConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        dim, eps = config.hidden_size, config.eps
        kw = dict(dtype=dtype, device=device)
        self.img_mod = nn.Sequential(nn.SiLU(), ops.Linear(dim, 6 * dim, **kw))
        self.txt_mod = nn.Sequential(nn.SiLU(), ops.Linear(dim, 6 * dim, **kw))
        self.img_norm1 = ops.LayerNorm(dim, elementwise_affine=False, eps=eps, **kw)
        self.img_norm2 = ops.LayerNorm(dim, elementwise_affine=False, eps=eps, **kw)
        self.txt_norm1 = ops.LayerNorm(dim, elementwise_affine=False, eps=eps, **kw)
        self.txt_norm2 = ops.LayerNorm(dim, elementwise_affine=False, eps=eps, **kw)
        self.attn = JointAttention(dim, config.num_heads, config.head_dim, eps, operations=operations, **kw)
        self.img_mlp = FeedForward(dim, config.mlp_ratio, operations=operations, **kw)
        self.txt_mlp = FeedForward(dim, config.mlp_ratio, operations=operations, **kw)

    def forward(self, img, txt, temb, pe, mask=None):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(temb)[:, None].chunk(6, -1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(temb)[:, None].chunk(6, -1)

        # The residual streams may be wider than the compute dtype (float32 under bf16 weights):
        # layer inputs are cast down, updates are accumulated at full width.
        dtype = temb.dtype
        img_attn, txt_attn = self.attn(
            modulate(self.img_norm1(img), img_shift1, img_scale1).to(dtype),
            modulate(self.txt_norm1(txt), txt_shift1, txt_scale1).to(dtype),
            pe,
            mask,
        )
        img = torch.addcmul(img, img_gate1, img_attn)
        txt = torch.addcmul(txt, txt_gate1, txt_attn)

        img_mlp = self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2).to(dtype))
        img = torch.addcmul(img, img_gate2, img_mlp)
        txt_mlp = self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2).to(dtype))
        txt = torch.addcmul(txt, txt_gate2, txt_mlp)
        if dtype == torch.float16:
            # fp16 activations of this model overflow; like the reference, clip the streams to fp16's range
            # (an inf update would otherwise turn into NaN in the next LayerNorm).
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class OutputNorm(nn.Module):
    """Final AdaLN: LayerNorm, then scale and shift (in that order in the weight) from the timestep."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        self.linear = ops.Linear(dim, 2 * dim, dtype=dtype, device=device)
        self.norm = ops.LayerNorm(dim, elementwise_affine=False, eps=eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(nn.functional.silu(temb))[:, None].chunk(2, -1)
        return modulate(self.norm(x), shift, scale).to(temb.dtype)


def pack_latents(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, C, F, H, W) latent frames -> (B, F * H/p * W/p, C * p * p) tokens, channel-major per patch."""
    return rearrange(latents, "b c f (h ph) (w pw) -> b (f h w) (c ph pw)", ph=patch, pw=patch)


def image_token_count(layer_count: int, latent_height: int, latent_width: int, patch_size: int = 2) -> int:
    """Image tokens of one decomposition's forward: the composite, ``layer_count`` layers and the condition
    frame, each (h / patch) x (w / patch) patches."""
    return (layer_count + 2) * (latent_height // patch_size) * (latent_width // patch_size)


def unpack_latents(tokens: torch.Tensor, frames: int, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack_latents`; height and width are in latent pixels."""
    return rearrange(
        tokens,
        "b (f h w) (c ph pw) -> b c f (h ph) (w pw)",
        f=frames,
        h=height // patch,
        w=width // patch,
        ph=patch,
        pw=patch,
    )


class VLDMMDiT(nn.Module):
    """The Qwen-Image-Layered transformer.

    ``operations`` builds every Linear/LayerNorm/RMSNorm/Embedding (``comfy.ops`` under ComfyUI);
    ``dtype`` is the weight dtype, and activations run in ``compute_dtype`` (bf16 when the
    weights are float8).
    """

    def __init__(self, config: MMDiTConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        self.config = config
        dim = config.hidden_size
        kw = dict(dtype=dtype, device=device)
        self.compute_dtype = torch.bfloat16 if dtype in FP8_DTYPES else (dtype or torch.float32)
        # float32 residual streams: bf16 rounding of the running sum is the largest error source over
        # 60 blocks; the cost is elementwise traffic only (see benchmarks/bench_mmdit.py).
        self.residual_dtype = torch.float32
        self.time_text_embed = TimeEmbedding(dim, operations=operations, **kw)
        self.txt_norm = ops.RMSNorm(config.text_dim, eps=config.eps, **kw)
        self.img_in = ops.Linear(config.in_channels, dim, **kw)
        self.txt_in = ops.Linear(config.text_dim, dim, **kw)
        self.transformer_blocks = nn.ModuleList(
            [DualStreamBlock(config, operations=operations, **kw) for _ in range(config.num_layers)]
        )
        self.norm_out = OutputNorm(dim, config.eps, operations=operations, **kw)
        self.proj_out = ops.Linear(dim, config.patch_size**2 * config.out_channels, **kw)

    def forward(
        self,
        latents: torch.Tensor,
        condition: torch.Tensor,
        text: torch.Tensor,
        sigma: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        transformer_options: dict | None = None,
        sequence=None,
    ) -> torch.Tensor:
        """Velocity of the noisy frames.

        latents: (B, 16, F, h, w) noisy frames (frame 0 the composite, 1..N the layers);
        condition: (B, 16, h, w) normalised latent of the input image; text: (B, L, text_dim)
        prompt embeddings with optional boolean ``text_mask`` (B, L); sigma: (B,) in [0, 1];
        ``sequence``: see :meth:`forward_tokens`.
        Returns (B, 16, F, h, w) in the dtype of ``latents``.
        """
        condition = self._check_inputs(latents, condition, text, sigma, text_mask)
        frames, height, width = latents.shape[2:]
        tokens = torch.cat(
            [
                pack_latents(latents, self.config.patch_size),
                pack_latents(condition[:, :, None], self.config.patch_size),
            ],
            dim=1,
        )
        out = self.forward_tokens(
            tokens,
            text,
            sigma,
            frames,
            height // self.config.patch_size,
            width // self.config.patch_size,
            text_mask,
            transformer_options,
            sequence,
        )
        return unpack_latents(out, frames, height, width, self.config.patch_size).to(latents.dtype)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        text: torch.Tensor,
        sigma: torch.Tensor,
        noisy_frames: int,
        grid_height: int,
        grid_width: int,
        text_mask: torch.Tensor | None = None,
        transformer_options: dict | None = None,
        sequence=None,
    ) -> torch.Tensor:
        """The transformer on packed tokens: ``tokens`` holds the noisy frames then the condition
        frame, each ``grid_height * grid_width`` 2x2 patches. Returns the noisy frames' output tokens.

        ``sequence`` (a :class:`~layered_core.distributed.sequence.SequenceParallel`) runs this process's part of
        the joint sequence: the tokens, text, RoPE table and mask are cut to it, attention gathers the sequence
        across the processes, and the output tokens are gathered back. None runs the whole sequence here."""
        noisy_tokens = noisy_frames * grid_height * grid_width
        text_pos, image_pos = layered_positions(noisy_frames, grid_height, grid_width, text.shape[1], tokens.device)
        # (S, 1, D/2, 2): broadcasts over the heads of (B, S, H, D) queries and keys
        pe = rope_cos_sin(torch.cat([text_pos, image_pos]), self.config.axes_dims, self.config.rope_theta)[:, None]
        mask = None
        if text_mask is not None and not bool(text_mask.all()):
            mask = torch.cat([text_mask.bool(), text_mask.new_ones(tokens.shape[:2], dtype=torch.bool)], dim=1)
        shard = None
        if sequence is not None:
            shard = sequence.shard(text.shape[1], tokens.shape[1])
            tokens, text, pe, mask = shard.cut(tokens, text, pe, mask)

        dtype = self.compute_dtype
        img = self.img_in(tokens.to(dtype)).to(self.residual_dtype)
        txt = self.txt_in(self.txt_norm(text.to(dtype))).to(self.residual_dtype)
        temb = self.time_text_embed(sigma, dtype)
        with attention_override(shard):
            img, txt = self._blocks(img, txt, temb, pe, mask, transformer_options)
        if shard is None:
            return self.proj_out(self.norm_out(img[:, :noisy_tokens], temb))
        # every token's output is its own (a norm and a linear): this process's, then all of them gathered
        return shard.gather(self.proj_out(self.norm_out(img, temb)))[:, :noisy_tokens]

    def _blocks(self, img, txt, temb, pe, mask, transformer_options: dict | None):
        """The dual-stream blocks, each through ComfyUI's block-replacement hook when one is set for it."""
        transformer_options = dict(transformer_options or {})
        replaced = transformer_options.get("patches_replace", {}).get("dit", {})
        transformer_options["total_blocks"] = len(self.transformer_blocks)
        transformer_options["block_type"] = "double"
        for index in range(len(self.transformer_blocks)):
            transformer_options["block_index"] = index
            patch = replaced.get(("double_block", index))
            if patch is None:
                img, txt = self.run_block(index, img, txt, temb, pe, mask, transformer_options)
            else:
                # ComfyUI's block-replacement hook: the patch gets the block's inputs and the original.
                def original(args, index=index):
                    out_img, out_txt = self.run_block(
                        index,
                        args["img"],
                        args["txt"],
                        args["vec"],
                        args["pe"],
                        mask,
                        args.get("transformer_options", transformer_options),
                    )
                    return {"img": out_img, "txt": out_txt}

                out = patch(
                    {
                        "img": img,
                        "txt": txt,
                        "vec": temb,
                        "pe": pe,
                        "transformer_options": transformer_options,
                    },
                    {"original_block": original},
                )
                img, txt = out["img"], out["txt"]
        return img, txt

    def run_block(
        self,
        index: int,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        pe: torch.Tensor,
        mask: torch.Tensor | None,
        transformer_options: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index`` on the streams; the place where a model that holds its weights elsewhere (ComfyUI's
        model management) runs a block its own way."""
        return self.transformer_blocks[index](img, txt, temb, pe, mask)

    def compile_blocks(self, mode: str | None = None) -> None:
        """Regional ``torch.compile`` of the blocks' ``forward``: one graph serves every block (same code, same
        shapes, the parameters its inputs), so compiling costs about one block's worth of time, and the elementwise
        work between the matrix products is fused. The module call around ``forward`` stays eager, hooks included:
        weight streaming points a block's parameters at its slot there, and the graph runs on whatever memory that
        is (a ``mode`` with CUDA graphs would record one per weight address). A new shape compiles on first use."""
        compiled = {}
        for block in self.transformer_blocks:
            if type(block) not in compiled:
                compiled[type(block)] = torch.compile(type(block).forward, mode=mode)
            block.forward = types.MethodType(compiled[type(block)], block)

    def uncompile_blocks(self) -> None:
        """Back to eager blocks."""
        for block in self.transformer_blocks:
            vars(block).pop("forward", None)

    @property
    def blocks_compiled(self) -> bool:
        """Whether :meth:`compile_blocks` compiled the blocks (and no :meth:`uncompile_blocks` since)."""
        return all("forward" in vars(block) for block in self.transformer_blocks)

    def _check_inputs(self, latents, condition, text, sigma, text_mask):
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(
                f"latents must be (batch, {LATENT_CHANNELS}, frames, height, width), got {tuple(latents.shape)}"
            )
        batch, channels, frames, height, width = latents.shape
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"latent height and width must be multiples of {patch}, got {height}x{width}")
        if condition.ndim == 5 and condition.shape[2] == 1:
            condition = condition[:, :, 0]
        if tuple(condition.shape) != (batch, channels, height, width):
            raise ValueError(
                f"condition latent must be {(batch, channels, height, width)} to match the noisy latents, "
                f"got {tuple(condition.shape)}"
            )
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.config.text_dim:
            raise ValueError(
                f"text embeddings must be ({batch}, length, {self.config.text_dim}), got {tuple(text.shape)}"
            )
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must have shape ({batch},), got {tuple(sigma.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        return condition
