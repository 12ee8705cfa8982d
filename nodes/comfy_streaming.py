"""The transformer in less VRAM than its weights under ComfyUI's own model management: ComfyUI decides what is
where, and the weights it leaves in host memory reach the GPU a whole block at a time, one block ahead.

What ComfyUI v0.30 does by itself (read in comfy/model_patcher.py, comfy/ops.py, comfy/model_management.py,
comfy/model_prefetch.py and comfy_aimdo):

- The classic ``ModelPatcher`` (``--disable-dynamic-vram``, ``--novram``, non-NVIDIA GPUs) loads modules,
  largest first, until ``load_models_gpu``'s ``lowvram_model_memory`` is spent; every other module keeps its
  weights in host memory (page-locked in place by ComfyUI) and gets ``comfy_cast_weights``: its forward copies
  its own weight on one of ComfyUI's offload streams into a cast buffer, and the compute stream waits for it
  there. A layer's copy can hide only behind the layer before: behind attention (no weights) or a text-stream
  layer (a few hundred rows) it hides little, and a block's large modulation weights sit behind such layers.
- ``ModelPatcherDynamic`` (the default on NVIDIA, ``--lowvram`` changes nothing there) decides nothing at load
  time: comfy-aimdo gives each module a range in a virtual VRAM arena, and each forward either finds it
  resident, maps it and fills it, or (no memory) copies it from aimdo's own pinned host buffer through a cast
  buffer. ComfyUI has a block-level prefetch for this mode, ``comfy.model_prefetch``, that core's LTX-AV and
  MiniMax models call around their block loops: each block's non-resident weights are cast as one batch on an
  offload stream, so a block's copies overlap the block before it.

The choice here, by patcher:

- Dynamic: ComfyUI's own block prefetch around our blocks (:class:`BlockPrefetch`), nothing more. aimdo keeps
  deciding residency per forward, pins and evicts under host-RAM pressure, and applies LoRA patches to the
  weights it casts; a streamer of our own would need either a second pinned copy of the weights (aimdo pins
  its own, beside the memory-mapped file) or aimdo's private pin records. This costs no host memory beyond
  ComfyUI's own.
- Classic: our block streamer over ComfyUI's placement (:class:`PlacedStreamer`). ComfyUI places modules, not
  blocks (the largest first, across all blocks), so most blocks end up part loaded. The modules it loaded
  stay where it put them; for every block, the parameters of the modules it left offloaded are copied, from
  ComfyUI's own host tensors (no copy of ours in host memory), into one of two GPU slots on a side stream, the
  next block's while this one computes. While the block runs those parameters are views into the slot, so
  ComfyUI's casting finds them on the device and copies nothing, and its weight functions (``LowVramPatch``
  for a LoRA on an offloaded module, weight wrappers) still apply to them. A module whose parameters are not
  plain tensors (a quantized layout) is left to ComfyUI's casting, with a warning naming it.

Both are a ComfyUI ``PatcherInjection`` (:func:`attach`): ComfyUI ejects it before every load, partial unload
and detach, and injects it again after, so each setup sees ComfyUI's final placement and each unload or
offload (``unload_all_models``, another model needing the memory) tears it down and frees its slots.

GPU memory: the classic streamer's two slots hold up to two whole blocks (1.36 GB for the bf16 transformer);
:func:`slot_reserve_bytes` is what the model's ``memory_required`` adds so ComfyUI leaves room for them.

``QWEN_LAYERED_COMFY_STREAMING=off`` in the environment leaves ComfyUI's per-layer casting alone (to compare,
or if this misbehaves).
"""

from __future__ import annotations

import bisect
import logging
import os
import weakref

import comfy.patcher_extension
import torch
from torch import nn

from ..layered_core.memory import GiB
from ..layered_core.offload import aligned, transfers_for

try:  # ComfyUI's block prefetch for dynamic VRAM (v0.30 and later)
    import comfy.model_prefetch as model_prefetch
except ImportError:
    model_prefetch = None

logger = logging.getLogger(__name__)

INJECTION_KEY = "qwen_layered_streaming"
SWITCH = "QWEN_LAYERED_COMFY_STREAMING"
SWITCH_VALUES = ("auto", "off")
SLOTS = 2

# diffusion model -> what streams it now (a PlacedStreamer or a BlockPrefetch)
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# diffusion model -> the last streaming line logged at INFO (ComfyUI loads again before every sampling)
_LOGGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def streaming_switch() -> str:
    """The environment's choice: ``auto`` (default) or ``off``."""
    value = os.environ.get(SWITCH, "auto").strip().lower() or "auto"
    if value not in SWITCH_VALUES:
        raise ValueError(f"{SWITCH} must be one of {SWITCH_VALUES}, got {value!r}")
    return value


