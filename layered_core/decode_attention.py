"""One decoding token's attention over a fixed-capacity key/value cache whose used length lives on the device: the
attention of the caption decoder's whole step (:mod:`.caption_step`).

The step's graph is captured once and replayed for every token, so the attention covers every slot of the cache
and the slots after the current position must count for nothing. PyTorch's fused attention takes that as a mask
only in its memory-efficient kernel, which for one query row per key/value head runs a handful of thread blocks
over the whole cache: 56 us a layer, a quarter of a 7B step on an H200 (benchmarks/RESULTS.md). Here the cache is
split into chunks that thread blocks take in parallel (flash-decoding): each chunk's scores, running maximum and
weighted sum of values in float32, then one pass that merges the chunks. The query heads that share a key/value
head are one block's rows, so the cache is read once. The slots past the position are skipped by reading the
position itself in the kernel, so no host sync and no mask.

:func:`decode_attention` runs the Triton kernels where they can (:func:`kernel_problem`) and the masked fused
attention everywhere else; :func:`masked_attention` is that reference, which the tests compare against.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .kernels import TRITON_INSTALLED, triton_next_power_of_2

# Cache slots per thread block, and per inner iteration of one (both powers of two; SPLIT a multiple of BLOCK).
SPLIT = 128
BLOCK = 64
# tl.dot needs at least 16 rows: the query heads of one key/value head are padded to this.
MIN_ROWS = 16
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def attention_bias(slots: torch.Tensor, position: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(capacity,) additive mask of a step's attention: 0 on the slots up to ``position`` (the prompt, the tokens
    generated and the one fed in), -inf on the later ones, which hold zeros or an earlier caption's keys."""
    return torch.zeros(slots.shape, dtype=dtype, device=slots.device).masked_fill_(slots > position, -math.inf)


