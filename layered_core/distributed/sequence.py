"""Sequence parallelism (Ulysses) for the VLD-MMDiT: one forward's joint [text ; image] sequence split over the P
processes of a sequence group.

Each stream is cut on its own: process p holds a contiguous run of the text tokens and one of the image tokens,
the runs as equal as the lengths allow (the first ``length % P`` processes one token more), so the blocks run
unchanged on [its text ; its image], with the RoPE table and the mask cut alike. Around attention an all-to-all
trades the split over the sequence for a split over the heads: each process attends over the whole sequence with
H / P heads (whichever kernel :func:`~layered_core.attention.local_attention` picks), and a second all-to-all
trades back. The gathered sequence is every process's [text ; image] in rank order, the keys in another order
than one process has them, which attention does not see: the rotation and the mask travel with the tokens.

Lengths that P does not divide are not padded: the all-to-all moves uneven runs. Padding would need a mask over
the padded keys, and FlashAttention-4 takes none (masked calls fall back to a slower kernel), so the unpadded
sequence keeps the fast kernel. P must divide the heads (24 at full size: 1, 2, 3, 4, 6, 8, 12 or 24).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from ..attention import local_attention
from .group import collective

_GROUPS: dict[str, dist.ProcessGroup] = {}  # the sequence groups, by the name the attention op is given
_names = itertools.count()


def balanced_splits(length: int, parts: int) -> list[int]:
    """``length`` tokens in ``parts`` contiguous runs, as equal as can be, the longer ones first."""
    base, extra = divmod(length, parts)
    return [base + (index < extra) for index in range(parts)]


def _offsets(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


@torch.library.custom_op("qwen_layered::ulysses_attention", mutates_args=())
def _ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, group: str, lengths: list[int]
) -> torch.Tensor:
    # Opaque to torch.compile, so that a compiled block calls the collectives as they are. q, k, v: (B, n, H, D)
    # this process's tokens; lengths[j] the tokens process j holds; mask None or (B, sum(lengths)) over the
    # gathered keys.
    process_group, parts = _GROUPS[group], len(lengths)
    batch, tokens, heads, head_dim = q.shape
    if tokens != lengths[dist.get_rank(process_group)]:
        raise ValueError(f"this process holds {tokens} tokens, the group was told {lengths}")
    share = heads // parts
    total = sum(lengths)
    # to process j: heads j * share ... of this process's tokens, token-major, q k v side by side
    outgoing = torch.stack([q, k, v]).view(3, batch, tokens, parts, share, head_dim).permute(3, 2, 0, 1, 4, 5)
    outgoing = outgoing.contiguous()
    incoming = outgoing.new_empty(total * 3 * batch * share * head_dim)
    unit = 3 * batch * share * head_dim
    with collective("the sequence-parallel attention's all-to-all"):
        dist.all_to_all_single(
            incoming, outgoing.view(-1), [n * unit for n in lengths], [tokens * unit] * parts, group=process_group
        )
    gathered = incoming.view(total, 3, batch, share, head_dim).permute(1, 2, 0, 3, 4).contiguous()
    out = local_attention(gathered[0], gathered[1], gathered[2], mask)  # (B, total, share * D)
    # back: to process j its own tokens, all of this process's heads
    outgoing = out.reshape(batch, total, share, head_dim).transpose(0, 1).contiguous()
    incoming = outgoing.new_empty(parts * tokens * batch * share * head_dim)
    unit = batch * share * head_dim
    with collective("the sequence-parallel attention's all-to-all"):
        dist.all_to_all_single(
            incoming, outgoing.view(-1), [tokens * unit] * parts, [n * unit for n in lengths], group=process_group
        )
    # (from process i: its heads, for this process's tokens) -> (B, n, H * D), heads in their order
    return incoming.view(parts, tokens, batch, share, head_dim).permute(2, 1, 0, 3, 4).reshape(batch, tokens, -1)


@_ulysses_attention.register_fake
def _(q, k, v, mask, group, lengths):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2] * q.shape[3])


class SequenceShard:
    """This process's part of one forward's joint sequence, for one pair of lengths: :meth:`cut` takes the
    forward's inputs to this part, the shard itself is the attention function (through
    :func:`~layered_core.attention.attention_override`), :meth:`gather` brings the output tokens together."""

    def __init__(self, group: str, rank: int, parts: int, text_length: int, image_length: int):
        self.group, self.rank = group, rank
        self.text_length = text_length
        self.text_splits = balanced_splits(text_length, parts)
        self.image_splits = balanced_splits(image_length, parts)
        self.text_offsets, self.image_offsets = _offsets(self.text_splits), _offsets(self.image_splits)
        self.lengths = [t + i for t, i in zip(self.text_splits, self.image_splits, strict=True)]

    def _text(self, rank: int) -> slice:
        return slice(self.text_offsets[rank], self.text_offsets[rank + 1])

    def _image(self, rank: int, shift: int = 0) -> slice:
        return slice(shift + self.image_offsets[rank], shift + self.image_offsets[rank + 1])

    def cut(self, tokens: torch.Tensor, text: torch.Tensor, pe: torch.Tensor, mask: torch.Tensor | None):
        """(image tokens, text tokens, RoPE table, mask) of this process: its runs of the image tokens (B, I, C)
        and text (B, L, C), its rows of the joint (L + I, ...) RoPE table, and the joint (B, L + I) key mask in
        the order the attention gathers the keys (or None)."""
        if tokens.shape[1] != self.image_offsets[-1] or text.shape[1] != self.text_length:
            raise ValueError(
                f"this shard is for {self.text_length} text and {self.image_offsets[-1]} image tokens, got "
                f"{text.shape[1]} and {tokens.shape[1]}"
            )
        rank, shift = self.rank, self.text_length
        table = torch.cat([pe[self._text(rank)], pe[self._image(rank, shift)]])
        if mask is not None:
            runs = [(mask[:, self._text(j)], mask[:, self._image(j, shift)]) for j in range(len(self.lengths))]
            mask = torch.cat([part for run in runs for part in run], dim=1)
        return tokens[:, self._image(rank)], text[:, self._text(rank)], table, mask

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of this process's queries over the whole sequence: q, k, v (B, n, H, D) -> (B, n, H * D)."""
        if q.shape[2] % len(self.lengths):
            raise ValueError(f"{q.shape[2]} attention heads do not split over {len(self.lengths)} processes")
        return torch.ops.qwen_layered.ulysses_attention(q, k, v, mask, self.group, list(self.lengths))

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """Every process's image output tokens (B, i_p, C), joined in order: (B, I, C) on every process."""
        longest = max(self.image_splits)
        padded = torch.nn.functional.pad(out, (0, 0, 0, longest - out.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in self.image_splits]
        with collective("gathering the sequence-parallel output"):
            dist.all_gather(parts, padded, group=_GROUPS[self.group])
        return torch.cat([part[:, :n] for part, n in zip(parts, self.image_splits, strict=True)], dim=1)


class SequenceParallel:
    """A sequence group as the transformer's ``sequence`` argument (:meth:`VLDMMDiT.forward_tokens`): the shard of
    each forward, one kept per pair of lengths, so that compiled blocks see the same attention function again."""

    def __init__(self, group: dist.ProcessGroup):
        self.name = f"sequence-{next(_names)}"
        _GROUPS[self.name] = group
        self.rank, self.parts = dist.get_rank(group), dist.get_world_size(group)
        self._shards: dict[tuple[int, int], SequenceShard] = {}

    def shard(self, text_length: int, image_length: int) -> SequenceShard:
        key = (text_length, image_length)
        if key not in self._shards:
            self._shards[key] = SequenceShard(self.name, self.rank, self.parts, text_length, image_length)
        return self._shards[key]
