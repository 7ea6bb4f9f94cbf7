"""Mask2Former decode head for semantic segmentation: a deformable-attention pixel decoder, a masked-attention
transformer decoder, Hungarian matching and point-sampled mask losses, and semantic inference.

Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation" (CVPR 2022), as mmdet 2.22
builds it and ViT-Adapter ships it (czczup/ViT-Adapter fd64a51, segmentation/mmseg_custom/models/:
`decode_heads/mask2former_head.py`, `plugins/msdeformattn_pixel_decoder.py`, `utils/{assigner,point_sample,
positional_encoding}.py`, `losses/{match_costs,dice_loss,cross_entropy_loss}.py`, `segmentors/
encoder_decoder_mask2former.py`, and the ToMask transform). Facts, not code, are taken from there.

Module and parameter names are the official ones, so the `decode_head.*` keys of the official checkpoints load
unchanged (mmcv's ConvModule / FFN / MultiheadAttention / BaseTransformerLayer nesting):
    pixel_decoder.input_convs.{i}.{conv,gn}     1x1 conv (bias) + GN(32) on the stride-32/16/8 maps
    pixel_decoder.encoder.layers.{j}.attentions.0.{sampling_offsets,attention_weights,value_proj,output_proj}
    pixel_decoder.encoder.layers.{j}.ffns.0.layers.{0.0,1}   pixel_decoder.encoder.layers.{j}.norms.{0,1}
    pixel_decoder.level_encoding   pixel_decoder.lateral_convs.0.{conv,gn}   pixel_decoder.output_convs.0.{conv,gn}
    pixel_decoder.mask_feature
    transformer_decoder.layers.{i}.attentions.{0 cross, 1 self}.attn.{in_proj_weight,in_proj_bias,out_proj}
    transformer_decoder.layers.{i}.ffns.0.layers.{0.0,1}   transformer_decoder.layers.{i}.norms.{0,1,2}
    transformer_decoder.post_norm   query_embed   query_feat   level_embed   cls_embed   mask_embed.{0,2,4}
The official head also has `decoder_input_projs` (Identity when the pixel decoder's width equals the decoder's,
as in every config: no parameters) and `conv_seg = None`; both are left out.

Behaviour (spec shared/papers/vit_adapter.md 4.2):
  * pixel decoder: the three coarsest maps (strides 32/16/8) are projected, get a normalised sine position
    (2*pi, temperature 10000) plus a learnt level encoding, and pass 6 post-norm encoder layers (multi-scale
    deformable self-attention over the 3 levels, 4 points, reference = own cell centre on every level; LN;
    FFN with ReLU; LN). The stride-8 output is upsampled onto the stride-4 map's 1x1 lateral conv, a 3x3
    conv+GN+ReLU follows, and a 1x1 conv makes the mask features. Memories go to the decoder coarsest first.
  * decoder: 9 layers of (masked cross-attention, LN, self-attention, LN, FFN, LN); layer i attends to memory
    level i mod 3 (+ its level embedding; keys + sine position; values without); queries are `query_feat`
    with position `query_embed`. The cross-attention mask is the previous prediction resized (bilinear) to
    that level, blocked where sigmoid < 0.5; a row that would be fully blocked is opened entirely.
    A shared post-LN precedes every prediction: before layer 0 and after each layer, 10 in all.
  * targets (mmseg ToMask): one binary mask per class present in the (padded) crop, 255 excluded.
  * matching per image and prediction: cost = 2 * (-softmax prob of the target class) + 5 * (BCE averaged over
    points) + 5 * (dice on sigmoids, eps 1), on 12,544 uniform points shared by all queries and targets;
    solved by scipy.optimize.linear_sum_assignment.
  * losses on all 10 predictions, summed: class CE x2 with weight 1 per class and 0.1 for no-object (mean
    weighted by the targets' weights); mask BCE x5 and dice x5 on 12,544 points per matched mask, chosen by
    uncertainty (the 75% most uncertain, -|logit|, of 3x as many uniform candidates, plus 25% uniform);
    BCE averaged over masks x points, dice over masks, the mask count being the mean over processes (>= 1).
  * semantic inference: softmax(classes)[..., :-1] times sigmoid(masks), summed over queries, (B, K, h, w);
    the segmentor resizes it to the input, and the caller's slide / multi-scale inference applies a softmax
    before averaging (encoder_decoder_mask2former.inference), as for logits.
  * init: xavier_normal on every weight matrix of the encoder and decoder, then the deformable attention's
    own init; xavier_uniform on the input projections, caffe2-xavier (kaiming_uniform a=1) on the other
    convs; embeddings N(0, 1); classifier and mask MLP keep PyTorch's Linear init.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from scipy.optimize import linear_sum_assignment

from ops import MSDeformAttn

from .segment import EncoderDecoder, resize


# ----------------------------------------------------------------------------------------------------
# positions and points

def sine_position(h, w, num_feats, device=None, temperature=10000.0, scale=2 * math.pi, eps=1e-6):
    """DETR's normalised sine position of an unpadded h x w grid, (1, 2 * num_feats, h, w): the y half first,
    then x; within a half, channel 2k is sin and 2k+1 cos of (coord + 1) / (size + eps) * scale over
    temperature^(2k / num_feats)."""
    freq = temperature ** (2 * (torch.arange(num_feats, device=device) // 2) / num_feats)  # (F,)

    def encode(n):  # (n,) cell index -> (n, F)
        a = (torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + eps) * scale)[:, None] / freq
        return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=-1).flatten(1)

    ey, ex = encode(h), encode(w)
    pos = torch.cat([ey[:, None].expand(h, w, num_feats), ex[None].expand(h, w, num_feats)], dim=-1)
    return pos.permute(2, 0, 1)[None]  # (h, w, 2F) -> (1, 2F, h, w)


def cell_centres(shapes, device=None):
    """((x + 0.5) / w, (y + 0.5) / h) of every cell of every level, row-major, levels concatenated: (S, 2)."""
    out = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        out.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
    return torch.cat(out)


def point_sample(x, coords):
    """mmcv point_sample: x (N, C, H, W) at coords (N, P, 2) given as (x, y) in [0, 1] -> (N, C, P). Bilinear,
    align_corners=False (pixel centres at (i + 0.5) / size), zero outside the map."""
    return F.grid_sample(x, 2.0 * coords[:, :, None] - 1.0, mode="bilinear", align_corners=False).squeeze(3)


def uncertain_point_coords(mask_logits, num_points, oversample_ratio=3.0, importance_ratio=0.75):
    """Point coordinates (M, num_points, 2) for the mask losses (PointRend's training sampler): draw
    int(num_points * oversample_ratio) uniform candidates per mask, keep the int(importance_ratio * num_points)
    most uncertain (largest -|logit| at the candidate, sampled bilinearly), then add uniform points for the
    rest. mask_logits (M, 1, h, w)."""
    m = mask_logits.shape[0]
    cand = torch.rand(m, int(num_points * oversample_ratio), 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, cand)[:, 0].abs()  # (M, candidates)
    k = int(importance_ratio * num_points)
    idx = uncertainty.topk(k, dim=1).indices  # (M, k)
    picked = cand.gather(1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(m, num_points - k, 2, device=mask_logits.device)
    return torch.cat([picked, rest], dim=1)


# ----------------------------------------------------------------------------------------------------
# targets, matching, losses, inference

def semantic_targets(label, ignore_index=255):
    """mmseg ToMask per image: label (B, H, W) -> [(classes (n,) sorted, masks (n, H, W) float)], one binary
    mask per class present, the ignored value excluded."""
    out = []
    for lab in label:
        classes = torch.unique(lab)
        classes = classes[classes != ignore_index]
        out.append((classes, (lab[None] == classes[:, None, None]).float()))
    return out


def match_cost(cls_logits, mask_points, gt_labels, gt_points, weights=(2.0, 5.0, 5.0), eps=1.0):
    """The matcher's cost (Q, n) of one image: cls_logits (Q, K+1), mask_points (Q, P) logits at shared points,
    gt_labels (n,), gt_points (n, P) in [0, 1].
      class: -softmax(cls)[q, label_j];   mask: mean over points of BCE(logit_q, target_j);
      dice:  1 - (2 sum s_q t_j + eps) / (sum s_q + sum t_j + eps) with s = sigmoid(logit)."""
    w_cls, w_mask, w_dice = weights
    c_cls = -cls_logits.softmax(-1)[:, gt_labels]
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), summed as two matrix products
    c_mask = (F.softplus(-mask_points) @ gt_points.T + F.softplus(mask_points) @ (1 - gt_points).T)
    c_mask = c_mask / mask_points.shape[1]
    s = mask_points.sigmoid()
    c_dice = 1 - (2 * s @ gt_points.T + eps) / (s.sum(-1)[:, None] + gt_points.sum(-1)[None] + eps)
    return w_cls * c_cls + w_mask * c_mask + w_dice * c_dice


def hungarian(cost):
    """Minimum-cost one-to-one assignment of the rows (queries) to the columns (targets) of cost (Q, n), Q >= n:
    (rows, cols) as long tensors on cost's device, rows ascending (SciPy's linear_sum_assignment)."""
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.long, device=cost.device),
            torch.as_tensor(cols, dtype=torch.long, device=cost.device))


def dice_loss(logits, targets, eps=1.0):
    """mmdet's naive dice (no squares) per row: logits, targets (M, P) -> (M,)."""
    s = logits.sigmoid()
    return 1 - (2 * (s * targets).sum(-1) + eps) / (s.sum(-1) + targets.sum(-1) + eps)


