"""Benchmark: common/video_swin.py against torchvision's swin3d, same weights, same input.

Both backbones (features after the final norm, no head) run in the same process, interleaved (ours,
torchvision, ours, torchvision, ...), so machine noise hits both alike; the printed ratio is
median(ours) / median(torchvision): below 1.0 means ours is faster. The outputs are checked equal first.

    python bench/video_swin_speed.py                                   # Swin-T, 1x3x8x224x224, CPU
    python bench/video_swin_speed.py --arch swin_base --batch 2 --device cuda --amp
    python bench/video_swin_speed.py --frames 16 --size 112 --threads 2

Train-mode forward+backward uses drop path 0 in both, so the two compute the same thing. The third line
freezes every weight and back-propagates to the input, as a frozen backbone with adapters does (V-PETL).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torchvision.models.video as tvv
from torchvision.ops import StochasticDepth

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.video_swin import from_torchvision, video_swin  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="swin_tiny", choices=["swin_tiny", "swin_small", "swin_base"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    tv_arch = {"swin_tiny": tvv.swin3d_t, "swin_small": tvv.swin3d_s, "swin_base": tvv.swin3d_b}[a.arch]
    tv = tv_arch().to(dev)
    for m in tv.modules():  # its builder fixes the rate: set it to 0 afterwards
        if isinstance(m, StochasticDepth):
            m.p = 0.0
    ours = video_swin(a.arch, drop_path_rate=0.0).to(dev)
    sd = {k: v for k, v in from_torchvision(tv.state_dict()).items() if not k.startswith("cls_head.")}
    ours.load_state_dict(sd)

    def tv_features(x):  # torchvision's forward up to its final norm, in our (B, C, T, H, W) layout
        return tv.norm(tv.features(tv.patch_embed(x))).permute(0, 4, 1, 2, 3)

    x = torch.randn(a.batch, 3, a.frames, a.size, a.size, device=dev)
    amp = torch.autocast(dev.type, dtype=torch.float16, enabled=a.amp)
    ours.eval(), tv.eval()
    with torch.no_grad(), amp:
        err = (ours(x).float() - tv_features(x).float()).abs().max().item()
    print(f"{a.arch} input {tuple(x.shape)} on {dev} ({torch.get_num_threads()} threads{', amp' if a.amp else ''}); "
          f"max |ours - torchvision| = {err:.2e}")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def fwd(f):
        with torch.no_grad(), amp:
            f(x)

    def fwd_bwd(f):
        with amp:
            out = f(x)
        out.float().square().mean().backward()

    def set_frozen(frozen):  # V-PETL's case: weights frozen, gradients still flow through every block
        for p in list(ours.parameters()) + list(tv.parameters()):
            p.requires_grad_(not frozen)
        x.requires_grad_(frozen)

    for name, step, train, frozen in (("forward (eval, no grad)", fwd, False, False),
                                      ("forward+backward (train)", fwd_bwd, True, False),
                                      ("fwd+bwd, frozen weights", fwd_bwd, True, True)):
        ours.train(train), tv.train(train)
        set_frozen(frozen)
        times = {"ours": [], "torchvision": []}
        for r in range(a.warmup + a.repeats):
            for label, f in (("ours", ours), ("torchvision", tv_features)):
                sync()
                t = time.perf_counter()
                step(f)
                sync()
                if r >= a.warmup:
                    times[label].append(time.perf_counter() - t)
        mo, mt = statistics.median(times["ours"]), statistics.median(times["torchvision"])
        print(f"{name:26s} ours {mo * 1e3:9.1f} ms   torchvision {mt * 1e3:9.1f} ms   ratio ours/tv {mo / mt:.3f}x")


if __name__ == "__main__":
    main()