def masked_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One query token (1, heads, 1, head_dim) over the cache slots 0..``position`` of (1, kv_heads, capacity,
    head_dim), by PyTorch's fused attention with the later slots masked; all in one dtype.

    Grouped-query attention without repeating the cache: the ``heads // kv_heads`` query heads of one key/value head
    (consecutive, as transformers' repeat_kv orders them) become that head's query rows, so that it is one call of
    the fused attention kernel that takes a mask (on CUDA the memory-efficient one, which keeps its scores and
    softmax in float32 over a bf16 cache, as generate's kernel does)."""
    heads, head_dim = query.shape[1], query.shape[3]
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    slots = torch.arange(capacity, device=keys.device)
    bias = attention_bias(slots, position, keys.dtype)
    grouped = query.reshape(1, kv_heads, heads // kv_heads, head_dim)
    attended = F.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=bias.view(1, 1, 1, capacity), scale=scaling
    )
    return attended.reshape(1, heads, 1, head_dim)


def kernel_problem(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these tensors, or None when they can. Everything checked is static
    (devices, dtypes, shapes, layouts), so torch.compile traces the choice."""
    if not TRITON_INSTALLED:
        return "Triton is not installed"
    if not (query.is_cuda and keys.device == query.device and values.device == query.device):
        return "the tensors are not all on one CUDA device"
    if position.device != query.device or position.dtype != torch.long or position.numel() != 1:
        return "the position is not one int64 on the query's device"
    if query.dtype not in KERNEL_DTYPES or keys.dtype != query.dtype or values.dtype != query.dtype:
        return f"dtypes {query.dtype}, {keys.dtype}, {values.dtype}: one of {KERNEL_DTYPES} for all three"
    if query.dim() != 4 or query.shape[0] != 1 or query.shape[2] != 1:
        return f"query of shape {tuple(query.shape)}, not (1, heads, 1, head_dim)"
    if keys.dim() != 4 or keys.shape[0] != 1 or keys.shape != values.shape:
        return f"keys {tuple(keys.shape)} and values {tuple(values.shape)}, not both (1, kv_heads, capacity, head_dim)"
    heads, head_dim = query.shape[1], query.shape[3]
    kv_heads = keys.shape[1]
    if keys.shape[3] != head_dim or head_dim < 16 or head_dim & (head_dim - 1):
        return f"head size {head_dim} (keys {keys.shape[3]}): a power of two of at least 16 for both"
    if heads % kv_heads:
        return f"{heads} query heads do not share {kv_heads} key/value heads evenly"
    if not (query.is_contiguous() and keys.is_contiguous() and values.is_contiguous()):
        return "a tensor is not contiguous"
    return None


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One query token (1, heads, 1, head_dim) over the cache slots 0..``position`` (a (1,) int64 on the device) of
    (1, kv_heads, capacity, head_dim) keys and values; the query heads grouped on the key/value heads as
    transformers' repeat_kv orders them. The Triton kernels where :func:`kernel_problem` finds nothing against them
    (the query made contiguous first), else :func:`masked_attention`."""
    query = query.contiguous()
    if kernel_problem(query, keys, values, position) is None:
        return torch.ops.qwen_layered.decode_attention(query, keys, values, position, float(scaling))
    return masked_attention(query, keys, values, position, scaling)


@torch.library.custom_op("qwen_layered::decode_attention", mutates_args=())
def _decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, scaling: float
) -> torch.Tensor:
    heads, head_dim = query.shape[1], query.shape[3]
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    rows = max(MIN_ROWS, triton_next_power_of_2(group))
    splits = -(-capacity // SPLIT)
    maxima = torch.empty(kv_heads, splits, rows, device=query.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    partial = torch.empty(kv_heads, splits, rows, head_dim, device=query.device, dtype=torch.float32)
    out = torch.empty_like(query)
    partial_kernel, merge_kernel = _kernels()
    # float32 products in IEEE float32 (tl.dot would take TF32 otherwise); bf16 and fp16 ones accumulate in float32
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    # on the CPU only under Triton's interpreter (the tests)
    device = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with device:
        partial_kernel[(kv_heads, splits)](
            query,
            keys,
            values,
            position,
            maxima,
            sums,
            partial,
            scaling,
            CAPACITY=capacity,
            GROUP=group,
            ROWS=rows,
            HEAD_DIM=head_dim,
            SPLIT=SPLIT,
            BLOCK=BLOCK,
            PRECISION=precision,
        )
        merge_kernel[(kv_heads,)](maxima, sums, partial, out, SPLITS=splits, GROUP=group, ROWS=rows, HEAD_DIM=head_dim)
    return out


@_decode_attention.register_fake
def _(query, keys, values, position, scaling):
    return torch.empty_like(query)


_KERNELS = None


def _kernels():
    """The two Triton kernels, defined on first use so that importing this module needs no Triton."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def decode_partial_kernel(
        query_ptr,
        keys_ptr,
        values_ptr,
        position_ptr,
        maxima_ptr,
        sums_ptr,
        partial_ptr,
        scaling,
        CAPACITY: tl.constexpr,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # one program per (key/value head, chunk of SPLIT slots): the GROUP query heads of that key/value head
        head = tl.program_id(0)
        chunk = tl.program_id(1)
        splits = tl.num_programs(1)
        length = tl.load(position_ptr) + 1  # slots 0..position are attended
        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, HEAD_DIM)
        query = tl.load(
            query_ptr + (head * GROUP + rows)[:, None] * HEAD_DIM + dims[None, :],
            mask=(rows < GROUP)[:, None],
            other=0.0,
        )
        # a finite start, so that a chunk with no attended slot keeps maximum, sum and values at (-1e30, 0, 0)
        maximum = tl.full([ROWS], -1e30, tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        cache = head.to(tl.int64) * CAPACITY * HEAD_DIM
        for offset in range(0, SPLIT, BLOCK):
            slots = chunk * SPLIT + offset + tl.arange(0, BLOCK)
            attended = (slots < length) & (slots < CAPACITY)
            offsets = cache + slots[:, None] * HEAD_DIM + dims[None, :]
            keys = tl.load(keys_ptr + offsets, mask=attended[:, None], other=0.0)
            scores = (tl.dot(query, tl.trans(keys), input_precision=PRECISION) * scaling).to(tl.float32)
            scores = tl.where(attended[None, :], scores, float("-inf"))
            new_maximum = tl.maximum(maximum, tl.max(scores, 1))
            correction = tl.exp(maximum - new_maximum)
            weights = tl.exp(scores - new_maximum[:, None])
            total = total * correction + tl.sum(weights, 1)
            values = tl.load(values_ptr + offsets, mask=attended[:, None], other=0.0)
            acc = acc * correction[:, None] + tl.dot(weights.to(values.dtype), values, input_precision=PRECISION)
            maximum = new_maximum
        at = (head * splits + chunk) * ROWS + rows
        tl.store(maxima_ptr + at, maximum)
        tl.store(sums_ptr + at, total)
        tl.store(partial_ptr + at[:, None] * HEAD_DIM + dims[None, :], acc)

    @triton.jit
    def decode_merge_kernel(
        maxima_ptr,
        sums_ptr,
        partial_ptr,
        out_ptr,
        SPLITS: tl.constexpr,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        # one program per key/value head: its chunks merged, rescaled to the largest maximum
        head = tl.program_id(0)
        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, HEAD_DIM)
        maximum = tl.full([ROWS], -1e30, tl.float32)
        for chunk in range(SPLITS):
            maximum = tl.maximum(maximum, tl.load(maxima_ptr + (head * SPLITS + chunk) * ROWS + rows))
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        for chunk in range(SPLITS):
            at = (head * SPLITS + chunk) * ROWS + rows
            weight = tl.exp(tl.load(maxima_ptr + at) - maximum)
            total += tl.load(sums_ptr + at) * weight
            acc += tl.load(partial_ptr + at[:, None] * HEAD_DIM + dims[None, :]) * weight[:, None]
        out = acc / total[:, None]
        tl.store(
            out_ptr + (head * GROUP + rows)[:, None] * HEAD_DIM + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=(rows < GROUP)[:, None],
        )

    _KERNELS = (decode_partial_kernel, decode_merge_kernel)
    return _KERNELS
