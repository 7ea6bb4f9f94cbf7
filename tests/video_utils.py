"""Test helpers for vpetl_video.py: the synthetic motion videos written in the official layout (mp4 files
encoded with PyAV, or folders of img_00001.jpg frames, listed in train.csv / test.csv / val.csv as
`path,label` lines without header), plus deliberately bad entries."""
import os

import av
import numpy as np
from PIL import Image

from vpetl_video import synthetic_video


def write_mp4(path, frames, fps=8):
    """uint8 (T, H, W, 3) -> an MPEG-4 part 2 file (H and W even). High quality so decoding stays close."""
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frames(folder, frames):
    os.makedirs(folder, exist_ok=True)
    for t, f in enumerate(frames):
        Image.fromarray(f).save(os.path.join(folder, f"img_{t + 1:05d}.jpg"), quality=95)


def write_dataset(root, counts=(8, 6, 6), frames=20, size=40, folders_every=0, relative=False):
    """Writes root/videos/<split>_<i>.mp4 (or a frame folder for every `folders_every`-th video) and the
    three csv files. counts = (train, validation [test.csv], final test [val.csv]). Returns {csv: lines}."""
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    written = {}
    for split, csv, n in (("train", "train.csv", counts[0]), ("val", "test.csv", counts[1]),
                          ("test", "val.csv", counts[2])):
        lines = []
        for i in range(n):
            label = i % 4
            video = synthetic_video(1000 * ("train", "val", "test").index(split) + i + 7, label, frames, size)
            name = f"videos/{split}_{i}"
            if folders_every and i % folders_every == folders_every - 1:
                write_frames(os.path.join(root, name), video)
            else:
                name += ".mp4"
                write_mp4(os.path.join(root, name), video)
            lines.append(f"{name if relative else os.path.join(root, name)},{label}")
        with open(os.path.join(root, csv), "w") as f:
            f.write("\n".join(lines) + "\n")
        written[csv] = lines
    return written


def add_bad_entries(root, csv="train.csv"):
    """Appends a <1 KB file and a 2 KB file that is not a video to `csv`; returns their paths."""
    tiny, junk = os.path.join(root, "videos", "tiny.mp4"), os.path.join(root, "videos", "junk.mp4")
    with open(tiny, "wb") as f:
        f.write(b"\0" * 100)
    with open(junk, "wb") as f:
        f.write(os.urandom(2048))
    with open(os.path.join(root, csv), "a") as f:
        f.write(f"{tiny},1\n{junk},2\n")
    return tiny, junk
