"""The vision encoder for many images at once, with no host sync inside it.

transformers' Qwen3-VL vision forward (5.24) derives everything from ``grid_thw`` on the
device and then, in each of its 24 blocks, splits the packed sequence with
``lengths.tolist()`` and loops over the images in Python: 74 host syncs and ~1,500
dispatched ops per call for the real tower (issue 29).  Here the layout is planned once
per call on the host, from the grids the preprocessing already knows as Python ints:

* ``plan(grids, visual, device)``: the attention segments (one per frame, as the model
  does), the rotary position ids and the position-embedding interpolation taps (computed
  by transformers' own helpers on CPU tensors), and, when the segments differ in length,
  the gather/scatter indices of a padded ``[segments, longest, ...]`` layout with a key
  mask.  Everything reaches the device in one copy each; nothing is read back.
* ``encode(visual, pixels, plan)``: the model's own modules and weights (the patch embed
  as one matmul, ``patch_embed``; position embedding, rotary, each block's norms, qkv,
  proj and MLP, the deepstack mergers, the merger) with one
  ``scaled_dot_product_attention`` per block over all segments: a plain view when they
  are equal (a burst of same-size photos), the padded layout otherwise.  Returns
  ``(merged embeds, [deepstack features])`` like the model's ``pooler_output`` /
  ``deepstack_features``.

``ModelRunner.check_encoder`` compares this with the model's own forward at startup and
falls back to the model's forward (with a log line) when they disagree, e.g. under a
transformers whose vision block is built differently.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.engine.transfer import to_device


@dataclass
class VisionPlan:
    lengths: list[int]             # attention segments, in order (one per frame)
    longest: int
    position_ids: torch.Tensor     # [patches, 2] rotary (row, col) ids
    interp_indices: torch.Tensor   # [patches, taps] into the learned position table
    interp_weights: torch.Tensor   # [patches, taps]
    gather: torch.Tensor | None    # [segments, longest]: patch index, or `patches` (a pad)
    scatter: torch.Tensor | None   # [patches]: each patch's place in the padded layout
    key_mask: torch.Tensor | None  # [segments, 1, 1, longest]: True where a key is real


@functools.lru_cache(maxsize=512)
def _grid_tables(grid: tuple[int, int, int], merge: int, side: int, mode: str,
                 align_corners: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotary position ids and position-embedding taps of one image grid, by transformers'
    own helpers on a CPU tensor (host work only), kept per grid: a burst of same-size
    photos computes them once."""
    from transformers.vision_utils import (get_vision_interpolation_indices_and_weights,
                                           get_vision_position_ids)
    cpu = torch.tensor([grid], dtype=torch.long)
    indices, weights = get_vision_interpolation_indices_and_weights(
        cpu, num_grid_per_side=side, mode=mode, align_corners=align_corners,
        spatial_merge_size=merge)
    return get_vision_position_ids(cpu, merge), indices, weights


def plan(grids: list[tuple[int, int, int]], visual, device) -> VisionPlan:
    """The layout of one encoder call over images of ``grids`` ((t, h, w) in patches)."""
    tables = [_grid_tables(tuple(g), visual.spatial_merge_size, visual.num_grid_per_side,
                           visual.interpolation_mode, visual.interpolation_align_corners)
              for g in grids]
    position_ids, indices, weights = (torch.cat(ts) for ts in zip(*tables))
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    longest = max(lengths)
    gather = scatter = key_mask = None
    if len(set(lengths)) > 1:
        n = sum(lengths)
        gather = torch.full((len(lengths), longest), n, dtype=torch.long)
        scatter = torch.empty(n, dtype=torch.long)
        key_mask = torch.zeros(len(lengths), 1, 1, longest, dtype=torch.bool)
        start = 0
        for s, length in enumerate(lengths):
            gather[s, :length] = torch.arange(start, start + length)
            scatter[start:start + length] = torch.arange(s * longest, s * longest + length)
            key_mask[s, ..., :length] = True
            start += length

    def up(t):
        return None if t is None else to_device(t, device)
    return VisionPlan(lengths, longest, up(position_ids), up(indices), up(weights),
                      up(gather), up(scatter), up(key_mask))


def _attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               p: VisionPlan) -> torch.Tensor:
    """``attn`` (a Qwen3-VL vision attention module) over every segment at once."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
    n, heads = x.shape[0], attn.num_heads
    q, k, v = attn.qkv(x).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [n, heads, d]
    segments, longest = len(p.lengths), p.longest
    if p.gather is None:  # equal segments: a view
        q, k, v = (t.reshape(segments, longest, heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        out = out.transpose(1, 2).reshape(n, -1)
    else:  # padded to the longest segment; padding keys masked, padding queries dropped
        def padded(t):
            t = torch.cat([t, t.new_zeros(1, *t.shape[1:])])
            return t[p.gather].transpose(1, 2)  # [segments, heads, longest, d]
        out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v),
                                             attn_mask=p.key_mask, scale=attn.scaling)
        out = out.transpose(1, 2).reshape(segments * longest, -1)[p.scatter]
    return attn.proj(out)


def patch_embed(embed, pixels: torch.Tensor) -> torch.Tensor:
    """The model's patch embedding (``embed``: its ``Conv3d`` ``proj``) as one matmul.  The
    pixels come cut into patches and the kernel is the stride, so the convolution is a
    linear map of each flattened patch (channels, frames, rows, columns: the order of the
    kernel's weight).  The convolution kernels are ~3x slower for it on CPU (measured:
    1,280 tiny patches 4.9 -> 1.6 ms, 1,024 full-size ones 123 -> 36 ms), and on a GPU
    torch >= 2.9 no longer gives this Conv3d to cuDNN (vLLM issue 27406, a large slowdown;
    vLLM's Conv3dLayer takes the matmul there too).  Any other convolution: the module."""
    conv = embed.proj
    if not (isinstance(conv, torch.nn.Conv3d) and conv.kernel_size == conv.stride
            and not any(conv.padding) and set(conv.dilation) == {1} and conv.groups == 1):
        return embed(pixels)
    w = conv.weight
    flat = pixels.reshape(-1, w.shape[1:].numel()).to(w.dtype)
    return F.linear(flat, w.reshape(w.shape[0], -1), conv.bias)


def encode(visual, pixels: torch.Tensor, p: VisionPlan) -> tuple[torch.Tensor, list]:
    """``(merged embeds [patches / merge^2, out_hidden], [deepstack features])``."""
    h = patch_embed(visual.patch_embed, pixels)
    pos = (visual.pos_embed(p.interp_indices) * p.interp_weights[:, :, None]).sum(1)
    h = h + pos.to(h.dtype)
    cos, sin = visual.rotary_pos_emb(h, p.position_ids)
    deep = []
    stack = list(visual.deepstack_visual_indexes)
    for i, blk in enumerate(visual.blocks):
        h = h + _attention(blk.attn, blk.norm1(h), cos, sin, p)
        h = h + blk.mlp(blk.norm2(h))
        if i in stack:
            deep.append(visual.deepstack_merger_list[stack.index(i)](h))
    return visual.merger(h), deep
