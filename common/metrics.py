"""Segmentation metrics from per-class areas, as mmseg's IoUMetric computes them.

Per class c over the whole split: intersect = #(pred == label == c), union = #pred_c + #label_c - intersect.
IoU_c = intersect / union, Acc_c = intersect / #label_c, aAcc = sum(intersect) / sum(#label),
mIoU / mAcc = nan-mean over classes (a class absent from both prediction and ground truth is NaN and
skipped). Pixels labelled ``ignore_index`` count nowhere. Areas are int64 and summed over processes
before any division, so torchrun gives exactly the single-process figures.
"""
import torch

from .dist import all_reduce_sum


class SegMetric:
    def __init__(self, num_classes, ignore_index=255, device="cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        # rows: intersect, pred area, label area
        self.areas = torch.zeros(3, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred, label):
        """pred, label: integer tensors of the same shape (any), label may hold ignore_index."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        valid = label != self.ignore_index
        p, l = pred[valid].long(), label[valid].long()
        k = self.num_classes
        self.areas[0] += torch.bincount(l[p == l], minlength=k)[:k].to(self.areas)
        self.areas[1] += torch.bincount(p, minlength=k)[:k].to(self.areas)
        self.areas[2] += torch.bincount(l, minlength=k)[:k].to(self.areas)

    def reduce(self):
        """Sums the areas over processes (call once, on every rank, before compute)."""
        all_reduce_sum(self.areas)
        return self

    def compute(self):
        inter, area_pred, area_label = self.areas.double().cpu()
        union = area_pred + area_label - inter
        iou = inter / union  # 0/0 -> nan for classes absent from both
        acc = inter / area_label
        return {
            "aAcc": (inter.sum() / area_label.sum()).item() * 100,
            "mIoU": torch.nanmean(iou).item() * 100,
            "mAcc": torch.nanmean(acc).item() * 100,
            "IoU": (iou * 100).tolist(),
            "Acc": (acc * 100).tolist(),
        }
