"""Layer factories ("operations") the models are built from.

Every model module takes ``operations=None`` and builds its layers as ``operations.Linear(...)``.
Plain PyTorch gets :class:`TorchOps`; ComfyUI passes its ``comfy.ops`` family instead, which is
what gives weight casting, low-VRAM streaming and LoRA patching there.

:class:`FP8Linear` holds a float8 e4m3 weight with its per-tensor scale, as ComfyUI's scaled fp8
files store them, so a 20 GB fp8 checkpoint stays 20 GB in memory. On GPUs with fp8 tensor cores
(compute capability 8.9+: Ada, Hopper) it also multiplies in fp8, through ``torch._scaled_mm``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class TorchOps:
    """Plain ``torch.nn`` layers: the default ``operations``."""

    Linear = nn.Linear
    Conv2d = nn.Conv2d
    LayerNorm = nn.LayerNorm
    RMSNorm = nn.RMSNorm
    Embedding = nn.Embedding


def resolve_operations(operations):
    return TorchOps if operations is None else operations


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# An all-zero row still gets a finite, non-zero scale (its fp8 values are all zero either way).
AMAX_FLOOR = 1e-12
FP8_COMPUTE_MODES = ("auto", "fp8", "dequantize")


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether ``device`` has fp8 tensor cores that ``torch._scaled_mm`` uses with rowwise scales.

    CUDA compute capability 8.9 (Ada) or later. ROCm is left out: its fp8 matmul wants the ``fnuz``
    variant on MI300, not the ``e4m3fn`` the checkpoints hold.
    """
    if device.type != "cuda" or torch.version.hip:
        return False
    # get_device_properties, unlike get_device_capability, is constant-folded by torch.compile.
    properties = torch.cuda.get_device_properties(device)
    return (properties.major, properties.minor) >= (8, 9)


FUSED_BIAS_MIN_ROWS = 256
"""From this many rows on the fp8 product adds the bias in its epilogue (the row counts it was run at)."""


