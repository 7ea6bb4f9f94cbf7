"""Benchmark: one training step of ViT-Adapter-T + UperNet (ADE20K config, 512x512), or of any other preset
(the Mask2Former ones: ViT-Adapter + Mask2Former, whose pixel decoder adds six deformable-attention layers),
with our compiled deformable attention against the same step with the pure-PyTorch reference op, in one
run; and the forward pass's FLOP/s as a fraction of this machine's fp32 matmul peak, measured in the same run.

    python bench/vit_adapter_step.py                        # CPU, batch 2 (the paper's per-GPU batch)
    python bench/vit_adapter_step.py --batch 1 --repeats 2  # a quicker CPU run
    python bench/vit_adapter_step.py --device cuda          # CUDA kernel vs reference on the GPU
    python bench/vit_adapter_step.py --backbone-only        # the adapter backbone alone (no UperNet)
    # ViT-Adapter-B (BEiT-B) + Mask2Former, the COCO-Stuff-10k config at 512x512
    python bench/vit_adapter_step.py --preset coco_stuff10k_beit_base_mask2former --batch 1

What is timed (median of --repeats after --warmup untimed steps of each, same model, same inputs; the
two ops alternate, and so do the peak measurements, so that a machine whose speed drifts biases all alike):
  step     forward + loss + backward + AdamW step, model in train mode (DropPath and dropout active);
  forward  the forward + loss alone (autograd recording, as in training).
The op is swapped by replacing ``ops.msda.ms_deform_attn`` (what MSDeformAttn calls) with
``ms_deform_attn_pytorch`` for the reference run; everything else is identical.

FLOPs: torch.utils.flop_counter.FlopCounterMode counts the forward's matmuls, convolutions and
attention; it does not see the custom deformable op (nor grid_sample), so its sampling is added by
formula, per MSDeformAttn call: N * Lq * heads * levels * points * head_dim * 10 (bilinear: 4 corner
products and 3 additions + weights, counted as 8; the attention weight multiply-add: 2). Its linear
projections (offsets, weights, value, output) are ordinary Linears and are counted by the counter.
Peak: the best large fp32 torch.mm (2 n^3 FLOPs each) seen during the run, same device and threads. On
CPUs where torch.mm's BLAS is slower than oneDNN (MKL on AMD CPUs: oneDNN's convolutions then outrun
the "peak"), the same n x n x n product as a 1x1 convolution (oneDNN) is timed too, and the fraction is
given against the better of the two as well.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ops.msda  # noqa: E402
import vit_adapter_seg as V  # noqa: E402
from ops import MSDeformAttn, build  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def reference_op():
    """MSDeformAttn calls ops.msda.ms_deform_attn: point it at the pure-PyTorch reference meanwhile."""
    kernel = ops.msda.ms_deform_attn
    ops.msda.ms_deform_attn = ops.msda.ms_deform_attn_pytorch
    try:
        yield
    finally:
        ops.msda.ms_deform_attn = kernel


def matmul_peak(device, n, repeats=5):
    """fp32 FLOP/s of an n x n x n torch.mm, and of the same product as a 1x1 convolution (oneDNN on
    CPU, cuDNN on GPU): the best of ``repeats`` runs each."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    x = torch.randn(1, n, n // 64, 64, device=device)  # n input channels, n pixels
    w = torch.randn(n, n, 1, 1, device=device)

    def best(fn):
        t = timed(fn, device, 1, 1)
        return 2 * n ** 3 / min([t] + [timed(fn, device, 0, 1) for _ in range(repeats)])
    return best(lambda: torch.mm(a, b)), best(lambda: F.conv2d(x, w))


