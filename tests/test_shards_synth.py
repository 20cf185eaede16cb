"""`shards.synth`: the Kinetics layout it writes, and that its classes are motions (not looks)."""

from __future__ import annotations

import csv

import av
import numpy as np
import pytest

from shards.synth import MOTIONS, main, make_dataset, render_video

KINETICS_HEADER = ["label", "youtube_id", "time_start", "time_end", "split"]


def test_kinetics_layout(synth_root):
    classes = (synth_root / "classes.txt").read_text().splitlines()
    assert classes == sorted(m.name for m in MOTIONS[:3])
    ids = set()
    for split, per_class in (("train", 4), ("val", 2)):
        with open(synth_root / f"{split}.csv", newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == KINETICS_HEADER
            rows = list(reader)
        assert len(rows) == 3 * per_class and {r["split"] for r in rows} == {split}
        assert all(sum(r["label"] == c for r in rows) == per_class for c in classes)
        for r in rows:
            youtube_id = r["youtube_id"]
            assert len(youtube_id) == 11 and "." not in youtube_id and youtube_id not in ids
            ids.add(youtube_id)
            start, end = int(r["time_start"]), int(r["time_end"])
            path = synth_root / split / r["label"] / f"{youtube_id}_{start:06d}_{end:06d}.mp4"
            assert path.is_file()
    with av.open(str(path)) as container:  # the last one: H.264, 160x120, 64 frames at 25 fps
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert stream.codec_context.name == "h264" and float(stream.average_rate) == 25
    assert len(frames) == 64 and frames[0].shape == (120, 160, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 3  # things move


def moments(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Centroid x, y, area and long-axis orientation (radians, image axes with y down) of a boolean mask."""
    ys, xs = np.nonzero(mask)
    x, y = xs.mean(), ys.mean()
    mu20, mu02, mu11 = ((xs - x) ** 2).mean(), ((ys - y) ** 2).mean(), ((xs - x) * (ys - y)).mean()
    return x, y, float(mask.sum()), 0.5 * float(np.arctan2(2 * mu11, mu20 - mu02))


@pytest.mark.parametrize("motion", MOTIONS, ids=lambda m: m.name.replace(" ", "_"))
def test_each_class_moves_as_named(motion):
    """Find the object from pixels (the same video drawn over black) and check its motion against the name."""
    seed, size = 5, dict(num_frames=32, height=90, width=120)
    frames, _ = render_video(motion, seed, **size, black_background=True)
    masks = frames.any(axis=-1)
    (x0, y0, area0, angle0), (x1, y1, area1, _) = moments(masks[0]), moments(masks[-1])
    name = motion.name
    # (clipping at the frame's edge moves the visible centroid a little sideways, hence the ratio)
    if "right" in name:
        assert x1 - x0 > 15 and abs(y1 - y0) < 0.25 * (x1 - x0)
    elif "left" in name:
        assert x0 - x1 > 15 and abs(y1 - y0) < 0.25 * (x0 - x1)
    elif "down" in name:
        assert y1 - y0 > 10 and abs(x1 - x0) < 0.25 * (y1 - y0)
    elif "up" in name:
        assert y0 - y1 > 10 and abs(x1 - x0) < 0.25 * (y0 - y1)
    elif name == "zoom in":
        assert area1 > 2 * area0
    elif name == "zoom out":
        assert area0 > 2 * area1
    else:  # rotation: the long axis of the 1.5:1 rectangle turns; clockwise on screen = growing angle (y down)
        turn = (moments(masks[2])[3] - angle0 + np.pi / 2) % np.pi - np.pi / 2
        assert turn > 0.03 if "counter" not in name else turn < -0.03, turn
        assert abs(x1 - x0) < 2 and abs(area1 - area0) < 0.1 * area0
    # The real video is the same drawing over a textured background.
    real, _ = render_video(motion, seed, **size)
    assert np.array_equal(real[masks], frames[masks]) and not np.array_equal(real[~masks], frames[~masks])


def test_mirror_classes_share_their_single_frame_statistics():
    """For each mirror pair, the object's position, size and angle over many videos span the same ranges: a
    single frame does not reveal the class (only the change between frames does)."""
    size = dict(num_frames=16, height=60, width=80)
    for a, b in [(MOTIONS[0], MOTIONS[1]), (MOTIONS[4], MOTIONS[5])]:
        stats = {}
        for motion in (a, b):
            masks = [
                render_video(motion, seed, **size, black_background=True)[0].any(axis=-1)[t]
                for seed in range(24)
                for t in (0, 8, 15)
            ]
            stats[motion.name] = np.array([moments(m)[:3] for m in masks])
        sa, sb = stats[a.name], stats[b.name]
        spread = np.maximum(sa.std(axis=0), sb.std(axis=0))
        assert np.all(np.abs(sa.mean(axis=0) - sb.mean(axis=0)) < 0.5 * spread), (a.name, b.name)


def test_cli_and_bad_arguments(tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path / "d"),
                "--classes",
                "2",
                "--per-class",
                "1",
                "--val-per-class",
                "1",
                "--size",
                "64x48",
                "--frames",
                "20",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "d").rglob("*.mp4"))) == 4
    assert main(["--out", str(tmp_path / "e"), "--classes", "99"]) == 1
    assert "--classes must be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="even"):
        make_dataset(tmp_path / "f", 1, 1, 1, 0, width=63, height=48)