def attach(patcher) -> None:
    """Make ``patcher``'s loads set up block streaming over ComfyUI's placement, and its unloads tear it down."""
    if streaming_switch() == "off":
        logger.info("%s=off: ComfyUI's own per-layer weight casting runs the transformer", SWITCH)
        return
    injection = comfy.patcher_extension.PatcherInjection(inject=_inject, eject=_eject)
    patcher.set_injections(INJECTION_KEY, [injection])


def active(model: nn.Module):
    """What streams ``model`` (a diffusion model) now: a :class:`PlacedStreamer`, a :class:`BlockPrefetch`, or
    None."""
    return _ACTIVE.get(model)


def describe(model: nn.Module) -> str:
    """One line on how ``model``'s blocks get their weights now."""
    streaming = active(model)
    return "ComfyUI's placement, nothing streamed by the pack" if streaming is None else streaming.describe()


def slot_reserve_bytes(model: nn.Module) -> int:
    """GPU bytes the classic streamer's slots may take for ``model``: :data:`SLOTS` of its largest block."""
    if streaming_switch() == "off" or not hasattr(model, "transformer_blocks"):
        return 0
    largest = max((_packed_bytes(block.parameters()) for block in model.transformer_blocks), default=0)
    return SLOTS * largest


def _inject(patcher) -> None:
    model = patcher.model.diffusion_model
    _stop(model)
    if patcher.is_dynamic():
        if model_prefetch is None:
            logger.warning("this ComfyUI has no comfy.model_prefetch: its per-layer casting streams the blocks")
            return
        _ACTIVE[model] = BlockPrefetch(model.transformer_blocks)
    else:
        parts = offloaded_parts(patcher)
        if not any(parts):
            return  # everything where it runs: nothing to stream
        _ACTIVE[model] = PlacedStreamer(model.transformer_blocks, parts, patcher.load_device)
        _warn_unpinned(patcher, parts)
    line = _ACTIVE[model].describe()
    logger.log(logging.DEBUG if _LOGGED.get(model) == line else logging.INFO, "transformer blocks: %s", line)
    _LOGGED[model] = line


def _eject(patcher) -> None:
    _stop(patcher.model.diffusion_model)


def _stop(model: nn.Module) -> None:
    streaming = _ACTIVE.pop(model, None)
    if streaming is not None:
        streaming.close()


# --------------------------------------------------------------------------- the classic patcher's placement


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 10 else f"{nbytes / 2**20:.2f} MiB"


def _packed_bytes(tensors) -> int:
    """Bytes of these tensors one after another in a slot, each starting on :data:`ALIGNMENT`."""
    return sum(aligned(t.numel() * t.element_size()) for t in tensors)


def left_offloaded(module: nn.Module) -> bool:
    """Whether ComfyUI's (classic) load left this module's weights offloaded, cast in its forward: ComfyUI's own
    marks (``prev_comfy_cast_weights`` set when it turned casting on for a low-VRAM module,
    ``comfy_patched_weights`` on the modules it loaded)."""
    return hasattr(module, "prev_comfy_cast_weights") and not getattr(module, "comfy_patched_weights", False)


def _streamable(parameters: list[tuple[str, nn.Parameter]]) -> str | None:
    """Why these parameters cannot be copied into a slot as they are, or None."""
    for _, parameter in parameters:
        if type(parameter) is not nn.Parameter or type(parameter.data) is not torch.Tensor:
            return f"weights that are a {type(parameter.data).__name__}, which ComfyUI casts itself"
    return None


def offloaded_parts(patcher) -> list[list[tuple[nn.Module, str]]]:
    """Per block of ``patcher``'s transformer, the (module, parameter name) of every parameter ComfyUI left
    offloaded and the streamer brings over. Modules it cannot copy are left to ComfyUI, with a warning."""
    load_device = torch.device(patcher.load_device)
    names = {id(module): name for name, module in patcher.model.named_modules()}
    parts, left = [], {}  # why -> the modules left to ComfyUI for it
    for block in patcher.model.diffusion_model.transformer_blocks:
        part = []
        for module in block.modules():
            if not left_offloaded(module):
                continue
            parameters = [(name, p) for name, p in module.named_parameters(recurse=False) if p is not None]
            problem = _streamable(parameters)
            if problem is not None:
                left.setdefault(problem, []).append(names[id(module)])
                continue
            for name, parameter in parameters:
                if load_device.type != "cpu" and parameter.device == load_device:
                    raise RuntimeError(
                        f"{names[id(module)]}.{name}: ComfyUI marked the module offloaded but its weight is on "
                        f"{load_device}; set {SWITCH}=off and report this"
                    )
                part.append((module, name))
        parts.append(part)
    for problem, modules in left.items():
        logger.warning(
            "%d offloaded modules left to ComfyUI's per-layer casting, with %s: %s%s",
            len(modules),
            problem,
            ", ".join(modules[:3]),
            ", ..." if len(modules) > 3 else "",
        )
    return parts


