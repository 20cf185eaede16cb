"""Build settings are checked before the first transcode (issue 24, item 11).

`--quality 99`, `--fps -1|nan|inf`, `--timeout nan`, `--short-side 100000`, `--shard-size-mb -1` used to transcode
every video and record each as that video's failure. Now: one line naming the option, a non-zero exit, and nothing
written into --out. Real `python -m shards.build` subprocesses over the shared synthetic videos.
"""

from __future__ import annotations

import pytest

BAD = [
    (["--quality", "99"], "--quality 99: vp9 takes 0..63"),
    (["--codec", "h264", "--quality", "60"], "--quality 60: h264 takes 0..51"),
    (["--fps", "-1"], "--fps -1.0: a frame rate in (0, 1000.0] is needed"),
    (["--fps", "nan"], "--fps nan: a frame rate"),
    (["--fps", "inf"], "--fps inf: a frame rate"),
    (["--timeout", "nan"], "--timeout nan: a finite number of seconds > 0 is needed"),
    (["--short-side", "100000"], "--short-side 100000: at most 8192 px"),
    (["--shard-size-mb", "-1"], "--shard-size-mb must be a finite number > 0, got -1.0"),
]


@pytest.mark.parametrize("extra,said", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_build_settings_are_refused_before_transcoding(synth_root, tmp_path, run_module, extra, said):
    out = tmp_path / "out"
    inputs = ["--csv", synth_root / "train.csv", "--root", synth_root, "--split", "train"]
    proc = run_module("shards.build", *inputs, "--out", out, *extra)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert said in lines[-1] and len([line for line in lines if "error:" in line]) == 1, proc.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing transcoded, nothing recorded


def test_a_video_shorter_than_its_phases_says_so(tmp_path):
    import pipeline_shards as ps

    from shards.transcode import EncodeSettings, transcode

    source = tmp_path / "three.mp4"
    source.write_bytes(ps.encode(ps.synthetic_frames(3, 64, 96, 0), codec="h264"))
    expected = {1: "too few frames: 3 < --phases 4 (each phase member needs one)", 16: "< --min-frames 16"}
    for min_frames, said in expected.items():
        result = transcode(str(source), EncodeSettings(short_side=64, phases=4, min_frames=min_frames), str(tmp_path))
        assert not result.ok and said in result.reason, result.reason
