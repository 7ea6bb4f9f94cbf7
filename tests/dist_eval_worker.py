"""Run by tests/test_metrics.py, once as plain python and once under torchrun --nproc_per_node=2:
evaluates a fixed 'model' over a split of odd size with common.segment.evaluate and writes the metrics."""
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from common import dist as D  # noqa: E402
from common.segment import evaluate  # noqa: E402

K = 5


class Split(torch.utils.data.Dataset):
    """7 samples of different sizes; labels with ignore pixels; deterministic."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        h, w = 9 + i, 11 + 2 * i
        label = torch.randint(0, K, (h, w), generator=g)
        label[torch.rand(h, w, generator=g) < 0.1] = 255
        img = torch.randn(3, h, w, generator=g) + torch.nn.functional.one_hot(label.clamp(max=K - 1), K).permute(2, 0, 1)[:3]
        return {"img": img[None], "label": label[None], "name": [f"s{i}"]}


class Model(torch.nn.Module):
    def forward(self, x):  # (1, 3, h, w) -> (1, K, h, w) logits; deliberately imperfect
        return torch.cat([x, x[:, :2] * 0.5], dim=1)


if __name__ == "__main__":
    info = D.setup("cpu")
    ds = Split()
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=D.ShardSampler(len(ds), info.rank, info.world_size))
    seen = torch.zeros(len(ds), dtype=torch.int64)
    for s in loader:
        seen[int(s["name"][0][1:])] += 1
    D.all_reduce_sum(seen)
    m = evaluate(Model(), loader, K, torch.device("cpu"), infer=lambda mdl, x, size: mdl(x).softmax(1), show_progress=False)
    if info.is_main:
        json.dump({"metrics": m, "seen": seen.tolist(), "world": info.world_size}, open(sys.argv[1], "w"))
    D.cleanup()
