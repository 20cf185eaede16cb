"""Frame selection and decoding: the pipeline's frames against PyAV's decode of the same member bytes (put back in
timeline order for videos stored in stride phases), for every layout: timeline order and stride phases, IVF members
cut at key frames and MP4 members decoded from their start."""

import numpy as np
import pipeline_shards as ps
import pytest
import torch
import torch.nn.functional as F

from pipeline import build_loader
from shards import ivf

T, STRIDE = 4, 4


def official_test_indices(n: int, t: int, stride: int, clips: int) -> list[list[int]]:
    """VideoMAE's test-mode sampling (kinetics.py, mode 'test'), transcribed: every `stride`-th frame, repeated at
    the end up to t, clip c starting at int(c * (len - t) / (clips - 1))."""
    all_index = list(range(0, n, stride))
    while len(all_index) < t:
        all_index.append(all_index[-1])
    step = max(1.0 * (len(all_index) - t) / (clips - 1), 0)
    return [all_index[int(c * step) : int(c * step) + t] for c in range(clips)]


def reference_view(decoded: np.ndarray, frame_idx, box, size: int, antialias: bool) -> np.ndarray:
    """Crop `box` = (y0, x0, h, w, flipped) from PyAV frames, resize to size x size (bilinear), mirror if flipped."""
    y0, x0, h, w, flipped = [int(v) for v in box]
    crop = torch.from_numpy(decoded[np.asarray(frame_idx), y0 : y0 + h, x0 : x0 + w]).permute(0, 3, 1, 2).float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    if flipped:
        out = out.flip(-1)
    return out.permute(0, 2, 3, 1).numpy()


def nearest_index(frame: np.ndarray, decoded: np.ndarray, box, size: int, antialias: bool) -> int:
    """The index of the PyAV frame whose view (same crop, same resize) is closest to `frame`."""
    views = reference_view(decoded, np.arange(len(decoded)), box, size, antialias)
    return int(np.abs(views - frame[None].astype(np.float32)).mean(axis=(1, 2, 3)).argmin())


def official_train_indices(n: int, t: int, stride: int, start: int) -> list[int]:
    """The frames of a training clip from `start`: every `stride`-th, the last one on that grid repeated past the
    end of the video (what VideoMAE's loader does for a video shorter than t * stride)."""
    last = start + (n - 1 - start) // stride * stride
    return [min(start + stride * j, last) for j in range(t)]


# phases: videos stored as stride-phase members (shards.build --phases); container: ivf (cut) or mp4
@pytest.mark.parametrize("phases,container", [(1, "ivf"), (4, "ivf"), (2, "ivf"), (1, "mp4"), (4, "mp4")])
def test_eval_views_equal_pyav_frames_at_reported_indices(phases, container):
    shards = ps.eval_shards(phases, container)
    loader = build_loader(shards.directory, "eval", 2, num_frames=T, stride=STRIDE, input_size=48, debug_outputs=True)
    seen = set()
    for batch in loader:
        assert batch["frames"].shape[1:] == (T, 48, 48, 3)
        for row in range(batch["frames"].shape[0]):
            video = shards.by_id[int(batch["sample_id"][row])]
            decoded = ps.decode_cached(video)
            clip, crop = int(batch["clip"][row]), int(batch["crop"][row])
            idx = batch["frame_idx"][row].numpy()
            assert idx.tolist() == official_test_indices(video.num_frames, T, STRIDE, 5)[clip]
            y0, x0, h, w, flipped = batch["box"][row].tolist()
            # 48 x 80 frames, short side already 48: crops along the width at int(crop * (80 - 48) / 2)
            assert (y0, x0, h, w, flipped) == (0, crop * 16, 48, 48, 0)
            got = batch["frames"][row].numpy().astype(int)
            expected = decoded[idx, y0 : y0 + h, x0 : x0 + w].astype(int)
            assert np.abs(got - expected).max() <= 1  # YUV->RGB rounding differs by at most one level
            seen.add((video.sample_id, clip, crop))
    assert seen == {(v.sample_id, c, k) for v in shards.videos for c in range(5) for k in range(3)}


@pytest.mark.parametrize(
    "mode,phases,container",
    [
        ("pretrain", 1, "ivf"),
        ("finetune", 1, "ivf"),
        ("pretrain", 4, "ivf"),
        ("finetune", 2, "ivf"),
        ("pretrain", 4, "mp4"),
    ],
)
def test_train_views_match_pyav_crops(mode, phases, container):
    shards = ps.train_shards(phases, container)
    options = dict(rand_augment=False, erase_prob=0.0) if mode == "finetune" else {}
    loader = build_loader(
        shards.directory,
        mode,
        4,
        num_frames=T,
        stride=STRIDE,
        input_size=48,
        num_repeats=2,
        debug_outputs=True,
        seed=3,
        **options,
    )
    antialias = loader.cfg.antialias
    checked = 0
    for batch in loader:
        for row in range(0, batch["frames"].shape[0], 3):  # a subset of rows keeps the test fast
            video = shards.by_id[int(batch["sample_id"][row])]
            decoded = ps.decode_cached(video)
            idx, box = batch["frame_idx"][row].numpy(), batch["box"][row].numpy()
            got = batch["frames"][row].numpy()
            expected = reference_view(decoded, idx, box, 48, antialias)
            assert np.abs(got - expected).mean() < 1.5, f"row {row}: view differs from the reference crop"
            for t in range(T):
                assert nearest_index(got[t], decoded, box, 48, antialias) == idx[t]
            checked += 1
    assert checked >= 4


