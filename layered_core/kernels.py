"""Fused GPU kernels for the transformer's elementwise work, each with the plain PyTorch code it replaces.

:func:`norm_rope_join` takes the text and image query (or key) projections to the joined, normalised, rotated
tensor attention reads. In PyTorch that is RMSNorm, RoPE and a concatenation per stream, which torch.compile
turns into three passes over the data; the Triton kernel here reads
each projection once and writes the joined tensor once. It runs on CUDA tensors where Triton is installed; the
PyTorch code serves everywhere else and is the reference the GPU tests compare against.

:func:`linear_gelu` is the MLP's first projection with its tanh-GELU in the GEMM's epilogue, so the 4x-wide
hidden state is written once. Where quack's CuTe GEMMs are installed (they come with FlashAttention-4, the
``flash4`` extra) it uses quack's on Hopper and Blackwell GPUs for large row counts, where it beat cuBLASLt's GELU
epilogue (benchmarks/bench_kernels.py); cuBLASLt's serves elsewhere on CUDA (and for the short text stream). On the
CPU it is a linear and a GELU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _find_quack() -> bool:
    # by its distribution name: "quack" alone is a common module name; the lookup imports nothing
    try:
        importlib.metadata.version("quack-kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("quack") is not None


QUACK_INSTALLED = _find_quack()
GELU_EPILOGUES = ("auto", "cublaslt", "none")
# quack's default tile wins on the image stream's thousands of rows and loses on the text stream's few hundred
# (benchmarks/RESULTS.md); below this many rows cuBLASLt keeps the GEMM
QUACK_MIN_ROWS = 4096


def _comfy_patched(module: nn.Module) -> bool:
    """Whether ComfyUI casts, patches or offloads this module's weights inside its forward (comfy.ops flags)."""
    return bool(
        getattr(module, "comfy_cast_weights", False)
        or getattr(module, "weight_function", None)
        or getattr(module, "bias_function", None)
    )


def _linear_forward(linear: nn.Module) -> bool:
    """Whether the module's forward is nn.Linear's, or ComfyUI's comfy.ops one (which is nn.Linear's unless the
    flags plain_linear checks are set). A subclass with its own forward (a LoRA wrapper, say) is not."""
    forward = type(linear).forward
    if forward is nn.Linear.forward:
        return True
    return (
        getattr(forward, "__module__", None) == "comfy.ops"
        and getattr(forward, "__qualname__", None) == "disable_weight_init.Linear.forward"
    )