def _warn_unpinned(patcher, parts) -> None:
    """A warning when ComfyUI did not page-lock some of what streams: those copies wait for the host."""
    if torch.device(patcher.load_device).type == "cpu":
        return
    names = {id(module): name for name, module in patcher.model.named_modules()}
    unpinned = sum(
        getattr(module, name).numel() * getattr(module, name).element_size()
        for part in parts
        for module, name in part
        if f"{names[id(module)]}.{name}" not in patcher.pinned
    )
    if unpinned:
        logger.warning(
            "%.2f GiB of the streamed weights are not page-locked (ComfyUI's pinned-memory limit, or "
            "--disable-pinned-memory): their copies to the GPU do not overlap the compute",
            unpinned / GiB,
        )


class _Entry:
    """One offloaded parameter: the Parameter ComfyUI holds, its host tensor, its place in a slot."""

    __slots__ = ("parameter", "host", "offset", "nbytes")

    def __init__(self, parameter: nn.Parameter, offset: int):
        self.parameter = parameter
        self.host = parameter.data
        self.offset = offset
        self.nbytes = self.host.numel() * self.host.element_size()

    def view(self, slot: torch.Tensor) -> torch.Tensor:
        return slot[self.offset : self.offset + self.nbytes].view(self.host.dtype).view(self.host.shape)


class PlacedStreamer:
    """Brings the offloaded parameters of each block (``parts``, from :func:`offloaded_parts`) to ``device``
    through :data:`SLOTS` slots, a block ahead; see the module docstring. Between blocks every parameter is
    ComfyUI's own tensor again. The model's ``run_block`` drives it (:meth:`before_block`, :meth:`after_block`), so a
    block whose weights it brought over can take the fast path (:mod:`.fast_path`) too. :meth:`close` frees the
    slots."""

    def __init__(self, blocks: nn.ModuleList, parts: list[list[tuple[nn.Module, str]]], device, slots: int = SLOTS):
        if len(parts) != len(blocks):
            raise ValueError(f"{len(parts)} parts for {len(blocks)} blocks")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.blocks = blocks
        self.entries: list[list[_Entry]] = []
        for part in parts:
            entries, offset = [], 0
            for module, name in part:
                entry = _Entry(module._parameters[name], offset)
                entries.append(entry)
                offset += aligned(entry.nbytes)
            self.entries.append(entries)
        self.part_bytes = [_packed_bytes(e.host for e in entries) for entries in self.entries]
        self.streamed = [index for index, entries in enumerate(self.entries) if entries]
        self.slot_count = min(slots, len(self.streamed))
        self.slot_bytes = max(self.part_bytes, default=0)
        with torch.no_grad(), torch.inference_mode(False):  # the views become parameter data: no inference tensors
            try:
                self._slots = [
                    torch.empty(self.slot_bytes, dtype=torch.uint8, device=device) for _ in range(self.slot_count)
                ]
            except torch.OutOfMemoryError as error:
                raise RuntimeError(
                    f"no room on {device} for the block streamer's {self.slot_count} slots of {_size(self.slot_bytes)} "
                    f"beside what ComfyUI loaded: give ComfyUI more headroom (--reserve-vram) or set {SWITCH}=off"
                ) from error
            self._views = {
                (slot, index): [entry.view(self._slots[slot]) for entry in self.entries[index]]
                for slot in range(self.slot_count)
                for index in self.streamed
            }
        self._content: list[int | None] = [None] * self.slot_count
        self._transfers = transfers_for(device, self.slot_count)
        self._transfers.slots_allocated()
        self.copied_bytes = 0  # what crossed into the slots, all forwards together

    def describe(self) -> str:
        streamed = sum(self.part_bytes)
        return (
            f"ComfyUI's placement with the pack's block streamer: {len(self.streamed)} of {len(self.blocks)} blocks "
            f"have offloaded weights, {_size(streamed)} copied a forward through {self.slot_count} slots of "
            f"{_size(self.slot_bytes)} on {self.device}"
        )

    def slot_tensors(self) -> list[torch.Tensor]:
        """The GPU slots (for tests: what :meth:`close` must free)."""
        return list(self._slots)

    def _slot_of(self, index: int) -> int:
        return bisect.bisect_left(self.streamed, index) % self.slot_count

    def _copy(self, index: int) -> None:
        slot = self._slot_of(index)
        if self._content[slot] == index:
            return
        for entry, view in zip(self.entries[index], self._views[(slot, index)], strict=True):
            self._transfers.copy(slot, view, entry.host, index)
        self._content[slot] = index
        self.copied_bytes += self.part_bytes[index]

    def _prefetch(self, index: int) -> None:
        """Start the copies of the next streamed blocks at or after ``index`` (one per slot). Their slots were
        last used by blocks that are done, or whose 'free' event the copy waits for."""
        first = bisect.bisect_left(self.streamed, index)
        for block in self.streamed[first : first + self.slot_count]:
            self._copy(block)

    def before_block(self, index: int, device: torch.device) -> None:
        """Block ``index`` is next: its offloaded parameters pointed at its slot once copied there, and the next
        streamed blocks' copies started."""
        self._prefetch(index)
        if not self.entries[index]:
            return
        slot = self._slot_of(index)
        self._transfers.wait_copied(slot, index)
        for entry, view in zip(self.entries[index], self._views[(slot, index)], strict=True):
            entry.parameter.data = view

    def after_block(self, index: int) -> None:
        """Block ``index`` ran (or failed): its slot free once its work is done, its parameters on the host."""
        if not self.entries[index]:
            return
        self._transfers.mark_free(self._slot_of(index), index)
        for entry in self.entries[index]:
            entry.parameter.data = entry.host
        if index == self.streamed[-1]:
            # every slot is free now: the next forward's first blocks can come over during the rest of this one
            for block in self.streamed[: self.slot_count]:
                self._copy(block)

    def close(self) -> None:
        """Wait for the copies, give every parameter its host tensor back, free the slots."""
        self._transfers.synchronize()
        for entries in self.entries:
            for entry in entries:
                entry.parameter.data = entry.host
        self._slots, self._views, self._content = [], {}, []


