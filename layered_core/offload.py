"""Running the VLD-MMDiT in less GPU memory than its weights: the blocks' weights streamed from host memory.

Everything but ``transformer_blocks`` (embeddings and output head: 0.08 GB of the full model's 40.9 GB)
stays on the GPU. Each block's parameters and buffers, whatever their dtypes (bf16, or float8 weights
with float32 scales), are packed into one contiguous pinned host buffer, so bringing a block over is a
single large copy. K blocks also live on the GPU ("resident"), spread through the forward
(:func:`~layered_core.memory.resident_positions`); the others are copied into a small ring of preallocated GPU
slots before they run, the next ones while the current one computes:

    copy stream:     wait "slot s free" -> copy block j into slot s -> record "slot s copied"
    compute stream:  wait "slot s copied" -> run block j on views into slot s -> record "slot s free"

Each copy takes the ring's next slot, so copies are issued in running order, as many ahead as there are slots,
wrapping round to the first streamed blocks of the next forward while the last ones of this forward compute (and
at :meth:`BlockStreamer.load`, for the first forward). Forward pre/post hooks on the blocks do this, so the
model's code is not touched, block patches that call the original block (ComfyUI's ``patches_replace``) stream
too, and a block's compiled ``forward`` (:meth:`~layered_core.mmdit.VLDMMDiT.compile_blocks`) runs on whatever
memory its parameters were pointed at. On the CPU the same code runs with plain synchronous copies, which is what
the tests exercise.

K comes from a VRAM budget (:func:`plan_residency`): the budget, less the other weights, the slots, an
activation estimate for the token count and batch, and a reserve for CUDA workspaces, decides how
many whole blocks fit. The host keeps one packed copy of every block (the resident ones too), so
:meth:`BlockStreamer.offload` can hand all block memory back, for the text encoder or the VAE, and
:meth:`BlockStreamer.load` bring it back with another K. Host memory stays what the loaded model took:
the original tensors are dropped once a block is packed.

:class:`~layered_core.placement.VRAMBudget` is what the pipeline uses: one large model on the GPU at a time.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .memory import GiB, ResidencyPlan, activation_bytes, plan_residency, resident_positions, tensor_bytes

logger = logging.getLogger(__name__)

# Bytes between tensors in a packed block: what CUDA kernels' vector loads want, and more than the 16 that
# inductor's compiled code assumes of its inputs (a misaligned input would be copied on every call).
ALIGNMENT = 256
PAGE = 4096  # host buffers start and end on pages, so two buffers never share a pinned page


# --------------------------------------------------------------------------- packed blocks


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`ALIGNMENT`: where the next tensor of a packed block starts."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class _Entry:
    name: str  # within the block, e.g. "attn.to_q.weight"
    is_buffer: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes into the packed block

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Layout:
    """The (name, dtype, shape, byte offset) of every tensor of a block, in one packed buffer."""

    def __init__(self, block: nn.Module):
        entries, offset = [], 0
        for is_buffer, items in ((False, block.named_parameters()), (True, block.named_buffers())):
            for name, tensor in items:
                if tensor.device.type == "meta":
                    raise ValueError(f"block tensor '{name}' is on the meta device: load the weights before streaming")
                entry = _Entry(name, is_buffer, tensor.dtype, tuple(tensor.shape), offset)
                entries.append(entry)
                offset += aligned(entry.nbytes)
        self.entries: tuple[_Entry, ...] = tuple(entries)
        self.nbytes = offset
        self.key = tuple((e.name, e.is_buffer, e.dtype, e.shape) for e in entries)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of every tensor into a packed byte buffer."""
        with torch.inference_mode(False):  # the views become parameters: never inference tensors
            return [buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]


def _targets(block: nn.Module, layout: _Layout) -> list[tuple[nn.Module, str, bool]]:
    """(owning module, attribute, is_buffer) of each layout entry in ``block``."""
    targets = []
    for entry in layout.entries:
        path, _, attr = entry.name.rpartition(".")
        targets.append((block.get_submodule(path) if path else block, attr, entry.is_buffer))
    return targets