def attention_mask(mask_logits, size, heads):
    """Masked attention's mask for the next decoder layer: mask logits (B, Q, H4, W4) resized (bilinear) to the
    memory level's size, blocked (True) where sigmoid < 0.5, i.e. logit < 0; a query whose row would be fully
    blocked sees every position instead. -> (B*heads, Q, h*w), batch-major as nn.MultiheadAttention wants."""
    small = F.interpolate(mask_logits, size, mode="bilinear", align_corners=False)
    blocked = (small < 0).flatten(2)  # (B, Q, h*w)
    blocked = blocked & ~blocked.all(-1, keepdim=True)
    return blocked.repeat_interleave(heads, dim=0).detach()


def semantic_inference(cls_logits, mask_logits):
    """(B, Q, K+1) class logits and (B, Q, h, w) mask logits -> (B, K, h, w) scores:
    sum over queries of softmax(cls)[..., k] (no-object dropped) * sigmoid(mask)."""
    return torch.einsum("bqk,bqhw->bkhw", cls_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())


def _mean_over_processes(x):
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


# ----------------------------------------------------------------------------------------------------
# building blocks in mmcv's nesting (official key names)

class ConvGN(nn.Module):
    """mmcv ConvModule with GroupNorm(32): conv -> gn (-> ReLU)."""

    def __init__(self, cin, cout, kernel_size=1, bias=False, relu=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(32, cout)
        self.relu = relu

    def forward(self, x):
        x = self.gn(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x


class FFN(nn.Module):
    """mmcv FFN with two fcs and the identity added: x + fc2(relu(fc1(x))). Keys layers.0.0 and layers.1."""

    def __init__(self, dim, hidden, with_cp=False):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True)),
                                    nn.Linear(hidden, dim))
        self.with_cp = with_cp

    def forward(self, x):
        if self.with_cp and x.requires_grad:
            return x + cp.checkpoint(self.layers, x, use_reentrant=False)
        return x + self.layers(x)


