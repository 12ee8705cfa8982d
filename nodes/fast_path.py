"""The transformer's fast path inside ComfyUI, decided block by block.

ComfyUI's model management owns the weights: it loads, offloads, streams and LoRA-patches them, and its layers
(``comfy.ops``) fetch them inside their forward. A block whose layers all hold their weights in a state the pack can
read as they are runs the pack's own block on them instead (:mod:`..layered_core.functional_block`: one compiled
graph for every block, FlashAttention-4 where installed, the fused kernels, the pack's fp8 matmul); any other block
runs through ComfyUI's layers as before. The states read as they are:

- loaded in full by the classic ModelPatcher: weights on the compute device in the compute dtype (a LoRA merged into
  them by ComfyUI), or in float8 e4m3: raw (weight_dtype fp8_e4m3fn) or per-tensor scaled (the fp8mixed files,
  ComfyUI's QuantizedTensor), which run through :class:`~..layered_core.ops.FP8Linear` as on the command line;
- ComfyUI's dynamic VRAM (comfy-aimdo, its default on NVIDIA GPUs): the block's weights are fetched together by
  ComfyUI's own block prefetch (``comfy.model_prefetch``, which faults them into VRAM or stages them when VRAM is
  short, and applies LoRA patches there), handed to the block, and released after it.

With ``QWEN_LAYERED_COMFY_STREAMING=off`` (no block prefetch of :mod:`.comfy_streaming`), a block on the fast path
still fetches its weights as one batch through ComfyUI's prefetch, since its layers' own casting does not run.

A block steps aside when one of its layers is patched on each call (weight or bias functions: a LoRA on a partly
loaded model, a weight wrapper), has hooks, keeps its weights off the compute device (the classic lowvram mode) or in
another dtype or quantized format, or is not one of ComfyUI's layers (another pack replaced it).

What the model's ``run_block`` calls: :func:`fast_path_mode` and :func:`effective_mode` (the mode asked for, and what
it comes to on a device), :func:`block_fast_problem` (None when a block can run the fast path) and
:func:`run_fast_block`.
"""

from __future__ import annotations

import functools

import comfy.model_prefetch
import comfy.ops
import torch
from comfy.quant_ops import QuantizedTensor

from ..layered_core.compile_policy import compile_choice
from ..layered_core.functional_block import block_layers, block_template, call_block
from ..layered_core.mmdit import DualStreamBlock, MMDiTConfig

MODES = ("auto", "compiled", "eager", "off")
MODE_TOOLTIP = (
    "auto: on CUDA GPUs, blocks whose weights ComfyUI holds ready run the pack's own compiled block (FlashAttention-4,"
    " fused kernels, fp8 matmul); compiled / eager: that fast path, with or without torch.compile, on any device; "
    "off: every block through ComfyUI's layers"
)
OPTION = "qwen_layered_fast_path"
"""The key in ``transformer_options`` that holds the mode (Load VLD-MMDiT sets auto, the Transformer Fast Path node
another)."""
FP8_LAYOUTS = ("TensorCoreFP8Layout", "TensorCoreFP8E4M3Layout")
"""ComfyUI's per-tensor scaled float8 e4m3 layouts, the only quantized weights :class:`FP8Linear` reads."""


