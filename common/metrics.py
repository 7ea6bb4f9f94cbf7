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


# SYNTHIA -> Cityscapes reports the 19-way model's IoUs averaged over the classes SYNTHIA has:
# 16 = the 19 without terrain (9), truck (14), train (16); 13 = also without wall (3), fence (4), pole (5).
SYNTHIA16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
SYNTHIA13 = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]


def subset_miou(iou_list, classes):
    """Mean IoU (percent, like compute()) over the class indices ``classes`` of a per-class IoU list in
    percent (compute()["IoU"]); NaN classes (absent from prediction and label) are skipped. Uni-UVPT's
    eval hook takes the shortcut 19 * mIoU19 / 16 instead, which is this only when the three dropped
    classes have IoU 0 (in the labels, never predicted) and no class is NaN (the nan-mean over 19 then
    divides by fewer classes)."""
    iou = torch.tensor([float(iou_list[c]) for c in classes], dtype=torch.float64)
    return torch.nanmean(iou).item()