class MultiheadAttention(nn.Module):
    """mmcv MultiheadAttention: positions added to query and key (not value), residual. Batch first."""

    def __init__(self, dim, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, query, key, value, query_pos, key_pos, attn_mask=None):
        out = self.attn(query + query_pos, key + key_pos, value, attn_mask=attn_mask, need_weights=False)[0]
        return query + out


class EncoderLayer(nn.Module):
    """Post-norm deformable encoder layer: x = LN(x + MSDA(x + pos -> x)); x = LN(x + FFN(x))."""

    def __init__(self, dim, heads, ffn, levels=3, points=4, with_cp=False):
        super().__init__()
        self.attentions = nn.ModuleList([MSDeformAttn(dim, levels, heads, points)])
        self.ffns = nn.ModuleList([FFN(dim, ffn, with_cp)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim)])

    def forward(self, x, pos, ref, shapes, starts):
        x = self.norms[0](x + self.attentions[0](x + pos, ref, x, shapes, starts))
        return self.norms[1](self.ffns[0](x))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer, cross-attention first: q = LN(q + CA(q, memory, mask)); q = LN(q + SA(q));
    q = LN(q + FFN(q))."""

    def __init__(self, dim, heads, ffn, with_cp=False):
        super().__init__()
        self.attentions = nn.ModuleList([MultiheadAttention(dim, heads), MultiheadAttention(dim, heads)])
        self.ffns = nn.ModuleList([FFN(dim, ffn, with_cp)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, q, q_pos, memory, memory_pos, attn_mask):
        q = self.norms[0](self.attentions[0](q, memory, memory, q_pos, memory_pos, attn_mask))
        q = self.norms[1](self.attentions[1](q, q, q, q_pos, q_pos))
        return self.norms[2](self.ffns[0](q))


class Layers(nn.Module):
    """A stack of layers under `.layers` (mmcv TransformerLayerSequence); `post_norm` when given."""

    def __init__(self, layers, post_norm=None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if post_norm is not None:
            self.post_norm = post_norm


def _caffe2_xavier(conv):
    nn.init.kaiming_uniform_(conv.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class MSDeformAttnPixelDecoder(nn.Module):
    """feats (4 maps, strides 4/8/16/32, in_channels) -> (mask features (B, out, H/4, W/4), the 3 encoder outputs
    coarsest first (B, dim, h_l, w_l))."""

    def __init__(self, in_channels, dim=256, out_dim=256, heads=8, ffn=1024, num_layers=6, levels=3, points=4,
                 with_cp=False):
        super().__init__()
        self.levels, self.num_feats = levels, dim // 2
        n = len(in_channels)
        self.input_convs = nn.ModuleList(ConvGN(in_channels[n - 1 - i], dim, 1, bias=True) for i in range(levels))
        self.encoder = Layers(EncoderLayer(dim, heads, ffn, levels, points, with_cp) for _ in range(num_layers))
        self.level_encoding = nn.Embedding(levels, dim)
        # the maps below the encoder's levels (stride 4): lateral 1x1 + top-down add + 3x3 (an FPN step each)
        self.lateral_convs = nn.ModuleList(ConvGN(in_channels[i], dim, 1) for i in range(n - levels))
        self.output_convs = nn.ModuleList(ConvGN(dim, dim, 3, relu=True) for _ in range(n - levels))
        self.mask_feature = nn.Conv2d(dim, out_dim, 1)
        for c in self.input_convs:
            nn.init.xavier_uniform_(c.conv.weight)
            nn.init.zeros_(c.conv.bias)
        for c in list(self.lateral_convs) + list(self.output_convs):
            _caffe2_xavier(c.conv)
        _caffe2_xavier(self.mask_feature)
        nn.init.normal_(self.level_encoding.weight)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for m in self.encoder.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()

    def forward(self, feats):
        b, dev = feats[0].shape[0], feats[0].device
        srcs, pos, shapes = [], [], []
        for i in range(self.levels):
            f = feats[len(feats) - 1 - i]  # coarsest first
            h, w = f.shape[-2:]
            srcs.append(self.input_convs[i](f).flatten(2).transpose(1, 2))  # (B, C, h, w) -> (B, h*w, C)
            p = sine_position(h, w, self.num_feats, dev) + self.level_encoding.weight[i].view(1, -1, 1, 1)
            pos.append(p.flatten(2).transpose(1, 2))  # (1, h*w, C)
            shapes.append((h, w))
        x, pos = torch.cat(srcs, 1), torch.cat(pos, 1).to(srcs[0].dtype)
        ref = cell_centres(shapes, dev)[None, :, None]  # (1, S, 1, 2): own centre, the same on every level
        shapes_t = torch.as_tensor(shapes, dtype=torch.long, device=dev)
        starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
        for layer in self.encoder.layers:
            x = layer(x, pos, ref, shapes_t, starts)
        outs = [t.transpose(1, 2).reshape(b, -1, h, w) for t, (h, w) in zip(x.split([h * w for h, w in shapes], 1),
                                                                            shapes)]
        for i in range(len(feats) - self.levels - 1, -1, -1):
            lateral = self.lateral_convs[i](feats[i])
            top = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[i](lateral + top))
        return self.mask_feature(outs[-1]), outs[:self.levels]


# ----------------------------------------------------------------------------------------------------
# the head and the segmentor

class Mask2FormerHead(nn.Module):
    """forward(feats) -> (class logits, mask logits): two lists of 1 + dec_layers predictions,
    (B, Q, K+1) and (B, Q, H/4, W/4). losses(feats, label) -> (total, parts); predict(feats) -> (B, K, H/4, W/4).

    dim / heads / enc_ffn / dec_ffn: 256 / 8 / 1024 / 2048 (BEiT-B configs), 1024 / 32 / 4096 / 4096 (BEiT-L)."""

    def __init__(self, in_channels, num_classes, dim=256, num_queries=100, heads=8, enc_ffn=1024, dec_ffn=2048,
                 enc_layers=6, dec_layers=9, levels=3, enc_points=4, num_points=12544, oversample_ratio=3.0,
                 importance_ratio=0.75, no_object_weight=0.1, loss_weights=(2.0, 5.0, 5.0), ignore_index=255,
                 with_cp=False):
        super().__init__()
        self.num_classes, self.num_queries, self.heads, self.levels = num_classes, num_queries, heads, levels
        self.num_points, self.oversample_ratio, self.importance_ratio = num_points, oversample_ratio, importance_ratio
        self.loss_weights, self.ignore_index = loss_weights, ignore_index
        self.pixel_decoder = MSDeformAttnPixelDecoder(in_channels, dim, dim, heads, enc_ffn, enc_layers, levels,
                                                      enc_points, with_cp)
        self.transformer_decoder = Layers((DecoderLayer(dim, heads, dec_ffn, with_cp) for _ in range(dec_layers)),
                                          post_norm=nn.LayerNorm(dim))
        self.query_embed = nn.Embedding(num_queries, dim)  # positional part of the queries
        self.query_feat = nn.Embedding(num_queries, dim)  # content part
        self.level_embed = nn.Embedding(levels, dim)
        self.cls_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                        nn.ReLU(inplace=True), nn.Linear(dim, dim))
        weight = torch.ones(num_classes + 1)
        weight[-1] = no_object_weight
        self.register_buffer("class_weight", weight, persistent=False)  # not in the official checkpoints
        for p in self.transformer_decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    # -- forward ------------------------------------------------------------------------------------
    def _predict(self, q, mask_feature):
        """Shared post-LN, then class logits (B, Q, K+1) and mask logits (B, Q, H4, W4)."""
        q = self.transformer_decoder.post_norm(q)
        return self.cls_embed(q), torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_feature)

    def forward(self, feats):
        mask_feature, memories = self.pixel_decoder(feats)
        b, dev = mask_feature.shape[0], mask_feature.device
        mem, mem_pos = [], []
        for i, m in enumerate(memories):
            h, w = m.shape[-2:]
            mem.append(m.flatten(2).transpose(1, 2) + self.level_embed.weight[i])  # (B, h*w, C)
            mem_pos.append(sine_position(h, w, m.shape[1] // 2, dev).flatten(2).transpose(1, 2).to(m.dtype))
        # (Q, C) -> (B, Q, C); copies, not views: a view of a parameter taken under no_grad still "requires grad"
        # without a grad_fn, which module hooks (FlopCounterMode's tracker) cannot handle
        q = self.query_feat.weight.unsqueeze(0).repeat(b, 1, 1)
        q_pos = self.query_embed.weight.unsqueeze(0).repeat(b, 1, 1)
        cls, mask = self._predict(q, mask_feature)
        all_cls, all_mask = [cls], [mask]
        for i, layer in enumerate(self.transformer_decoder.layers):
            lvl = i % self.levels  # coarsest memory first, then finer, round robin
            blocked = attention_mask(mask, memories[lvl].shape[-2:], self.heads)
            q = layer(q, q_pos, mem[lvl], mem_pos[lvl], blocked)
            cls, mask = self._predict(q, mask_feature)
            all_cls.append(cls)
            all_mask.append(mask)
        return all_cls, all_mask

    def predict(self, feats):
        """Semantic scores (B, K, H/4, W/4) from the last prediction."""
        all_cls, all_mask = self(feats)
        return semantic_inference(all_cls[-1], all_mask[-1])

    # -- training -----------------------------------------------------------------------------------
    @torch.no_grad()
    def match(self, cls_logits, mask_logits, gt_labels, gt_masks):
        """One image: queries (Q, K+1), (Q, h, w) against targets (n,), (n, H, W) on num_points uniform points
        shared by all -> (query indices ascending, target indices)."""
        q, n = mask_logits.shape[0], gt_masks.shape[0]
        coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        pred = point_sample(mask_logits[:, None], coords.expand(q, -1, -1))[:, 0]  # (Q, P)
        tgt = point_sample(gt_masks[:, None], coords.expand(n, -1, -1))[:, 0]  # (n, P)
        return hungarian(match_cost(cls_logits, pred, gt_labels, tgt, self.loss_weights))

    def loss_single(self, cls_logits, mask_logits, targets):
        """(class, mask, dice) losses of one prediction: cls_logits (B, Q, K+1), mask_logits (B, Q, h, w)."""
        w_cls, w_mask, w_dice = self.loss_weights
        b, q = cls_logits.shape[:2]
        labels = torch.full((b, q), self.num_classes, dtype=torch.long, device=cls_logits.device)
        preds, tgts = [], []
        for i, (gt_labels, gt_masks) in enumerate(targets):
            if len(gt_labels) == 0:
                continue
            rows, cols = self.match(cls_logits[i], mask_logits[i], gt_labels, gt_masks)
            labels[i, rows] = gt_labels[cols]
            preds.append(mask_logits[i, rows])
            tgts.append(gt_masks[cols])
        # weighted mean: sum_i w[y_i] CE_i / sum_i w[y_i]
        loss_cls = w_cls * F.cross_entropy(cls_logits.flatten(0, 1), labels.flatten(), weight=self.class_weight)
        n_pos = sum(len(p) for p in preds)
        num_masks = _mean_over_processes(cls_logits.new_tensor(float(n_pos))).clamp(min=1)
        if n_pos == 0:
            zero = mask_logits[:, :0].sum()  # keeps the graph (DDP) with a zero gradient
            return loss_cls, zero, zero
        preds, tgts = torch.cat(preds), torch.cat(tgts)  # (M, h, w), (M, H, W)
        with torch.no_grad():
            coords = uncertain_point_coords(preds[:, None], self.num_points, self.oversample_ratio,
                                            self.importance_ratio)
            tgt_points = point_sample(tgts[:, None], coords)[:, 0]  # (M, P)
        pred_points = point_sample(preds[:, None], coords)[:, 0]
        loss_mask = w_mask * F.binary_cross_entropy_with_logits(pred_points, tgt_points, reduction="sum") / (
            num_masks * self.num_points)
        loss_dice = w_dice * dice_loss(pred_points, tgt_points).sum() / num_masks
        return loss_cls, loss_mask, loss_dice

    def losses(self, feats, label):
        """label (B, H, W) with ignore_index -> (total, parts): the last prediction's loss_cls / loss_mask /
        loss_dice and loss_deep, the sum of the 3 losses of the earlier predictions (official: d0..d8.*)."""
        all_cls, all_mask = self(feats)
        targets = semantic_targets(label, self.ignore_index)
        per = [self.loss_single(c.float(), m.float(), targets) for c, m in zip(all_cls, all_mask)]  # fp32 losses
        parts = dict(zip(("loss_cls", "loss_mask", "loss_dice"), per[-1]))
        parts["loss_deep"] = sum(sum(p) for p in per[:-1])
        return sum(parts.values()), parts


class Mask2FormerSegmentor(EncoderDecoder):
    """EncoderDecoderMask2Former: backbone + Mask2FormerHead, no auxiliary head. forward(img) -> semantic scores
    resized to the input (B, K, H, W); forward(img, label) -> (total loss, parts), one forward for DDP."""

    def __init__(self, backbone, decode_head):
        super().__init__(backbone, decode_head, None)

    def forward(self, img, label=None):
        feats = self.backbone(img)
        if label is None:
            return resize(self.decode_head.predict(feats), img.shape[2:])
        return self.decode_head.losses(feats, label)