def sampling_flops(model, img):
    """FLOPs of the deformable sampling of one forward, by formula, from every MSDeformAttn call."""
    total = [0]

    def hook(m, args, out):
        query = args[0]
        n, lq = query.shape[:2]
        head_dim = int(m.d_model * m.ratio) // m.n_heads
        total[0] += n * lq * m.n_heads * m.n_levels * m.n_points * head_dim * 10

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MSDeformAttn)]
    with torch.no_grad():
        model(img)
    for h in handles:
        h.remove()
    return total[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--batch", type=int, default=2, help="images per step (paper: 2 per GPU)")
    p.add_argument("--size", type=int, default=512, help="crop side (ADE20K config: 512)")
    p.add_argument("--preset", default="ade20k_deit_tiny", help="a vit_adapter_seg.py preset")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-n", type=int, default=None, help="matmul side for the peak (CPU 2048, GPU 8192)")
    p.add_argument("--backbone-only", action="store_true",
                   help="time the ViT-Adapter backbone alone (loss: mean of its 4 maps), without UperNet / FCN")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = V.get_args(["--preset", args.preset, "--summary", "--crop", str(args.size)])
    torch.manual_seed(0)
    model = V.build_model(cfg, 150).to(device).train()
    opt = V.build_optimizer(cfg, model)
    img = torch.randn(args.batch, 3, args.size, args.size, device=device)
    # 64x64-pixel blocks of random classes: at most 64 classes in a 512 crop, fewer than Mask2Former's 100
    # queries, as in real crops (ToMask gives one target per class present)
    label = torch.randint(0, 150, (args.batch, -(-args.size // 64), -(-args.size // 64)), device=device)
    label = label.repeat_interleave(64, 1).repeat_interleave(64, 2)[:, :args.size, :args.size].contiguous()

    def loss_fn():
        if args.backbone_only:
            return sum(o.mean() for o in model.backbone(img))
        return model(img, label)[0]

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def forward():
        loss_fn()

    kernel = "C++ (CPU)" if device.type == "cpu" else "CUDA"
    if not build.available(device.type):
        sys.exit(f"the compiled op is not available on {device.type}: nothing to compare")
    what = "backbone only" if args.backbone_only else f"+ {'Mask2Former' if cfg.head == 'mask2former' else 'UperNet'}"
    print(f"{args.preset} {what}, {args.batch}x3x{args.size}x{args.size}, {device}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} thread(s)'}, "
          f"median of {args.repeats} after {args.warmup} warm-up, the two ops interleaved")
    ops_ = {kernel: contextlib.nullcontext, "reference": reference_op}
    for ctx in ops_.values():  # warm-up of both (AdamW state, allocator, kernels)
        with ctx():
            for _ in range(args.warmup):
                step()
    # interleaved: a machine whose speed drifts (shared cores, clocks) biases both alike
    times = {name: {"step": [], "forward": []} for name in ops_}
    n_peak = args.peak_n or (2048 if device.type == "cpu" else 8192)
    peaks = []
    for _ in range(args.repeats):
        for name, ctx in ops_.items():
            with ctx():
                times[name]["step"].append(timed(step, device, 0, 1))
                times[name]["forward"].append(timed(forward, device, 0, 1))
        peaks.append(matmul_peak(device, n_peak, repeats=2))
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    for name in ops_:
        print(f"  {name:>10}: step {med[name]['step'] * 1e3:9.1f} ms   forward {med[name]['forward'] * 1e3:9.1f} ms")
    ks, kf = med[kernel]["step"], med[kernel]["forward"]
    rs, rf = med["reference"]["step"], med["reference"]["forward"]
    print(f"  step speed-up of the {kernel} op over the reference: {rs / ks:.2f}x (forward {rf / kf:.2f}x)")

    net = model.backbone if args.backbone_only else model
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            net(img)
    counted = counter.get_total_flops()
    sampled = sampling_flops(net, img)
    fwd = counted + sampled
    mm, conv = max(p[0] for p in peaks), max(p[1] for p in peaks)
    peak = max(mm, conv)
    print(f"  forward FLOPs: {fwd / 1e9:.1f} G ({counted / 1e9:.1f} G counted by FlopCounterMode + "
          f"{sampled / 1e9:.2f} G deformable sampling by formula)")
    print(f"  fp32 peak ({n_peak}^3 product): torch.mm {mm / 1e9:.1f} GFLOP/s, as a 1x1 conv {conv / 1e9:.1f} GFLOP/s")
    print(f"  forward with the {kernel} op: {fwd / kf / 1e9:.1f} GFLOP/s = {fwd / kf / mm:.1%} of the torch.mm "
          f"peak, {fwd / kf / peak:.1%} of the better one (reference op: {fwd / rf / mm:.1%}, {fwd / rf / peak:.1%})")


if __name__ == "__main__":
    main()
