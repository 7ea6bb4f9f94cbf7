"""Multi-scale deformable attention: the op, its pure-PyTorch reference, and the MSDeformAttn module.

Faithful to Deformable-DETR's ``models/ops`` (fundamentalvision/Deformable-DETR) as vendored by
ViT-Adapter (czczup/ViT-Adapter ``detection/ops``: ``functions/ms_deform_attn_func.py``,
``modules/ms_deform_attn.py`` with the ``ratio`` argument). Upstream's CPU path raises "Not
implemented on the CPU"; here the CPU has a real C++ kernel and the CUDA kernel is our own.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import build


def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                           im2col_step=64):
    """The reference: one ``grid_sample`` per level (bilinear, zero padding, align_corners=False).

    value (N, S, M, D), spatial_shapes (L, 2) as (H, W), sampling_locations (N, Lq, M, L, P, 2)
    normalised (x, y), attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D). Levels are taken
    consecutively from S (as upstream: level_start_index and im2col_step are accepted, not used)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    hw = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    per_level = value.split([h * w for h, w in hw], dim=1)
    grids = 2 * sampling_locations - 1  # [0, 1] -> [-1, 1], grid_sample's convention
    sampled = []
    for lvl, (h, w) in enumerate(hw):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> (N*M, D, Lq, P)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    w = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()  # (N, Lq, M*D)


class _MSDeformAttnFunction(torch.autograd.Function):
    """The compiled kernels (C++ on CPU, CUDA on GPU), picked by the dispatcher from the tensors' device."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        out = torch.ops.propetl_msda.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        N, Lq, M, D = out.shape
        return out.view(N, Lq, M * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.propetl_msda.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous())
        return grad_value, None, None, grad_loc, grad_attn


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   im2col_step=64):
    """Multi-scale deformable attention with upstream's contract (see ops/__init__.py).

    value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
    sampling_locations (N, Lq, M, L, P, 2) normalised (x, y), out-of-range allowed;
    attention_weights (N, Lq, M, L, P) (used as given) -> (N, Lq, M * D).

    CPU tensors run the C++ kernel, CUDA tensors the CUDA kernel, built on first use; other devices,
    or a failed build (one warning), run ``ms_deform_attn_pytorch``. ``im2col_step`` is accepted for
    compatibility: the kernels need no batch chunking, so any N works."""
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    # one dtype for all three, as grid_sample and the kernels need (e.g. half value, float32 locations)
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                attention_weights.dtype)
    value, sampling_locations, attention_weights = (
        t.to(dtype) for t in (value, sampling_locations, attention_weights))
    if N == 0 or Lq == 0 or M * D == 0:
        # nothing is sampled; stay in the graph so that backward gives zero gradients
        out = value.new_zeros(N, Lq, M * D)
        return out + 0 * (value.sum() + sampling_locations.sum() + attention_weights.sum())
    kind = value.device.type
    if not build.available(kind):
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)
    args = (spatial_shapes.to(value.device, torch.long).contiguous(),
            level_start_index.to(value.device, torch.long).contiguous())
    if kind == "cpu" and dtype not in (torch.float32, torch.float64):
        # the C++ kernel is float32 / float64; half and bfloat16 are computed in float32 and cast back
        return _MSDeformAttnFunction.apply(value.float().contiguous(), *args,
                                           sampling_locations.float().contiguous(),
                                           attention_weights.float().contiguous()).to(dtype)
    return _MSDeformAttnFunction.apply(value.contiguous(), *args, sampling_locations.contiguous(),
                                       attention_weights.contiguous())


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable-DETR, with ViT-Adapter's value ``ratio``).

    forward(query (N, Lq, C), reference_points (N, Lq, L, 2) normalised (x, y) [or (N, Lq, L, 4) boxes
    (cx, cy, w, h)], input_flatten (N, S, C), input_spatial_shapes (L, 2), input_level_start_index (L,),
    input_padding_mask (N, S) True where padded) -> (N, Lq, C). Batch and level dimensions of size 1
    in reference_points broadcast (ViT-Adapter passes (1, Lq, 1, 2)). Upstream's warning for a
    per-head dim that is not a power of 2 (a hint about its CUDA kernel's speed) is left out."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, ratio=1.0):
        super().__init__()
        value_dim = int(d_model * ratio)
        if d_model % n_heads != 0 or value_dim % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) and d_model*ratio ({value_dim}) must be "
                             f"divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.ratio = (
            d_model, n_levels, n_heads, n_points, ratio)
        self.im2col_step = 64  # upstream's attribute, passed on; the kernels do not chunk the batch
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start as a star: head k looks along angle 2*pi*k/M, scaled so the larger coordinate
        # is 1 pixel, and point i of every level sits i+1 pixels out along that direction.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (M, 2)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        # (M, 2) -> (M, L, P, 2)
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum()) != S:
            raise ValueError(f"MSDeformAttn: input_spatial_shapes {input_spatial_shapes.tolist()} do not add "
                             f"up to the {S} tokens of input_flatten (are the image sides multiples of 32?)")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, -1)  # (N, S, C') -> (N, S, M, C'/M)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P)
        # softmax over the L*P samples of a head jointly, as upstream
        weights = F.softmax(weights, -1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of their level: divide by (W_l, H_l)
            normalizer = input_spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            # boxes (cx, cy, w, h): offsets span half the box over the P points
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"MSDeformAttn: reference_points must end in 2 or 4, got "
                             f"{tuple(reference_points.shape)}")
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights,
                             self.im2col_step)
        return self.output_proj(out)
