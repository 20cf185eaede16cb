"""`python -m pipeline.preview`: the grid and the dump, whose indices and boxes come from the graph."""

import numpy as np
import pipeline_shards as ps
import pytest

from pipeline import preview


@pytest.mark.parametrize("mode", ["pretrain", "eval"])
def test_preview_writes_grid_and_dump(tmp_path, mode):
    shards = ps.train_shards() if mode == "pretrain" else ps.eval_shards()
    png, npz = tmp_path / "preview.png", tmp_path / "clips.npz"
    args = [
        "--shards",
        shards.directory,
        "--mode",
        mode,
        "--out",
        str(png),
        "--dump",
        str(npz),
        "--batch-size",
        "2",
        "--num-frames",
        "4",
        "--input-size",
        "48",
        "--eval-clips",
        "2",
    ]
    assert preview.main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    dump = np.load(npz)
    views = 2 * (2 if mode == "pretrain" else 2 * 3)
    assert dump["frames"].shape == (views, 4, 48, 48, 3) and dump["frames"].dtype == np.uint8
    assert dump["frame_idx"].shape == (views, 4) and dump["boxes"].shape == (views, 5)
    assert ("mask" in dump.files) == (mode == "pretrain")
    for v in range(views):
        video = shards.by_id[int(dump["sample_id"][v])]
        assert dump["keys"][v] == video.key and dump["sources"][v].endswith(f"{video.key}.ivf")
        decoded = ps.decode_cached(video)
        y0, x0, h, w, flipped = dump["boxes"][v]
        crop = decoded[dump["frame_idx"][v], y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        if mode == "eval":  # no resampling: the dump is the decoded crop
            assert np.abs(dump["frames"][v] - crop).max() <= 1
        else:  # the frame levels identify the frames: compare mean brightness per frame
            assert np.abs(dump["frames"][v].mean(axis=(1, 2, 3)) - crop.mean(axis=(1, 2, 3))).max() < 3


def test_preview_reports_bad_input_in_one_line(tmp_path, capsys):
    assert preview.main(["--shards", str(tmp_path / "missing-{000..001}.tar"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preview:") and "\n" not in err
