"""Patch-n-Pack for audio: several clips share one encoder sequence, each attending only to itself.

Whisper pads every clip to 30 s (1500 encoder positions), so a 0.5 s clip spends 98% of the encoder's compute on
silence. With variable-length encoding each clip keeps only its real positions; packing then lays the clips of a
batch end to end in as few rows as fit `capacity` positions (first-fit decreasing), with a block-diagonal attention
mask, so no compute is spent on padding at all. `unpack` puts the positions back where the padded layout has them.

Sign-language keypoint clips (one encoder position per frame) pack the same way with `plan_clip_packing`, into rows
no longer than the batch's longest clip: the block-diagonal mask runs on a dense attention kernel, whose cost grows
with the row's length squared, so rows as long as the padded ones keep each position's attention cost what padding
pays while the rows themselves, and the feed-forward and experts' work, shrink to the real frames.
"""

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    """Where each packed position comes from.

    source: (rows, row_len) index into the flattened padded layout (batch * seq_len), -1 on row padding.
    segment: (rows, row_len) the clip each packed position belongs to, -1 on row padding.
    """

    source: torch.Tensor
    segment: torch.Tensor

    @property
    def real(self) -> torch.Tensor:
        """(rows, row_len) bool, True on packed positions that hold a clip."""
        return self.segment >= 0


def plan_packing(lengths: torch.Tensor, seq_len: int, capacity: int) -> Packing:
    """Pack clips of `lengths` (batch,) real positions, laid out padded to `seq_len`, into rows of <= `capacity`."""
    sizes = lengths.tolist()
    if max(sizes) > capacity:
        raise ValueError(f"A clip has {max(sizes)} encoder positions, more than the {capacity} a row can hold.")
    rows: list[list[int]] = []
    room: list[int] = []
    for clip in sorted(range(len(sizes)), key=lambda i: -sizes[i]):  # first-fit decreasing
        row = next((r for r, free in enumerate(room) if sizes[clip] <= free), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(clip)
        room[row] -= sizes[clip]
    row_len = max(capacity - free for free in room)
    source = torch.full((len(rows), row_len), -1, dtype=torch.long)
    segment = torch.full((len(rows), row_len), -1, dtype=torch.long)
    for row, clips in enumerate(rows):
        offset = 0
        for clip in clips:
            size = sizes[clip]
            source[row, offset : offset + size] = clip * seq_len + torch.arange(size)
            segment[row, offset : offset + size] = clip
            offset += size
    return Packing(source=source.to(lengths.device), segment=segment.to(lengths.device))


def plan_clip_packing(attention_mask: torch.Tensor) -> Packing:
    """Pack right-padded clips, `attention_mask` (batch, seq_len) with 1 on real positions, into rows of at most the
    longest clip's length."""
    lengths = attention_mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("A clip has no real positions (its attention_mask row is all zeros); drop it before packing.")
    seq_len = attention_mask.shape[1]
    real = torch.arange(seq_len, device=lengths.device)[None] < lengths[:, None]
    if not torch.equal(real, attention_mask.bool()):
        raise ValueError(
            "Packing takes right-padded clips (each clip's real positions first), but attention_mask has a 0 before a "
            "1; pad on the right."
        )
    return plan_packing(lengths, seq_len, int(lengths.max()))


def pack(hidden_states: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(batch, seq_len, d) padded -> (rows, row_len, d) packed, zeros on row padding."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    packed = flat[packing.source.clamp(min=0)]
    return packed * packing.real[..., None].to(packed.dtype)


def unpack(packed: torch.Tensor, packing: Packing, batch_size: int, seq_len: int) -> torch.Tensor:
    """(rows, row_len, d) packed -> (batch, seq_len, d) padded, zeros past each clip's end."""
    real = packing.real
    flat = packed.new_zeros(batch_size * seq_len, packed.shape[-1])
    flat = flat.index_copy(0, packing.source[real], packed[real])
    return flat.reshape(batch_size, seq_len, -1)


def block_diagonal_mask(packing: Packing) -> torch.Tensor:
    """(rows, 1, row_len, row_len) bool, True where query and key belong to the same clip.

    Row padding attends to row padding only, which keeps its softmax finite; its outputs are dropped by `unpack`.
    """
    segment = packing.segment
    return (segment[:, :, None] == segment[:, None, :])[:, None]