def _point(targets: list[tuple[nn.Module, str, bool]], views: list[torch.Tensor]) -> None:
    """Make a block's parameters and buffers the given tensors (same Parameter objects, new data)."""
    for (module, attr, is_buffer), view in zip(targets, views, strict=True):
        if is_buffer:
            module._buffers[attr] = view
        else:
            module._parameters[attr].data = view


def _page_aligned_empty(nbytes: int) -> torch.Tensor:
    """A CPU byte tensor that starts on a page and spans whole pages."""
    size = -(-nbytes // PAGE) * PAGE
    raw = torch.empty(size + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start : start + size]


def _unregister(pointer: int, buffer: torch.Tensor) -> None:
    # ``buffer`` is an argument only to keep the memory alive until it is unregistered.
    with contextlib.suppress(Exception):  # at interpreter exit the CUDA runtime may be gone
        torch.cuda.cudart().cudaHostUnregister(pointer)


def _clear_cuda_error() -> None:
    """A failed runtime call leaves its error pending, to be raised by the next kernel launch check: take it."""
    with contextlib.suppress(RuntimeError):
        torch.empty(1, device="cuda").zero_()
        torch.cuda.synchronize()


def _pin(buffer: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Page-lock a host buffer: in place with cudaHostRegister (exactly its size, where ``pin_memory()``
    rounds 0.68 GB up to 1 GiB), else as a ``pin_memory()`` copy. Returns (buffer, registered)."""
    nbytes = buffer.numel()
    error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 1))  # 1: portable
    if error == 0:
        return buffer, True
    _clear_cuda_error()
    logger.warning("cudaHostRegister of %d bytes failed (cudaError %d); using pin_memory() instead", nbytes, error)
    try:
        return buffer.pin_memory(), False
    except RuntimeError as e:
        raise RuntimeError(
            f"could not pin {nbytes / GiB:.2f} GiB of host memory for a transformer block ({e}); free host memory "
            "or use the fp8 transformer file, which halves it"
        ) from None


# --------------------------------------------------------------------------- copies


class SyncTransfers:
    """Copies on the CPU (or anywhere, synchronously): nothing to wait for."""

    def copy(self, slot: int, destination: torch.Tensor, source: torch.Tensor, block: int) -> None:
        destination.copy_(source)

    def wait_copied(self, slot: int, block: int) -> None:
        pass

    def mark_free(self, slot: int, block: int) -> None:
        pass

    def slots_allocated(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class CudaTransfers(SyncTransfers):
    """Host-to-device copies on their own stream, ordered against the compute stream by events."""

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in range(slots)]
        self.freed = [torch.cuda.Event() for _ in range(slots)]

    def copy(self, slot, destination, source, block):
        with torch.cuda.stream(self.stream):
            # Waiting on an event that was never recorded returns at once (the slot's first use).
            self.stream.wait_event(self.freed[slot])
            destination.copy_(source, non_blocking=True)
            self.copied[slot].record(self.stream)

    def wait_copied(self, slot, block):
        torch.cuda.current_stream(self.device).wait_event(self.copied[slot])

    def mark_free(self, slot, block):
        self.freed[slot].record(torch.cuda.current_stream(self.device))

    def slots_allocated(self):
        # Slot memory comes from the compute stream's pool and may have held tensors that kernels queued
        # there still read: the first copy into it must come after them.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def synchronize(self):
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()


def transfers_for(device: torch.device, slots: int) -> SyncTransfers:
    """The copies into ``slots`` GPU slots on ``device``: on a side stream on CUDA, synchronous elsewhere."""
    return CudaTransfers(device, slots) if device.type == "cuda" else SyncTransfers()


# --------------------------------------------------------------------------- the streamer


class BlockStreamer:
    """Streams ``model.transformer_blocks`` to ``device``; see the module docstring.

    Build it with :func:`stream_blocks`. Between forwards a streamed block's tensors are views into its
    pinned host buffer and a resident block's views into its GPU buffer; while a streamed block runs they
    are views into its slot. ``model.state_dict()`` therefore shares storage within a block, and
    ``model.to()`` must not be called while streaming: call :meth:`remove` first.
    """

    def __init__(self, model: nn.Module, device, slots: int = 2, transfers: SyncTransfers | None = None):
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.model = model
        self.device = device
        self.slots = slots
        self.blocks: nn.ModuleList = model.transformer_blocks
        self._transfers_given = transfers
        self._transfers: SyncTransfers | None = None
        self.resident_blocks = 0
        self._resident_flags: list[bool] = []
        self._streamed: tuple[int, ...] = ()
        self.loaded = False
        self.removed = False

        pin = device.type == "cuda"
        layouts: dict[tuple, _Layout] = {}
        self._layouts: list[_Layout] = []
        self._targets: list[list[tuple[nn.Module, str, bool]]] = []
        self._host: list[torch.Tensor] = []
        self._host_views: list[list[torch.Tensor]] = []
        self._pins: list[weakref.finalize | None] = []
        with torch.no_grad():
            for block in self.blocks:
                layout = _Layout(block)
                layout = layouts.setdefault(layout.key, layout)
                targets = _targets(block, layout)
                host = _page_aligned_empty(layout.nbytes)
                views = layout.views(host)
                for (module, attr, is_buffer), view in zip(targets, views, strict=True):
                    view.copy_(module._buffers[attr] if is_buffer else module._parameters[attr])
                pinned = None
                if pin:
                    host, registered = _pin(host)
                    views = layout.views(host)
                    if registered:
                        # Unregistered when the streamer goes (or on remove()), before the memory can be freed.
                        pinned = weakref.finalize(self, _unregister, host.data_ptr(), host)
                _point(targets, views)  # the original tensors go: one host copy of the block
                self._layouts.append(layout)
                self._targets.append(targets)
                self._host.append(host)
                self._host_views.append(views)
                self._pins.append(pinned)
        self.layout_count = len(layouts)
        self.block_bytes = [layout.nbytes for layout in self._layouts]
        self.host_bytes = sum(h.numel() for h in self._host)
        self.pinned_bytes = self.host_bytes if pin else 0

        # Everything else (embeddings, output head) lives on the device.
        for child in model.children():
            if child is not self.blocks:
                child.to(device)
        for name, tensor in [*model._parameters.items(), *model._buffers.items()]:
            if tensor is not None:
                (model._parameters if name in model._parameters else model._buffers)[name] = tensor.to(device)
        self.other_bytes = tensor_bytes(model) - sum(tensor_bytes(b) for b in self.blocks)

        self._resident: list[torch.Tensor] = []
        self._slots: list[torch.Tensor] = []
        self._slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._slot_content: list[int | None] = []  # the block each slot holds (or is being copied)
        self._slot_of_block: dict[int, int] = {}
        self._next_slot = 0
        self._set_resident(0)
        self._hooks = []
        for index, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(functools.partial(self._before_block, index)))
            self._hooks.append(
                block.register_forward_hook(functools.partial(self._after_block, index), always_call=True)
            )

    # -- sizes ---------------------------------------------------------------------------------------------

    @property
    def streamed_blocks(self) -> int:
        return len(self.blocks) - self.resident_blocks

    @property
    def resident_indices(self) -> tuple[int, ...]:
        return tuple(index for index, resident in enumerate(self._resident_flags) if resident)

    @property
    def streamed_indices(self) -> tuple[int, ...]:
        return self._streamed

    @property
    def used_slots(self) -> int:
        return min(self.slots, self.streamed_blocks)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot: the largest streamed block."""
        return max((self.block_bytes[index] for index in self._streamed), default=0)

    def _set_resident(self, resident_blocks: int) -> None:
        positions = set(resident_positions(len(self.blocks), resident_blocks))
        self.resident_blocks = resident_blocks
        self._resident_flags = [index in positions for index in range(len(self.blocks))]
        self._streamed = tuple(index for index in range(len(self.blocks)) if index not in positions)

    @property
    def device_bytes(self) -> int:
        """Bytes of block memory on the device now: the resident blocks and the slots (0 once offloaded)."""
        return sum(buffer.numel() for buffer in [*self._resident, *self._slots])

    @property
    def host_buffers(self) -> list[torch.Tensor]:
        """The packed host buffer of every block (read-only: the streamer copies from them). Page-locked on
        CUDA, though ``is_pinned()`` says False for memory pinned with cudaHostRegister (torch 2.11)."""
        return list(self._host)

    def plan(self, budget: int, image_tokens: int, text_tokens: int, batch: int) -> ResidencyPlan:
        """How many blocks fit resident under ``budget`` bytes for this workload."""
        activations = activation_bytes(self.model, image_tokens, text_tokens, batch)
        return plan_residency(self.block_bytes, self.other_bytes, budget, activations, self.slots)

    def describe(self) -> str:
        state = "on" if self.loaded else "planned for (not loaded)"
        return (
            f"{self.resident_blocks} of {len(self.blocks)} blocks resident {state} {self.device}, "
            f"{self.streamed_blocks} streamed through {self.used_slots} slots of {self.slot_bytes / GiB:.2f} GiB; "
            f"device: {sum(self.block_bytes[i] for i in self.resident_indices) / GiB:.2f} GiB resident blocks + "
            f"{self.used_slots * self.slot_bytes / GiB:.2f} GiB slots + {self.other_bytes / GiB:.2f} GiB other "
            f"weights; host: {self.host_bytes / GiB:.2f} GiB packed ({self.pinned_bytes / GiB:.2f} GiB pinned), "
            f"{self.layout_count} block layout(s)"
        )

    # -- placing ------------------------------------------------------------------------------------------

    def load(self, resident_blocks: int | None = None) -> None:
        """Put K blocks (at :func:`~layered_core.memory.resident_positions`) and the slots on the device (K = the
        current count when None), and start copying the first streamed blocks into the slots."""
        resident_blocks = self.resident_blocks if resident_blocks is None else resident_blocks
        if not isinstance(resident_blocks, int) or not 0 <= resident_blocks <= len(self.blocks):
            raise ValueError(f"resident_blocks must be 0..{len(self.blocks)}, got {resident_blocks!r}")
        if self.removed:
            raise RuntimeError("this BlockStreamer was removed; stream the model again with stream_blocks()")
        if self.loaded and resident_blocks == self.resident_blocks:
            return
        self.offload()
        self._set_resident(resident_blocks)
        self.loaded = True  # from here on, offload() undoes whatever got placed (say, before an out-of-memory)
        try:
            with torch.no_grad(), torch.inference_mode(False):
                for index in self.resident_indices:
                    layout = self._layouts[index]
                    buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
                    buffer.copy_(self._host[index][: layout.nbytes], non_blocking=True)
                    self._resident.append(buffer)
                    _point(self._targets[index], layout.views(buffer))
                streamed_layouts = {id(self._layouts[index]): self._layouts[index] for index in self._streamed}
                for slot in range(self.used_slots):
                    buffer = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                    self._slots.append(buffer)
                    for key, layout in streamed_layouts.items():
                        self._slot_views[(slot, key)] = layout.views(buffer)
            self._slot_content = [None] * self.used_slots
            self._transfers = self._transfers_given or transfers_for(self.device, max(1, self.used_slots))
            self._transfers.slots_allocated()
            if self._streamed:
                self._prefetch(0)
        except BaseException:
            self.offload()
            raise

    def offload(self) -> None:
        """Free every block's device memory (resident blocks and slots); the next forward loads them again."""
        if not self.loaded:
            return
        if self._transfers is not None:
            self._transfers.synchronize()
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for index in range(len(self.blocks)):
            _point(self._targets[index], self._host_views[index])
        self._resident, self._slots, self._slot_views, self._slot_content = [], [], {}, []
        self._slot_of_block, self._next_slot = {}, 0
        self._transfers = None
        self.loaded = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def remove(self, device="cpu") -> nn.Module:
        """Stop streaming: the whole model as ordinary tensors on ``device`` (the CPU by default, which
        always fits). Returns the model."""
        if self.removed:
            return self.model
        self.offload()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        device = torch.device(device)
        with torch.no_grad():
            for index in range(len(self.blocks)):
                # One block at a time: its own tensors, then its packed buffer goes.
                _point(self._targets[index], [view.to(device, copy=True) for view in self._host_views[index]])
                self._host_views[index] = []
                if self._pins[index] is not None:
                    self._pins[index]()  # unregister now
                self._host[index] = torch.empty(0, dtype=torch.uint8)
        self.model.to(device)
        self.host_bytes = self.pinned_bytes = 0
        self.removed = True
        return self.model

    # -- hooks --------------------------------------------------------------------------------------------

    def _prefetch(self, index: int) -> None:
        """Start copying the next ``used_slots`` streamed blocks from ``index`` on (wrapping round to the next
        forward's first ones) that are not in a slot yet.

        Each goes into the ring's next slot whose block is not among them: a block that has run, whose "free" event
        the copy waits for, or one wanted later than these, which is copied again then. A block in its slot stays
        there while it is wanted.
        """
        streamed = self._streamed
        start = bisect.bisect_left(streamed, index)
        upcoming = [streamed[(start + ahead) % len(streamed)] for ahead in range(self.used_slots)]
        for block in upcoming:
            if block in self._slot_of_block:
                continue
            ring = [(self._next_slot + step) % self.used_slots for step in range(self.used_slots)]
            slot = next(s for s in ring if self._slot_content[s] not in upcoming)
            self._slot_of_block.pop(self._slot_content[slot], None)
            nbytes = self.block_bytes[block]
            self._transfers.copy(slot, self._slots[slot][:nbytes], self._host[block][:nbytes], block)
            self._slot_content[slot], self._slot_of_block[block] = block, slot
            self._next_slot = (slot + 1) % self.used_slots

    def _before_block(self, index: int, module, args) -> None:
        if not self.loaded:
            self.load()
        if not self._streamed:
            return
        self._prefetch(index)
        if not self._resident_flags[index]:
            slot = self._slot_of_block[index]
            self._transfers.wait_copied(slot, index)
            _point(self._targets[index], self._slot_views[(slot, id(self._layouts[index]))])

    def _after_block(self, index: int, module, args, output) -> None:
        slot = self._slot_of_block.get(index) if self.loaded else None
        if slot is not None:
            self._transfers.mark_free(slot, index)
            _point(self._targets[index], self._host_views[index])


def stream_blocks(
    model: nn.Module,
    device,
    vram_budget: int | None = None,
    resident_blocks: int | None = None,
    slots: int = 2,
    *,
    image_tokens: int = 9600,
    text_tokens: int = 512,
    batch: int = 2,
    load: bool = True,
) -> BlockStreamer:
    """Stream the blocks of a VLD-MMDiT to ``device``, with K resident blocks given or planned.

    ``vram_budget`` (bytes) plans K for a workload of ``image_tokens`` (default: 640 px, 4 layers),
    ``text_tokens`` and ``batch``; ``resident_blocks`` sets K directly. ``slots`` (1 or more) is the ring
    of streaming slots: with one, a block's copy cannot overlap the previous block's compute. With
    ``load=False`` nothing goes on the device's block memory until the first forward or :meth:`load`.
    """
    if (vram_budget is None) == (resident_blocks is None):
        raise ValueError("pass exactly one of vram_budget (bytes) and resident_blocks")
    streamer = BlockStreamer(model, device, slots)
    if vram_budget is not None:
        resident_blocks = streamer.plan(vram_budget, image_tokens, text_tokens, batch).resident_blocks
    if load:
        streamer.load(resident_blocks)
    elif isinstance(resident_blocks, int) and 0 <= resident_blocks <= len(streamer.blocks):
        streamer._set_resident(resident_blocks)
    else:
        raise ValueError(f"resident_blocks must be 0..{len(streamer.blocks)}, got {resident_blocks!r}")
    logger.info("streaming transformer blocks: %s", streamer.describe())
    return streamer
