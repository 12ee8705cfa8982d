"""Greedy decoding for the auto-caption: the tokens of transformers' ``generate``, without its per-token overhead.

``generate`` spends most of a caption outside the GPU's arithmetic: each token it grows the key/value cache by
concatenation, rebuilds masks and positions, and runs its logits processors as separate host-driven steps. Here the
prompt goes once through the model's own forward (vision tower, 3D rotary positions, the first logits and the
prompt's keys and values). Each later token is one step over a preallocated key/value cache, computed from the
model's weights with the arithmetic of its own eager layers (:mod:`.caption_step`), with the repetition penalty, the
minimum-length rule and the argmax on the device. The host reads the end marker back every few steps and drops the
steps run past the end token.

A step runs one of two ways (``step_graph``):

- ``"whole"`` (the default where CUDA graphs are captured): the whole step, embedding to next token, is one CUDA
  graph, replayed once per token. Its attention reads the current position on the device and covers the cache up
  to it (:mod:`.decode_attention`: split over the cache in a Triton kernel on CUDA, PyTorch's fused attention
  behind a mask elsewhere). In a layer of plain linears its query, key and value projections are one
  matrix-vector product, and so are the MLP's gate and up projections, over fused weights that the model's own
  Parameters are views of (:mod:`.caption_fusion`: the model keeps working, on the same memory). In float32 its
  tokens are ``generate``'s; in bf16 its attention and its fused products round otherwise than ``generate``'s
  kernels, so its tokens can part from ``generate``'s on near ties.
- ``"pieces"`` (the default elsewhere): the parts of a step between two attentions are CUDA graphs, and each
  attention runs between them as the very call transformers makes, over exactly the cached length (which the host
  knows without asking the GPU), so the tokens are ``generate``'s in bf16 too. On the CPU the pieces run eagerly.

Either way a linear kept in float8 (:class:`.ops.FP8Linear`, as ComfyUI's fp8 text encoder loads with
``fp8="keep"``) is multiplied by with that layer's own arithmetic, in fp8 on the GPUs where its forward would be, and
stays unfused. The settings and models the decoder reproduces ``generate`` for are :mod:`.caption_settings`'s.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .caption_settings import GreedyDecoderUnavailable, GreedySettings, check_model, greedy_settings
from .caption_step import (
    EAGER_PARTS,
    PLAIN_PARTS,
    LayerShape,
    Picks,
    StepParts,
    StepState,
    StepWeights,
    attend,
    attention_inputs,
    captured_over,
    head_scores,
    layer_output,
    pick,
    whole_step,
)

__all__ = ["GreedyDecoderUnavailable", "GreedyDecoder", "GreedySettings", "greedy_settings"]

logger = logging.getLogger(__name__)

# The decoding attentions of the pieces on CUDA: every step has a new cached length, and cuDNN's attention builds a
# plan for each new shape, which made a process's first caption several times slower than the later ones
# (benchmarks/RESULTS.md); the flash and memory-efficient kernels need no plan.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Where the whole step's attention cannot run its Triton kernels, it covers every slot of the cache behind a mask,
# which flash attention does not take; the memory-efficient kernel takes it, keeps its scores in float32, and needs
# no per-shape plan either.
WHOLE_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ALL_ATTENTION = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]

STEP_GRAPHS = ("whole", "pieces")
# Cache lengths are rounded up to this, so captions of images with other aspect ratios reuse the captured graphs.
CACHE_GRANULE = 256
# How many tokens run between two looks for the end token: each look waits for the GPU once.
DEFAULT_CHECK_EVERY = 16


@dataclass
class _Buffers:
    """The decoder's device state: the key/value cache and every tensor a step reads or writes, at fixed
    addresses so captured graphs can replay over them."""

    step_graph: str
    state: StepState  # the cache, rotary tables, position and picks (all a whole step touches)
    rope_delta: torch.Tensor  # (1,) rotary position minus sequence index for text after the image (mrope)
    # what passes between the pieces of a step
    hidden: torch.Tensor  # (1, 1, hidden)
    cos: torch.Tensor  # (1, 1, head_dim) the rotary tables of this step's position
    sin: torch.Tensor
    query: torch.Tensor  # (1, heads, 1, head_dim)
    attended: torch.Tensor  # (1, heads, 1, head_dim)
    penalty: float
    graphs: list[torch.cuda.CUDAGraph] | None = None  # the whole step, or its pieces, captured
    weights: tuple = ()  # what the graphs were captured over (caption_step.captured_over)

    @property
    def picks(self) -> Picks:
        return self.state.picks

    @property
    def capacity(self) -> int:
        return self.state.slots.shape[0]


class GreedyDecoder:
    """Greedy decoding of a Qwen2.5-VL model with generate()'s tokens (see the module's docstring).

    ``step_graph`` is how a step runs: ``"whole"``, one CUDA graph per token with the attention over the cache up
    to a position read on the device (its bf16 rounding differs from generate's in the attention); ``"pieces"``,
    CUDA graphs around transformers' own attention calls (generate's rounding in bf16 too); None picks "whole" on
    CUDA with ``cuda_graph`` and "pieces" elsewhere. ``cuda_graph`` False runs the same step eagerly. Keeps its
    cache and graphs between calls while they fit and the weights stay where they were; a longer request, another
    penalty or moved weights build them again. ``compile_step`` runs the step through torch.compile (the whole
    step's parts, one compilation of its layer serving all layers, or the pieces of the layers), which fuses its
    elementwise work into fewer kernels after a compilation on the first call; its rounding is not the eager
    layers', so its tokens can part from generate's in low precision; ``compile_options`` go to torch.compile as
    its ``options`` (inductor's settings, such as ``{"coordinate_descent_tuning": True}``). ``check_every`` is how
    many tokens run between two looks for the end token. The first "whole" step moves the model's query, key and
    value weights, and its gate and up weights, into one tensor each per layer of plain linears
    (:mod:`.caption_fusion`); the Parameters stay the model's, as views of them. Linears kept in float8
    (:class:`.ops.FP8Linear`) compute as their forward does, fp8 matmul or dequantised weight as it would choose for
    the step's input when the call starts (``set_fp8_compute`` between calls is seen on the next one).
    """

    def __init__(
        self,
        model,
        check_every: int = DEFAULT_CHECK_EVERY,
        cuda_graph: bool = True,
        compile_step: bool = False,
        step_graph: str | None = None,
        compile_options: dict | None = None,
    ):
        check_model(model)
        if step_graph is not None and step_graph not in STEP_GRAPHS:
            raise ValueError(f"step_graph must be one of {STEP_GRAPHS} or None, got {step_graph!r}")
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {check_every}")
        self.model = model
        language_model = model.model.language_model
        self._layers = list(language_model.layers)
        self._rotary = language_model.rotary_emb
        self._head = model.lm_head
        self._shape = LayerShape.of(model)
        self._vocab = self._head.out_features
        self.check_every = check_every
        self.cuda_graph = cuda_graph
        self.step_graph = step_graph
        self.compile_step = compile_step
        # Compiled as pure functions of their tensors: one compilation of each piece, and of the whole step's
        # layer, serves all layers. fullgraph: a break would put host code inside a graph, which CUDA cannot hold.
        options = {} if compile_options is None else {"options": compile_options}
        compiled = torch.compile(dynamic=False, fullgraph=True, **options) if compile_step else (lambda fn: fn)
        self._attention_inputs = compiled(attention_inputs)
        self._layer_output = compiled(layer_output)
        self._parts = StepParts(*(compiled(part) for part in PLAIN_PARTS)) if compile_step else EAGER_PARTS
        # the tensors a step computes with, taken at each call and dropped after it, so that weights the model no
        # longer holds (moved or replaced) are not kept alive by the decoder
        self._weights: StepWeights | None = None
        self._buffers: _Buffers | None = None
        forward = inspect.signature(model.forward).parameters
        self._prefill_kwargs = {"use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in forward else {})}

    def step_graph_for(self, device: torch.device) -> str:
        """How a step runs on ``device``: ``step_graph``, or by default "whole" where CUDA graphs are captured and
        "pieces" elsewhere (without CUDA graphs both run the same host code per layer, and the pieces round as
        generate does)."""
        if self.step_graph is not None:
            return self.step_graph
        return "whole" if device.type == "cuda" and self.cuda_graph else "pieces"

    @torch.inference_mode()
    def generate(
        self, inputs: dict[str, torch.Tensor], settings: GreedySettings, seconds: dict[str, float] | None = None
    ) -> torch.Tensor:
        """The new tokens (1-D, on the CPU) that ``generate(**inputs)`` returns after the prompt: up to
        ``settings.max_new_tokens``, through the first end token. With ``seconds``, waits for the GPU after each
        phase and records "capture" (cache and graphs, 0 when reused), "prefill" (vision tower and prompt) and
        "decode" (the tokens after the first)."""
        device = self._head.weight.device
        prompt_length = inputs["input_ids"].shape[1]
        clock = _Clock(device, seconds)
        try:
            buffers = self._buffers_for(
                prompt_length + settings.max_new_tokens,
                settings.repetition_penalty,
                device,
                self.step_graph_for(device),
            )
            clock.lap("capture")
            self._prefill(inputs, settings, buffers)
            clock.lap("prefill")

            step = self._stepper(buffers)
            produced, end = 1, self._end(buffers, settings)
            with self._attention_backends(buffers):
                while end is None and produced < settings.max_new_tokens:
                    steps = min(self.check_every, settings.max_new_tokens - produced)
                    # new token n - 1 is fed in at slot prompt_length + n - 1: attention reads prompt_length + n slots
                    for length in range(prompt_length + produced, prompt_length + produced + steps):
                        step(length)
                    produced += steps
                    end = self._end(buffers, settings)
            tokens = buffers.picks.out[: produced if end is None else end + 1].cpu()
        finally:
            self._weights = None
        clock.lap("decode")
        return tokens

    @staticmethod
    def _end(buffers: _Buffers, settings: GreedySettings) -> int | None:
        """Index of the first end token among the new tokens picked so far, or None (waits for the GPU)."""
        if not settings.eos_token_ids:
            return None
        end = int(buffers.picks.end)
        return None if end < 0 else end

    # -- the prompt ---------------------------------------------------------------------------------------

    def _prefill(self, inputs: dict[str, torch.Tensor], settings: GreedySettings, buffers: _Buffers) -> None:
        """The prompt through the model's own forward; its keys and values into the cache; the first token."""
        # forward() sets the rotary offset of the text after the image from this prompt's image grid; cleared
        # first so that a prompt without an image is not given the previous caption's offset
        self.model.model.rope_deltas = None
        output = self.model(**inputs, **self._prefill_kwargs)
        # transformers 5.24 names it cache, earlier versions past_key_values
        cache = getattr(output, "cache", None)
        cache = getattr(output, "past_key_values", None) if cache is None else cache
        if cache is None or not hasattr(cache, "layers") or len(cache.layers) != len(self._layers):
            raise GreedyDecoderUnavailable(f"the model's forward returned no per-layer key/value cache ({type(cache)})")
        state, picks = buffers.state, buffers.picks
        prompt_length = inputs["input_ids"].shape[1]
        for layer, keys, values in zip(cache.layers, state.keys, state.values, strict=True):
            keys[:, :, :prompt_length].copy_(layer.keys)
            values[:, :, :prompt_length].copy_(layer.values)
        delta = self.model.model.rope_deltas
        if delta is None:
            buffers.rope_delta.zero_()
        else:
            buffers.rope_delta.copy_(delta.reshape(1))
        if buffers.step_graph == "whole":
            # every slot's rotary tables at once; text after the prompt has one position on all three mrope axes
            positions = (state.slots + buffers.rope_delta).view(1, 1, -1).expand(3, 1, -1)
            cos, sin = self._rotary(state.cos, positions)
            if cos.numel() != state.cos.numel():
                raise GreedyDecoderUnavailable(
                    f"the rotary embedding gave tables of shape {tuple(cos.shape)}, not one row per position "
                    "(another transformers?)"
                )
            state.cos.copy_(cos.reshape(state.cos.shape))
            state.sin.copy_(sin.reshape(state.sin.shape))
        state.position.fill_(prompt_length)
        picks.count.zero_()
        picks.end.fill_(-1)
        picks.min_new.fill_(settings.min_new_tokens)
        prompt_ids = inputs["input_ids"][0].to(picks.seen.device)
        # ids past the head's vocabulary cannot be generated, so transformers leaves them out of the penalty too
        picks.seen.zero_().index_fill_(1, prompt_ids[prompt_ids < self._vocab], True)
        picks.eos.zero_()
        if settings.eos_token_ids:
            picks.eos[list(settings.eos_token_ids)] = True
        pick(output.logits[:, -1].float(), picks, buffers.penalty)

    # -- one token ----------------------------------------------------------------------------------------

    def _stepper(self, buffers: _Buffers) -> Callable[[int], None]:
        """What runs one step, given the cached length it attends over (the pieces need it on the host)."""
        graphs = buffers.graphs
        if buffers.step_graph == "pieces":
            return lambda length: self._pieces_step(buffers, length)
        if graphs is not None:
            return lambda _length: graphs[0].replay()
        return lambda _length: self._run_whole_step(buffers)

    def _attention_backends(self, buffers: _Buffers):
        """The attention kernels a step may use, entered once for all the steps of a call (and around the
        compilation and capture, which pick the kernel)."""
        if buffers.step_graph == "whole":
            return sdpa_kernel(WHOLE_ATTENTION) if buffers.query.is_cuda else contextlib.nullcontext()
        return sdpa_kernel(DECODE_ATTENTION if buffers.query.is_cuda else ALL_ATTENTION)

    def _run_whole_step(self, buffers: _Buffers) -> None:
        whole_step(buffers.state, self._weights, self._shape, buffers.penalty, self._parts)

    def _pieces_step(self, buffers: _Buffers, length: int) -> None:
        """Feed ``picks.token`` at slot ``state.position`` (``length - 1``), pick the next token, advance."""
        pieces = buffers.graphs
        state = buffers.state
        for index in range(len(self._layers) + 1):
            if index:
                attended = attend(
                    buffers.query, state.keys[index - 1], state.values[index - 1], length, self._shape.scaling
                )
                buffers.attended.copy_(attended)
            if pieces is None:
                self._piece(index, buffers)
            else:
                pieces[index].replay()

    def _piece(self, index: int, buffers: _Buffers) -> None:
        """Piece ``index`` of a step, between two attentions (no host sync: this is what a CUDA graph holds).

        Piece 0 embeds the token and makes the rotary tables; piece i finishes layer i - 1 from its attention's
        output; every piece but the last goes on to the next layer's query, the last to the next token."""
        state, weights = buffers.state, self._weights
        if index == 0:
            hidden = F.embedding(state.picks.token, weights.embed)
            # text after the prompt has one rotary position on all three mrope axes
            position = (state.position + buffers.rope_delta).view(1, 1, 1).expand(3, 1, 1)
            cos, sin = self._rotary(hidden, position)
            buffers.cos.copy_(cos)
            buffers.sin.copy_(sin)
        else:
            hidden = self._layer_output(buffers.hidden, buffers.attended, weights.layers[index - 1], self._shape)
        if index < len(self._layers):
            buffers.hidden.copy_(hidden)
            query = self._attention_inputs(
                hidden,
                (buffers.cos, buffers.sin),
                state.position,
                state.keys[index],
                state.values[index],
                weights.layers[index],
                self._shape,
            )
            buffers.query.copy_(query)
        else:
            pick(head_scores(hidden, weights, self._shape.eps), state.picks, buffers.penalty)
            state.position.add_(1)

    # -- the cache and the graphs -------------------------------------------------------------------------

    def _buffers_for(self, length: int, penalty: float, device: torch.device, step_graph: str) -> _Buffers:
        """Buffers for ``length`` tokens (prompt and new), reused when they still fit; the step captured on CUDA."""
        # taken again each call: moving the model (between devices, to another dtype) can give it new tensors, which
        # the whole step fuses again; the fusion moves Parameters, so their addresses are read after it
        unfused = tuple(p.data_ptr() for p in self.model.parameters())
        try:
            self._weights = StepWeights.of(self.model, fused=step_graph == "whole")
        except ValueError as e:  # parts that cannot share one tensor (mixed dtypes)
            raise GreedyDecoderUnavailable(f"the projections cannot be fused: {e}") from e
        weights = captured_over(self._weights)
        if tuple(p.data_ptr() for p in self.model.parameters()) != unfused and device.type == "cuda":
            # the parts' old tensors are free now, but the caching allocator holds them in blocks of their sizes,
            # which nothing asks for again: handed back to the device once, after the fusion
            torch.cuda.empty_cache()
        buffers = self._buffers
        reusable = (
            buffers is not None
            and buffers.step_graph == step_graph
            and buffers.capacity >= length
            and buffers.penalty == penalty
            and buffers.weights == weights
            and buffers.picks.out.device == device
        )
        if reusable:
            return buffers
        self._buffers = None  # the old cache and graphs go before the new ones are allocated
        buffers = self._allocate(math.ceil(length / CACHE_GRANULE) * CACHE_GRANULE, penalty, device, step_graph)
        buffers.weights = weights
        if device.type == "cuda" and self.cuda_graph:
            buffers.graphs = self._capture(buffers)
        self._buffers = buffers
        return buffers

    def _allocate(self, capacity: int, penalty: float, device: torch.device, step_graph: str) -> _Buffers:
        dtype = self._head.weight.dtype
        shape = self._shape
        cache = (1, shape.kv_heads, capacity, shape.head_dim)

        def zeros(*size, dtype=dtype):
            return torch.zeros(size, dtype=dtype, device=device)

        # zeros, not empty: nothing a step reads may be uninitialised memory (NaN patterns) before the prefill
        picks = Picks(
            token=zeros(1, 1, dtype=torch.long),
            count=zeros(dtype=torch.long),
            min_new=zeros(dtype=torch.long),
            seen=zeros(1, self._vocab, dtype=torch.bool),
            eos=zeros(self._vocab, dtype=torch.bool),
            out=zeros(capacity, dtype=torch.long),
            end=zeros(dtype=torch.long),
        )
        state = StepState(
            # generate's cache, in the model's dtype (the keys and values are computed in it)
            keys=tuple(zeros(*cache) for _ in self._layers),
            values=tuple(zeros(*cache) for _ in self._layers),
            cos=zeros(capacity, shape.head_dim),
            sin=zeros(capacity, shape.head_dim),
            slots=torch.arange(capacity, device=device),
            position=zeros(1, dtype=torch.long),
            picks=picks,
        )
        return _Buffers(
            step_graph=step_graph,
            state=state,
            rope_delta=zeros(1, dtype=torch.long),
            hidden=zeros(1, 1, self._head.in_features),
            cos=zeros(1, 1, shape.head_dim),
            sin=zeros(1, 1, shape.head_dim),
            query=zeros(1, shape.heads, 1, shape.head_dim),
            attended=zeros(1, shape.heads, 1, shape.head_dim),
            penalty=penalty,
        )

    def _capture(self, buffers: _Buffers) -> list[torch.cuda.CUDAGraph] | None:
        """The step as CUDA graphs over ``buffers`` (one graph, or one per piece, in one memory pool); None (the
        step then runs eagerly) where capture fails.

        The warm-up steps leave values in the buffers; the prefill overwrites every one that a later step reads."""
        device = buffers.picks.out.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        step = self._stepper(buffers)
        whole = buffers.step_graph == "whole"
        try:
            with torch.cuda.stream(stream), self._attention_backends(buffers):
                for length in (1, 2):  # compilation, kernel selection and library handles happen before the capture
                    step(length)
            torch.cuda.current_stream(device).wait_stream(stream)
            pool = torch.cuda.graph_pool_handle()
            graphs = []
            for index in range(1 if whole else len(self._layers) + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    if whole:
                        self._run_whole_step(buffers)
                    else:
                        self._piece(index, buffers)
                graphs.append(graph)
        except RuntimeError as e:
            logger.warning("caption: the decoding step could not be captured as CUDA graphs (%s); running eagerly", e)
            torch.cuda.synchronize(device)
            return None
        return graphs


class _Clock:
    """Seconds per phase into ``seconds``, waiting for the device at each lap; does nothing without ``seconds``."""

    def __init__(self, device: torch.device, seconds: dict[str, float] | None):
        self.device, self.seconds = device, seconds
        self.start = self._now()

    def _now(self) -> float:
        if self.seconds is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.seconds is not None:
            now = self._now()
            self.seconds[name] = now - self.start
            self.start = now