def plain_linear(linear: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a torch.nn.Linear (or ComfyUI's) that a fused kernel may use in place of calling it: plain
    tensors on x's device and in x's dtype, no hooks, and no casting, patches or offloading in its forward. None
    otherwise."""
    if not isinstance(linear, nn.Linear) or not _linear_forward(linear):
        return None
    if linear._forward_hooks or linear._forward_pre_hooks or _comfy_patched(linear):
        return None
    weight, bias = linear.weight, linear.bias
    if weight is None:  # ComfyUI loads some weights lazily
        return None
    for tensor in (weight,) if bias is None else (weight, bias):
        # a tensor subclass (a quantized weight, say) needs its own kernels
        if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.device != x.device or tensor.dtype != x.dtype:
            return None
    return weight, bias


def linear_gelu_reference(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    return F.gelu(linear(x), approximate="tanh")


def quack_gelu_problem(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why quack's GEMM cannot take this call, or None when it can (static checks: torch.compile folds them)."""
    if not QUACK_INSTALLED:
        return "quack-kernels is not installed"
    if not x.is_cuda or torch.version.hip:
        return f"it runs on NVIDIA GPUs only, the input is on {x.device}"
    if torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
        return "it needs compute capability 9.x or 10.x"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bf16 or fp16, got {x.dtype}"
    if x.shape[-1] % 8 or weight.shape[0] % 8:
        return "the widths must be multiples of 8 (16-byte rows for the TMA bulk copies)"
    if not weight.is_contiguous():
        return "the weight must be contiguous"
    if x.numel() // x.shape[-1] < QUACK_MIN_ROWS:
        return f"fewer than {QUACK_MIN_ROWS} rows, where cuBLASLt is faster"
    return None


def linear_gelu(x: torch.Tensor, linear: nn.Module, epilogue: str = "auto") -> torch.Tensor:
    """tanh-GELU(linear(x)) with the GELU in the GEMM's epilogue where it can be. ``epilogue``: ``"auto"``
    (quack's GEMM where it can run, else cuBLASLt's on CUDA), ``"cublaslt"`` or ``"none"`` (two ops; the
    benchmarks compare them)."""
    if epilogue not in GELU_EPILOGUES:
        raise ValueError(f"epilogue must be one of {GELU_EPILOGUES}, got {epilogue!r}")
    plain = None
    if x.is_cuda and epilogue != "none" and x.dim() >= 2 and x.numel() > 0:
        plain = plain_linear(linear, x)
    if plain is None:
        return linear_gelu_reference(x, linear)
    weight, bias = plain
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return linear_gelu_reference(x, linear)  # neither fused op has a backward
    rows = x.flatten(0, -2)
    if epilogue == "auto" and quack_gelu_problem(x, weight) is None:
        out = torch.ops.qwen_layered.quack_linear_gelu(rows.contiguous(), weight, bias)
    else:
        out = _cublaslt_linear_gelu(rows, weight, bias)
    return out.unflatten(0, x.shape[:-1])


def _cublaslt_linear_gelu(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """cuBLASLt's bias + GELU epilogue on (M, K) rows; without a bias, a linear and a GELU. CUDA only: on the CPU
    this op applies the exact GELU, not the tanh form the model uses."""
    if bias is None:
        return F.gelu(F.linear(rows, weight), approximate="tanh")
    return torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)


@torch.library.custom_op("qwen_layered::quack_linear_gelu", mutates_args=())
def _quack_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Opaque to torch.compile, like the attention op; quack's default tile for the GPU (no autotuning, which
    # would compile dozens of kernels on first use). x (M, K) contiguous, weight (N, K) as nn.Linear holds it.
    gemm_act = _quack_gemm_act()
    aligned = all(t is None or t.data_ptr() % 16 == 0 for t in (x, weight, bias))
    if gemm_act is None or not aligned:
        # quack unusable here (it failed to import, or the data is not 16-byte aligned for its bulk copies)
        return _cublaslt_linear_gelu(x, weight, bias)
    with torch.cuda.device(x.device):
        _, out = gemm_act(x, weight.t(), bias=bias, activation="gelu_tanh_approx", store_preact=False, tuned=False)
    return out


_QUACK_GEMM_ACT = None


def _quack_gemm_act():
    """quack's gemm_act, imported on first use; None (with one warning) if the installed quack cannot be imported,
    so that a broken install falls back to cuBLASLt instead of failing every MLP."""
    global _QUACK_GEMM_ACT
    if _QUACK_GEMM_ACT is None:
        try:
            from quack.gemm_interface import gemm_act
        except Exception as error:  # an ImportError, or the CuTe DSL failing to load its libraries
            warnings.warn(f"quack-kernels is installed but cannot be imported ({error}); using cuBLASLt", stacklevel=2)
            gemm_act = False
        _QUACK_GEMM_ACT = gemm_act
    return _QUACK_GEMM_ACT or None


@_quack_linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def norm_rope_join_reference(
    txt: torch.Tensor, img: torch.Tensor, txt_norm: nn.Module, img_norm: nn.Module, pe: torch.Tensor
) -> torch.Tensor:
    """[rope(txt_norm(txt)) ; rope(img_norm(img))] along the sequence. txt (B, L, H, D), img (B, S - L, H, D),
    pe the (S, 1, D/2, 2) table of the joined sequence."""
    text_len = txt.shape[1]
    return torch.cat([apply_rope(txt_norm(txt), pe[:text_len]), apply_rope(img_norm(img), pe[text_len:])], 1)


def _plain_weight(norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The RMSNorm's weight if the kernel may use it as it is: a torch.nn.RMSNorm (or ComfyUI's subclass) whose
    weight sits on x's device, with no casting, patches or offloading in its forward."""
    if not isinstance(norm, nn.RMSNorm) or norm.weight is None or norm.normalized_shape != (x.shape[-1],):
        return None
    if _comfy_patched(norm) or norm.weight.device != x.device:
        return None
    if norm.weight.dtype not in (x.dtype, torch.float32):
        return None
    return norm.weight


def _eps(norm: nn.RMSNorm, x: torch.Tensor) -> float:
    # nn.RMSNorm's eps=None means the dtype's machine epsilon
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps


def norm_rope_join(
    txt: torch.Tensor, img: torch.Tensor, txt_norm: nn.Module, img_norm: nn.Module, pe: torch.Tensor
) -> torch.Tensor:
    """As :func:`norm_rope_join_reference`, in one fused kernel where it can run (CUDA, Triton, bf16 or fp16,
    power-of-two head size, plain RMSNorm weights, no autograd); otherwise the reference itself."""
    head_dim = txt.shape[-1]
    fused = (
        TRITON_INSTALLED
        and txt.is_cuda
        and img.device == txt.device
        and txt.dtype in (torch.bfloat16, torch.float16)
        and img.dtype == txt.dtype
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and pe.dtype == torch.float32
        and pe.device == txt.device
        and tuple(pe.shape) == (txt.shape[1] + img.shape[1], 1, head_dim // 2, 2)
        and not (torch.is_grad_enabled() and (txt.requires_grad or img.requires_grad))
    )
    if fused:
        w_txt, w_img = _plain_weight(txt_norm, txt), _plain_weight(img_norm, img)
        fused = (
            w_txt is not None
            and w_img is not None
            and w_txt.dtype == w_img.dtype
            and _eps(txt_norm, txt) == _eps(img_norm, img)
        )
    if not fused:
        return norm_rope_join_reference(txt, img, txt_norm, img_norm, pe)
    return torch.ops.qwen_layered.norm_rope_join(txt, img, w_txt, w_img, pe, _eps(txt_norm, txt))


@torch.library.custom_op("qwen_layered::norm_rope_join", mutates_args=())
def _norm_rope_join(
    txt: torch.Tensor, img: torch.Tensor, w_txt: torch.Tensor, w_img: torch.Tensor, pe: torch.Tensor, eps: float
) -> torch.Tensor:
    batch, text_len, heads, head_dim = txt.shape
    seq = text_len + img.shape[1]
    out = torch.empty(batch, seq, heads, head_dim, device=txt.device, dtype=txt.dtype)
    txt, img, pe = txt.contiguous(), img.contiguous(), pe.reshape(seq, head_dim).contiguous()
    with torch.cuda.device(txt.device):
        _launch(txt, img, w_txt.contiguous(), w_img.contiguous(), pe, out, eps)
    return out


@_norm_rope_join.register_fake
def _(txt, img, w_txt, w_img, pe, eps):
    batch, text_len, heads, head_dim = txt.shape
    return txt.new_empty(batch, text_len + img.shape[1], heads, head_dim)


def _launch(txt, img, w_txt, w_img, pe, out, eps):
    batch, text_len, heads, head_dim = txt.shape
    seq = out.shape[1]
    _kernel()[(batch * seq,)](
        txt,
        img,
        w_txt,
        w_img,
        pe,
        out,
        seq,
        text_len,
        eps,
        HEADS=heads,
        BLOCK_HEADS=triton_next_power_of_2(heads),
        HEAD_DIM=head_dim,
        num_warps=4,
    )


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


_KERNEL = None


def _kernel():
    """The Triton kernel, defined on first use so that importing this module needs no Triton."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def norm_rope_join_kernel(
        txt_ptr,
        img_ptr,
        w_txt_ptr,
        w_img_ptr,
        pe_ptr,
        out_ptr,
        seq,
        text_len,
        eps,
        HEADS: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        # one program per (sample, token): all heads of that token
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq
        s = pid % seq
        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        dims = tl.arange(0, HEAD_DIM)[None, :]
        mask = heads < HEADS
        offsets = heads * HEAD_DIM + dims
        if s < text_len:
            x = tl.load(txt_ptr + (b * text_len + s) * HEADS * HEAD_DIM + offsets, mask=mask, other=0.0)
            w = tl.load(w_txt_ptr + dims)
        else:
            rows = seq - text_len
            x = tl.load(img_ptr + (b * rows + s - text_len) * HEADS * HEAD_DIM + offsets, mask=mask, other=0.0)
            w = tl.load(w_img_ptr + dims)
        x = x.to(tl.float32)
        # RMSNorm over each head, in float32
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        x = x * rstd[:, None] * w.to(tl.float32)
        # RoPE: rotate interleaved pairs (x[2i], x[2i+1]) by the token's angles
        real, imag = tl.split(tl.reshape(x, (BLOCK_HEADS, HEAD_DIM // 2, 2)))
        cos, sin = tl.split(tl.reshape(tl.load(pe_ptr + s * HEAD_DIM + dims), (1, HEAD_DIM // 2, 2)))
        rotated = tl.join(real * cos - imag * sin, real * sin + imag * cos)
        rotated = tl.reshape(rotated, (BLOCK_HEADS, HEAD_DIM))
        tl.store(
            out_ptr + (b * seq + s) * HEADS * HEAD_DIM + offsets,
            rotated.to(out_ptr.dtype.element_ty),
            mask=mask,
        )

    _KERNEL = norm_rope_join_kernel
    return _KERNEL