def quantize_rows_fp8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) dynamic e4m3 quantisation of a 2-D activation.

    Returns ``(rows / scale in float8_e4m3fn, scale)`` with ``scale = amax(|row|) / 448`` as a float32
    (M, 1) tensor, so each row's largest value maps to the top of the fp8 range. One outlier token
    then costs precision in its own row only, which per-tensor scaling would spread over all rows.
    """
    amax = torch.linalg.vector_norm(rows, ord=float("inf"), dim=-1, keepdim=True).to(torch.float32)
    scale = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    # Dividing promotes to float32; the clamp guards the cast against rounding just past 448 (e4m3fn
    # has no infinity: an out-of-range value would become NaN).
    quantized = (rows / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    fp8_matmul: bool,
    fast_accum: bool = True,
) -> torch.Tensor:
    """The product :class:`FP8Linear` computes, of ``x`` (..., in) with a float8 ``weight`` (out, in) whose real
    values are ``weight.float() * scale`` (``scale`` a float32 scalar tensor), plus ``bias``; in ``x``'s dtype.

    With ``fp8_matmul`` (what :meth:`FP8Linear.uses_fp8_matmul` decides) the rows of ``x`` are quantised to e4m3 and
    multiplied by ``torch._scaled_mm`` (bf16 output, reduced-precision accumulation with ``fast_accum``); otherwise
    the weight is dequantised to ``x``'s dtype and ``F.linear`` runs. The choice is a Python bool, so a compiled
    caller traces one branch without a graph break."""
    if not fp8_matmul:
        return F.linear(x, dequantize_fp8(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    if rows.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], out_features)
    x_fp8, x_scale = quantize_rows_fp8(rows)
    # Rowwise scaling wants both scales as contiguous float32 2-D tensors: (M, 1) and (1, N); the per-tensor weight
    # scale is repeated along N.
    weight_scale = scale.to(torch.float32).expand(1, out_features).clone(memory_format=torch.contiguous_format)
    bias = None if bias is None else bias.to(torch.bfloat16)
    # cuBLASLt has no rowwise-scaled fp8 algorithm with a bias epilogue for a few rows (the text stream of a short
    # negative prompt): there the bias is added after the product.
    fused_bias = bias if rows.shape[0] >= FUSED_BIAS_MIN_ROWS else None
    out = torch._scaled_mm(
        x_fp8.contiguous(),  # row-major (M, K)
        weight.t(),  # column-major (K, N): a view of the (N, K) weight, no copy
        scale_a=x_scale,
        scale_b=weight_scale,
        bias=fused_bias,
        out_dtype=torch.bfloat16,
        use_fast_accum=fast_accum,
    )
    if bias is not None and fused_bias is None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


class FP8Linear(nn.Module):
    """A Linear whose weight stays in float8 with a float32 per-tensor scale.

    ``weight_real = weight.float() * weight_scale``. ``compute`` picks the matmul:

    - ``"fp8"``: activations are quantised per row to e4m3 on the fly and multiplied with the fp8
      weight by ``torch._scaled_mm`` (fp8 tensor cores, bf16 output); twice the bf16 matmul rate on
      Hopper, and the weight is never widened.
    - ``"dequantize"``: the weight is dequantised just in time to the input's dtype and ``F.linear``
      runs; only one layer's weight is ever held at full precision.
    - ``"auto"`` (default): ``"fp8"`` where it is supported and exact in its layout (CUDA capability
      8.9+, e4m3 weight, bf16 input, both weight dimensions multiples of 16, no autograd), else
      ``"dequantize"``. On CPU this is always ``"dequantize"``: the CPU fp8 matmul exists but is slower.

    ``fast_accum`` (default on) lets the fp8 kernel accumulate at reduced precision: a faster step with the same
    error against bf16 (``benchmarks/bench_step.py``, variants fp8-keep-mod and fp8-keep-mod-fast; figures in
    benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        compute: str = "auto",
        fast_accum: bool = True,
    ):
        super().__init__()
        if compute not in FP8_COMPUTE_MODES:
            raise ValueError(f"FP8Linear compute must be one of {', '.join(FP8_COMPUTE_MODES)}, got {compute!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute = compute
        self.fast_accum = fast_accum
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=torch.float8_e4m3fn),
            requires_grad=False,
        )
        self.register_buffer("weight_scale", torch.ones((), device=device, dtype=torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def like(cls, linear: nn.Linear, compute: str = "auto") -> FP8Linear:
        """An empty FP8Linear on the meta device shaped like ``linear`` (for assign-loading)."""
        return cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", compute=compute
        )

    def _apply(self, fn, recurse=True):
        # Module.to(dtype), .bfloat16() and .half() cast every floating-point tensor, float8 included,
        # which would silently turn this layer back into a full-precision one. The fp8 weight and its
        # float32 scale keep their dtypes and only follow moves between devices; the bias is cast.
        # detach(): Module._apply swaps a parameter's data in place, so keep the tensors themselves.
        weight, scale = self.weight.detach(), self.weight_scale.detach()
        super()._apply(fn, recurse)
        if self.weight.dtype != weight.dtype:
            self.weight = nn.Parameter(weight.to(self.weight.device), requires_grad=False)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    def fp8_matmul_problem(self, x: torch.Tensor) -> str | None:
        """Why the fp8 matmul cannot run on ``x`` here, or None when it can.

        Everything checked is static (dtypes, shapes, device), so torch.compile traces the choice
        without a graph break.
        """
        if self.weight.dtype != torch.float8_e4m3fn:
            # The rowwise kernels take an e4m3 second operand only.
            return f"the weight is {self.weight.dtype}, the fp8 matmul needs float8_e4m3fn"
        if x.device.type == "cuda":
            if not fp8_matmul_supported(x.device):
                return f"{x.device} has no fp8 tensor cores (compute capability 8.9+ needed)"
            # cuBLASLt/CUTLASS fp8 operands must be 16-byte aligned: K and N multiples of 16 (M is free).
            if self.in_features % 16 or self.out_features % 16:
                return f"in_features={self.in_features} and out_features={self.out_features} must be multiples of 16"
            if not self.weight.is_contiguous():
                return "the weight is not contiguous, so weight.t() is not column-major"
        return None

    def uses_fp8_matmul(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the fp8 matmul (raises if ``compute="fp8"`` cannot)."""
        if self.compute == "dequantize":
            return False
        problem = self.fp8_matmul_problem(x)
        if self.compute == "fp8":
            if problem is not None:
                raise ValueError(
                    f"FP8Linear({self.in_features} -> {self.out_features}) with compute='fp8' cannot run: {problem}; "
                    "use compute='auto' to fall back to dequantising"
                )
            return True
        return (
            problem is None
            and fp8_matmul_supported(x.device)
            # bf16 is the output dtype every torch version's rowwise kernel supports.
            and x.dtype == torch.bfloat16
            # _scaled_mm has no backward.
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.uses_fp8_matmul(x), self.fast_accum)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fp8={self.weight.dtype}, "
            f"compute={self.compute}"
        )


def set_fp8_compute(model: nn.Module, compute: str = "auto", fast_accum: bool = True) -> int:
    """Set the matmul mode of every :class:`FP8Linear` in ``model``; returns how many there are."""
    if compute not in FP8_COMPUTE_MODES:
        raise ValueError(f"compute must be one of {', '.join(FP8_COMPUTE_MODES)}, got {compute!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.compute = compute
            module.fast_accum = fast_accum
            count += 1
    return count


def quantize_fp8(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled float8: returns (weight / scale in fp8, float32 scale), amax mapped to the fp8 max."""
    amax = weight.detach().abs().max().to(torch.float32).clamp(min=1e-12)
    scale = amax / torch.finfo(dtype).max
    return (weight.to(torch.float32) / scale).to(dtype), scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The real weight of a scaled float8 tensor, in ``dtype``: ``weight.float() * scale``."""
    return (weight.to(torch.float32) * scale).to(dtype)


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Block linears are what ComfyUI's fp8mixed files quantise; embeddings and norms stay bf16."""
    return name.startswith("transformer_blocks.") and name.endswith(".weight") and tensor.ndim == 2


def quantize_linears_fp8(
    model: nn.Module, predicate: Callable[[str, torch.Tensor], bool] | None = None, compute: str = "auto"
) -> list[str]:
    """Turn a loaded model's linears into :class:`FP8Linear` with per-tensor-scaled e4m3 weights, in place.

    ``predicate(weight_name, weight)`` picks the layers; it defaults to :func:`is_quantizable`, the rule
    ComfyUI's fp8mixed files and :func:`save_mmdit`'s fp8 layouts follow, so the result has the
    layout of ``load_mmdit(<fp8 file>, fp8="keep")``. Layers are converted one at a time on their own
    device and each full-precision weight is dropped as soon as its fp8 copy exists, so peak memory
    grows by one layer. Returns the names of the converted layers.
    """
    predicate = predicate or is_quantizable
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and predicate(f"{name}.weight", module.weight)
    ]
    with torch.no_grad():
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            quantized, scale = quantize_fp8(linear.weight)
            fp8 = FP8Linear.like(linear, compute=compute)
            fp8.weight = nn.Parameter(quantized, requires_grad=False)
            fp8.weight_scale = scale
            fp8.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
            setattr(parent, child, fp8)
            linear.weight = None  # freed now even if someone still holds the old module
            del linear, quantized
    return targets