# --------------------------------------------------------------------------- the dynamic patcher


class BlockPrefetch:
    """ComfyUI's block prefetch (``comfy.model_prefetch``) around the blocks, as core's LTX-AV and MiniMax models
    call it in their block loops: before block i, the previous block's cast state is released and block i's
    non-resident weights are cast in one batch on ComfyUI's offload stream. Driven by the model's ``run_block``
    (:meth:`before_block`, :meth:`after_block`), not by module hooks, so that a block taking the fast path
    (:mod:`.fast_path`) gets its weights prefetched the same way as one running through ComfyUI's layers."""

    def __init__(self, blocks: nn.ModuleList):
        self.blocks = blocks
        self.queue: list | None = None
        self.device: torch.device | None = None
        self.popped = 0
        self.forwards = 0  # forwards that ran with a queue
        # devices ComfyUI makes no queue for (its flags and the device decide it, not the forward): not asked again
        self._unavailable: set[torch.device] = set()

    def describe(self) -> str:
        return (
            f"ComfyUI's dynamic VRAM with its block prefetch around {len(self.blocks)} blocks "
            f"({self.forwards} forwards prefetched so far)"
        )

    def before_block(self, index: int, device: torch.device) -> None:
        """Block ``index`` is next: its weights (and those of any block a patch skipped before it) fetched."""
        if device in self._unavailable:
            return
        if index == 0 or self.queue is None:
            self._finish()
            self.device = device
            self.queue = model_prefetch.make_prefetch_queue(
                list(self.blocks), self.device, {"prefetch_dynamic_vbars": True}
            )
            self.popped = 0
            if self.queue is None:
                self._unavailable.add(device)
                logger.warning(
                    "ComfyUI's block prefetch is off for %s (async weight offload disabled, or no "
                    "non-blocking copies there): its per-layer casting streams the blocks",
                    self.device,
                )
                return
            self.forwards += 1
            if self.forwards == 1:
                logger.debug("ComfyUI's block prefetch runs on %s", self.device)
        # one pop per block up to this one (a block a patch skipped gets its pop too)
        while self.popped <= index:
            model_prefetch.prefetch_queue_pop(self.queue, self.device, self.blocks[self.popped])
            self.popped += 1

    def after_block(self, index: int) -> None:
        """After the last block, what the queue still holds is released."""
        if index == len(self.blocks) - 1:
            self._finish()

    def _finish(self) -> None:
        """Release what the queue still holds. ComfyUI itself clears every queue after a node (so after a failed
        forward); a queue it has already cleared is only dropped."""
        queue, self.queue = self.queue, None
        if queue is None or not any(q is queue for q in model_prefetch.PREFETCH_QUEUES):
            return
        while len(queue) > 1:
            model_prefetch.prefetch_queue_pop(queue, self.device, None)

    def close(self) -> None:
        self._finish()
