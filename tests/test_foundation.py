"""common/io.py and common/train.py: checkpoint safety, atomic writes, schedules, samplers."""
import os

import pytest
import torch

from common.dist import InfiniteSampler, ShardSampler
from common.io import Skipped, UserError, atomic_save, load_checkpoint, load_state_dict_checked
from common.train import warmup_cosine, warmup_poly_mmcv


class Pickled:  # an arbitrary Python object: kept as inert data, its class never used
    def __setstate__(self, state):
        raise AssertionError("the real __setstate__ ran")


def test_objects_of_other_classes_load_as_inert_placeholders(tmp_path, capsys):
    p = tmp_path / "objects.pt"
    obj = Pickled()
    obj.lr = 0.5
    torch.save({"model": {"w": torch.ones(2)}, "obj": obj}, p)
    ck = load_checkpoint(p)
    assert torch.equal(ck["model"]["w"], torch.ones(2))
    assert isinstance(ck["obj"], Skipped) and ck["obj"].cls.endswith("Pickled") and ck["obj"].state == {"lr": 0.5}
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "Pickled" in note and str(p) in note


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    p = tmp_path / "junk.pt"
    p.write_bytes(b"not a torch file at all")
    with pytest.raises(UserError, match="junk.pt"):
        load_checkpoint(p)


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    p = tmp_path / "last.pt"
    atomic_save({"x": torch.ones(2)}, p)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        atomic_save({"x": Unsaveable()}, p)
    assert torch.equal(load_checkpoint(p)["x"], torch.ones(2))  # the old file is intact
    assert os.listdir(tmp_path) == ["last.pt"]                   # no temporary left behind


def test_state_dict_report_names_every_problem(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    sd = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4), "9.weight": torch.zeros(1)}
    with pytest.raises(UserError) as e:
        load_state_dict_checked(m, sd, "ckpt.pth")
    msg = str(e.value)
    assert "ckpt.pth" in msg and "1.weight" in msg and "9.weight" in msg and "0.bias" in msg
    sd = {k: v.clone() + 1 for k, v in m.state_dict().items()}
    load_state_dict_checked(m, sd, "ok")
    assert torch.equal(m[0].weight, sd["0.weight"])


def test_warmup_poly_mmcv():
    # mmcv 1.x: warmup multiplied onto the poly of the whole run
    assert warmup_poly_mmcv(5, 100, 10) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert warmup_poly_mmcv(50, 100, 10) == pytest.approx(0.5)


def test_warmup_cosine():
    assert warmup_cosine(0, 70, 10) == 0.0
    assert warmup_cosine(10, 70, 10) == 1.0
    assert warmup_cosine(40, 70, 10) == pytest.approx(0.5)
    assert warmup_cosine(70, 70, 10) == pytest.approx(0.0, abs=1e-12)


def test_samplers_cover_and_resume():
    shards = [list(ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
    full = InfiniteSampler(5, rank=1, world_size=2, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(12)]
    resumed = iter(InfiniteSampler(5, rank=1, world_size=2, seed=3, start=7))
    assert [next(resumed) for _ in range(5)] == first[7:]
    assert len({s for _, s in first}) == 12  # every position has its own augmentation seed


def test_worker_batches_come_from_a_fork_server_and_equal_the_main_process_ones():
    """common.dist.data_loader: with workers, the processes come from a fork server (forking the training
    process in mid-run can deadlock the child, python/cpython#112275), and the batches are those of the
    main process exactly (each sample's augmentation comes from the sampler's seed, not the worker)."""
    from common.dist import DistInfo, data_loader, train_batches
    from common.seg_data import SyntheticSeg, TrainTransform
    ds = SyntheticSeg(6, 4, size=(24, 24), transform=TrainTransform(scale=(24, 24), crop=16, ratio_range=(0.5, 2.0)))
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    loaders = {w: train_batches(ds, 2, info, seed=3, workers=w) for w in (0, 2)}
    assert loaders[2]._workers and loaders[2]._workers[0]._start_method == "forkserver"
    for _ in range(4):
        a, b = next(loaders[0]), next(loaders[2])
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["label"], b["label"])
    assert data_loader(ds, 0).multiprocessing_context is None