def test_stride_bounds_and_edge_padding():
    shards = ps.train_shards()
    starts: dict[int, set] = {}
    loader = build_loader(
        shards.directory, "pretrain", 4, num_frames=T, stride=STRIDE, input_size=48, debug_outputs=True, drop_last=False
    )
    for _ in range(4):
        for batch in loader:
            for row in range(batch["frame_idx"].shape[0]):
                n = shards.by_id[int(batch["sample_id"][row])].num_frames
                idx = batch["frame_idx"][row].numpy()
                assert idx.min() >= 0 and idx.max() < n
                if n >= T * STRIDE:
                    assert 0 <= idx[0] <= n - T * STRIDE
                    assert np.all(np.diff(idx) == STRIDE)
                else:  # short video: from frame 0, the last frame on the stride grid repeats
                    last = (n - 1) // STRIDE * STRIDE
                    assert idx.tolist() == [min(STRIDE * j, last) for j in range(T)]
                starts.setdefault(n, set()).add(int(idx[0]))
    assert len(starts[63]) > 1, "random starts should vary across epochs"


@pytest.mark.parametrize("phases,container", [(1, "ivf"), (4, "ivf"), (2, "ivf"), (4, "mp4")])
def test_every_clip_decodes_its_own_frames_and_each_frame_once(phases, container):
    """Every training start of every video (clips at the very end, videos shorter than the span) and every
    video's 5 eval clips, decoded the way the training graph decodes them (member choice, key frame cut, one run
    of distinct frames, repeats after decoding): the clip equals PyAV's frames at its indices, and the decoder
    produced each distinct frame exactly once."""
    from pipeline.graph import build_probe
    from shards import format as fmt

    shards = ps.train_shards(phases, container)
    layout = fmt.Layout(phases, container)
    pipe = build_probe(layout, STRIDE, "cpu", None)
    pipe.build()
    checked = 0
    for video in shards.videos:
        decoded = ps.decode_cached(video)
        n = video.num_frames
        members = video.members
        cuts = fmt.pack_cuts([ivf.read_ivf(m) for m in members]) if layout.cuttable else None
        clips = [official_train_indices(n, T, STRIDE, start) for start in range(max(n - T * STRIDE, 0) + 1)]
        clips.append(sum(official_test_indices(n, T, STRIDE, 5), []))
        for idx in clips:
            inputs = {
                "video": [np.frombuffer(members[idx[0] % phases], dtype=np.uint8)],
                "frame_idx": [np.asarray(idx, dtype=np.int32)],
            }
            if cuts is not None:
                inputs["cuts"] = [np.frombuffer(cuts, dtype="<i4")]
            run, clip = (np.array(out[0]) for out in pipe.run(**inputs))
            assert np.abs(clip.astype(int) - decoded[idx].astype(int)).max() <= 1, (video.key, idx)
            distinct = sorted(set(idx))
            assert len(run) == len(distinct) or len(idx) > T  # train: each distinct frame decoded once
            assert np.abs(run.astype(int) - decoded[distinct[0] : distinct[-1] + 1 : STRIDE].astype(int)).max() <= 1
            checked += 1
    assert checked > 200


def test_phases_must_divide_the_stride_and_agree_across_shards():
    shards = ps.eval_shards(4)
    with pytest.raises(ValueError, match="need a stride that 4 divides, got stride=2"):
        build_loader(shards.directory, "eval", 2, num_frames=T, stride=2, input_size=48)
    with pytest.raises(ValueError, match="stores videos in 1 phase"):
        build_loader(ps.eval_shards(1).tars + shards.tars, "eval", 2, num_frames=T, stride=STRIDE, input_size=48)
    with pytest.raises(ValueError, match="of ivf, .* of mp4"):
        build_loader(
            ps.eval_shards(4).tars + ps.eval_shards(4, "mp4").tars,
            "eval",
            2,
            num_frames=T,
            stride=STRIDE,
            input_size=48,
        )


@pytest.mark.parametrize("container", ["ivf", "mp4"])
def test_an_info_that_overstates_the_frame_count_gives_no_black_frames(tmp_path, container):
    """Samples whose .info claims 40 frames more than their video holds: IVF layouts sample within the frames the
    cuts table says are stored (frame_idx honest); MP4 layouts repeat the last real frame (the decoder's edge
    padding) or skip the sample as corrupt (a clip that starts past the real end). Never frames of zeros passed off
    as data."""
    real = [20, 30, 24, 36]
    shards = ps.make_test_shards(tmp_path / "in", real, phases=4, container=container)
    lying = {0, 2}
    for i in lying:
        shards.videos[i].num_frames += 40
    shards = ps.write_shards(tmp_path / "lying", shards.videos, per_shard=2)
    loader = build_loader(
        shards.directory,
        "pretrain",
        2,
        num_frames=T,
        stride=STRIDE,
        input_size=48,
        debug_outputs=True,
        drop_last=False,
        antialias=False,
    )
    rows = 0
    for _ in range(3):
        for batch in loader:
            for row in range(batch["frames"].shape[0]):
                video = shards.by_id[int(batch["sample_id"][row])]
                n = real[video.sample_id]
                idx = batch["frame_idx"][row].numpy()
                if container == "ivf":
                    assert idx.max() < n
                got = batch["frames"][row].numpy()
                assert got.reshape(T, -1).max(axis=1).min() > 0, "a black frame"
                last_of_phase = (n - 1 - idx[0] % 4) // 4 * 4 + idx[0] % 4
                expected = reference_view(
                    ps.decode_cached(video), np.minimum(idx, last_of_phase), batch["box"][row].numpy(), 48, False
                )
                assert np.abs(got - expected).mean() < 1.5
                rows += 1
    assert rows >= 8
    if container == "ivf":
        assert loader.stats.corrupt_samples == 0
