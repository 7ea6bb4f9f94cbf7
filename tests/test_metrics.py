import json
import math
import os
import subprocess
import sys

import torch

from common.metrics import SegMetric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metrics_against_hand_computation():
    # 3 classes; label 255 ignored
    label = torch.tensor([[0, 0, 1, 1],
                          [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 0]])
    m = SegMetric(3)
    m.update(pred, label)
    r = m.compute()
    # valid pixels: 7. class 0: label 2, pred 3 (0,0),(0,1)?no -> pred==0 at (0,0),(1,1),(1,3) = 3, inter 1 -> IoU 1/4
    # class 1: label 3 ((0,2),(0,3),(1,3)), pred 3 ((0,1),(0,2),(0,3)), inter 2 -> IoU 2/4
    # class 2: label 2 ((1,0),(1,1)), pred 1 ((1,0)); (1,2) predicted 2 but ignored; inter 1 -> IoU 1/2
    assert r["IoU"] == [25.0, 50.0, 50.0]
    assert r["Acc"] == [50.0, 2 / 3 * 100, 50.0]
    assert math.isclose(r["mIoU"], (25 + 50 + 50) / 3)
    assert math.isclose(r["aAcc"], 4 / 7 * 100)
    assert math.isclose(r["mAcc"], (50 + 200 / 3 + 50) / 3)


def test_absent_class_is_skipped_and_false_positive_counts():
    m = SegMetric(4)
    m.update(torch.tensor([0, 0, 1, 3]), torch.tensor([0, 0, 1, 1]))
    r = m.compute()
    assert math.isnan(r["IoU"][2]) and math.isnan(r["Acc"][2])   # absent everywhere: skipped
    assert r["IoU"][3] == 0.0 and math.isnan(r["Acc"][3])        # predicted, never labelled: IoU 0
    assert math.isclose(r["mIoU"], (100 + 50 + 0) / 3)


def test_two_processes_give_exactly_the_single_process_figures(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    worker = os.path.join(ROOT, "tests", "dist_eval_worker.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, worker, str(one)], check=True, env=env, timeout=120)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    worker, str(two)], check=True, env=env, timeout=180)
    a, b = json.load(open(one)), json.load(open(two))
    assert a["world"] == 1 and b["world"] == 2
    assert a["seen"] == [1] * 7 and b["seen"] == [1] * 7   # no sample counted twice, none dropped
    assert a["metrics"] == b["metrics"]                     # exactly, not approximately
    assert 0 < a["metrics"]["mIoU"] < 100