def fast_path_mode(transformer_options: dict | None) -> str:
    """The fast-path mode the MODEL's options ask for (``auto`` when they do not say)."""
    mode = (transformer_options or {}).get(OPTION, "auto")
    if mode not in MODES:
        raise ValueError(f"{OPTION} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


@functools.cache
def effective_mode(mode: str, device: torch.device) -> str:
    """What ``mode`` comes to on ``device``: "compiled", "eager" or "off". ``auto`` takes the command line's compile
    policy on CUDA GPUs (compiled where Triton can, for a process that keeps its compiled code) and is off
    elsewhere: on the CPU the pack's block is ComfyUI's math with nothing fused."""
    if mode not in MODES:
        raise ValueError(f"fast path mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "off"
    return "compiled" if compile_choice("auto", device, None)[0] else "eager"


def _comfy_layer(module: torch.nn.Module) -> bool:
    """One of ComfyUI's layers (the ``comfy.ops`` families) with ComfyUI's own forward."""
    return isinstance(module, comfy.ops.CastWeightBiasOp) and type(module).forward.__module__ == "comfy.ops"


def _dynamic(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether ComfyUI's dynamic VRAM holds this layer's weights (in its virtual VRAM; the module keeps the file's)."""
    return hasattr(module, "_v") and module.weight.device != device


def _fp8_problem(weight: QuantizedTensor) -> str | None:
    if weight._layout_cls not in FP8_LAYOUTS or weight.storage_dtype != torch.float8_e4m3fn:
        return f"its weights are quantized as {weight._layout_cls} ({weight.storage_dtype}), not per-tensor fp8 e4m3"
    if weight.params.scale.numel() != 1:
        return "its fp8 weights have more than one scale"
    return None


def layer_problem(module: torch.nn.Module, kind: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a layer (``kind`` "linear" or "norm") cannot hand its weights over as they are, or None when it can."""
    if not _comfy_layer(module):
        return f"{type(module).__name__} is not one of ComfyUI's layers"
    if module.weight_function or module.bias_function:
        return "ComfyUI patches its weights on each call (a LoRA on a partly loaded model, or a weight wrapper)"
    if getattr(module, "comfy_force_cast_weights", False):
        return "ComfyUI is told to cast its weights"
    if getattr(module, "pre_quant_scale", None) is not None:
        return "its input is smoothed (pre_quant_scale)"
    weight = module.weight
    if weight is None:
        return "it holds no weight"
    quantized = isinstance(weight, QuantizedTensor)
    if quantized and (kind != "linear" or _fp8_problem(weight)):
        return _fp8_problem(weight) or "a quantized norm weight"
    if _dynamic(module, device):
        return None  # ComfyUI's dynamic VRAM hands the weights over in the dtype asked for
    if weight.device != device or (module.bias is not None and module.bias.device != device):
        return f"its weights are on {weight.device}, the block runs on {device} (ComfyUI streams them)"
    if kind == "linear" and not quantized and weight.dtype not in (dtype, torch.float8_e4m3fn):
        return f"its weights are {weight.dtype}, the block computes in {dtype}"
    return None


def _weight_layers(block: DualStreamBlock) -> tuple[dict[str, torch.nn.Module], str | None]:
    """The block's modules that hold weights, by name, and the first module with forward hooks (None if none)."""
    layers, hooked = {}, None
    for name, module in block.named_modules():
        if hooked is None and (module._forward_hooks or module._forward_pre_hooks):
            hooked = name or "the block"
        if any(p is not None for p in module._parameters.values()):
            layers[name] = module
    return layers, hooked


def block_fast_problem(
    block: DualStreamBlock, config: MMDiTConfig, device: torch.device, dtype: torch.dtype
) -> str | None:
    """Why ``block`` cannot run the fast path on ``device`` computing in ``dtype`` (the first problem, naming the
    layer), or None when it can. Reads the layers' state only: cheap enough for every block of every forward."""
    expected = block_layers(config)
    found, hooked = _weight_layers(block)
    if hooked is not None:
        return f"{hooked} has forward hooks"
    if found.keys() != expected.keys():
        strays = sorted(found.keys() ^ expected.keys())
        return f"its layers are not the pack's ({', '.join(strays[:3])} differ)"
    for name, kind in expected.items():
        problem = layer_problem(found[name], kind, device, dtype)
        if problem is not None:
            return f"{name}: {problem}"
    return None


@functools.cache
def _weight_names(config: MMDiTConfig) -> tuple[tuple[str, bool, str, str, str], ...]:
    """Per weight layer of a block: its name, whether it is a linear, and the names of its weight, bias and fp8 scale
    in the functional block's weights."""
    return tuple(
        (name, kind == "linear", f"{name}.weight", f"{name}.bias", f"{name}.weight_scale")
        for name, kind in block_layers(config).items()
    )


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)


def _handed_over(module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """(weight, bias) of a layer as ComfyUI holds them for this forward: the module's own tensors, or, under
    dynamic VRAM, what ComfyUI's cast hands over for the prefetched block (quantized and fp8 weights kept so, with a
    LoRA requantized as ComfyUI's fp8 layers do)."""
    if not _dynamic(module, device):
        return module.weight, module.bias
    weight = module.weight
    keep_fp8 = isinstance(weight, QuantizedTensor) or weight.dtype == torch.float8_e4m3fn
    wanted = weight.dtype if keep_fp8 else dtype  # a QuantizedTensor's dtype is the one it dequantizes to
    weight, bias, _ = comfy.ops.cast_bias_weight(
        module,
        None,
        dtype=wanted,
        device=device,
        bias_dtype=dtype,
        offloadable=True,
        compute_dtype=dtype,
        want_requant=keep_fp8,
    )
    return weight, bias


def _in(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _block_weights(block: DualStreamBlock, config: MMDiTConfig, device: torch.device, dtype: torch.dtype):
    """The block's weights by state-dict name, as the functional block takes them, and its fp8 layers with their
    FP8Linear compute mode."""
    weights: dict[str, torch.Tensor] = {}
    fp8_layers = []
    layers, _ = _weight_layers(block)
    for name, linear, weight_name, bias_name, scale_name in _weight_names(config):
        module = layers[name]
        weight, bias = _handed_over(module, device, dtype)
        if linear and isinstance(weight, QuantizedTensor):
            weights[weight_name] = weight._qdata
            weights[scale_name] = weight.params.scale.reshape(())
            # a layer the file (or a GPU without fp8 matmul) keeps at full precision is dequantized, as ComfyUI does
            fp8_layers.append((name, "dequantize" if getattr(module, "_full_precision_mm", False) else "auto"))
        elif linear and weight.dtype == torch.float8_e4m3fn:
            weights[weight_name] = weight
            weights[scale_name] = _unit_scale(device)
            fp8_layers.append((name, "auto"))
        else:
            weights[weight_name] = _in(weight, dtype)
        if bias is not None:
            weights[bias_name] = _in(bias, dtype)
    return weights, frozenset(fp8_layers)


def run_fast_block(
    block: DualStreamBlock,
    config: MMDiTConfig,
    img: torch.Tensor,
    txt: torch.Tensor,
    temb: torch.Tensor,
    pe: torch.Tensor,
    mask: torch.Tensor | None,
    compiled: bool,
    prefetched: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block(img, txt, temb, pe, mask)`` through the pack's block on the weights ComfyUI holds, for a block that
    :func:`block_fast_problem` passed. Under dynamic VRAM the block's weights are prefetched together first (as
    ComfyUI's own models prefetch their blocks) and released once the block's work is queued, unless the caller
    runs ComfyUI's block prefetch over all blocks (``prefetched``: :class:`.comfy_streaming.BlockPrefetch`)."""
    device = img.device
    dynamic = not prefetched and any(hasattr(m, "_v") for m in block.modules())
    queue = [None, block, None] if dynamic else None
    comfy.model_prefetch.prefetch_queue_pop(queue, device, block)
    try:
        weights, fp8_layers = _block_weights(block, config, device, temb.dtype)
        return call_block(block_template(config, fp8_layers), weights, img, txt, temb, pe, mask, compiled)
    finally:
        if queue is not None:
            comfy.model_prefetch.prefetch_queue_pop(queue, device, None)
