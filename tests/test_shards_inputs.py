"""The three input layouts, the class list, keys, and the planned order (no transcoding here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.build import plan_order
from shards.inputs import (InputError, VideoInput, collect_inputs, read_class_folders, read_classes_file,
                           read_kinetics_csv, read_list_file, resolve_labels, sanitize_key)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


KINETICS_CSV = """label,youtube_id,time_start,time_end,split,is_cc
abseiling,--07WQ2iBlw,1,11,train,0
air drumming,-VtLx-mcPds,14,24,train,0
abseiling,0BWL4brZZ3E,30,40,val,0
zumba,ZZZZZZZZZZZ,5,15,train,0
"""


def test_kinetics_csv_flat_and_per_label_layouts(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(KINETICS_CSV)
    flat = tmp_path / "flat"
    touch(flat / "--07WQ2iBlw_000001_000011.mp4")
    touch(flat / "-VtLx-mcPds_000014_000024.mkv")  # other containers are found too
    per_label = tmp_path / "per_label"
    touch(per_label / "abseiling" / "--07WQ2iBlw_000001_000011.mp4")
    touch(per_label / "air drumming" / "-VtLx-mcPds_000014_000024.mp4")

    for root in (flat, per_label):
        videos = read_kinetics_csv(csv_path, root, "train")
        assert [v.key for v in videos] == ["--07WQ2iBlw_000001_000011", "-VtLx-mcPds_000014_000024",
                                           "ZZZZZZZZZZZ_000005_000015"]
        assert [v.label_name for v in videos] == ["abseiling", "air drumming", "zumba"]
        assert Path(videos[0].source).is_file() and Path(videos[1].source).is_file()
        # A missing video keeps the path it should have had: the build reports it as "file not found".
        assert videos[2].source == str(root / "ZZZZZZZZZZZ_000005_000015.mp4")
        assert not Path(videos[2].source).exists()


def test_kinetics_split_column_selects_rows(tmp_path):
    csv_path = tmp_path / "k.csv"
    csv_path.write_text(KINETICS_CSV.replace(",val,", ",validate,"))
    assert [v.label_name for v in read_kinetics_csv(csv_path, tmp_path, "val")] == ["abseiling"]  # alias
    assert len(read_kinetics_csv(csv_path, tmp_path, "val", all_rows=True)) == 4
    with pytest.raises(InputError, match="no rows with split 'test'"):
        read_kinetics_csv(csv_path, tmp_path, "test")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.mp4,1\n")
    with pytest.raises(InputError, match="not a Kinetics annotation CSV"):
        read_kinetics_csv(bad, tmp_path, "train")


def test_kinetics_unlabelled_rows_get_label_minus_one(tmp_path):
    csv_path = tmp_path / "test.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split\n,abcdefghijk,0,10,test\n")
    inputs = resolve_labels(read_kinetics_csv(csv_path, tmp_path, "test"), ["a", "b"])
    assert inputs.videos[0].label_name is None and inputs.label_index(None) == -1


def test_list_file_integer_and_name_labels(tmp_path):
    touch(tmp_path / "videos" / "a" / "x.mp4")
    lst = tmp_path / "train.list"
    lst.write_text("a/x.mp4 2\nb/y.avi 0\n\n# comment\nc/z.mp4 1\n")
    videos = read_list_file(lst, tmp_path / "videos")
    assert [v.source for v in videos] == [str(tmp_path / "videos" / p) for p in ("a/x.mp4", "b/y.avi", "c/z.mp4")]
    inputs = resolve_labels(videos, None)
    assert inputs.classes == ["0", "1", "2"]  # integer labels keep their indices
    assert [inputs.label_index(v.label_name) for v in inputs.videos] == [2, 0, 1]
    # With --classes, integer labels index into the given names.
    inputs = resolve_labels(videos, ["run", "jump", "swim"])
    assert [v.label_name for v in inputs.videos] == ["swim", "run", "jump"]

    names = tmp_path / "names.list"
    names.write_text("with space/v 1.mp4\tair drumming\nq.mp4 abseiling\n")  # tab: spaces inside are kept
    inputs = resolve_labels(read_list_file(names), None)
    assert inputs.classes == ["abseiling", "air drumming"]
    assert inputs.videos[0].source == str(tmp_path / "with space/v 1.mp4")
    assert "." not in inputs.videos[0].key and "/" not in inputs.videos[0].key

    broken = tmp_path / "broken.list"
    broken.write_text("just_a_path.mp4\n")
    with pytest.raises(InputError, match=r"broken.list:1: expected 'path LABEL'"):
        read_list_file(broken)


def test_class_folders(tmp_path):
    touch(tmp_path / "swim" / "b.mp4")
    touch(tmp_path / "run" / "sub" / "a.webm")
    touch(tmp_path / "run" / "notes.txt")  # not a video
    touch(tmp_path / "swim" / "a.mp4")
    videos = read_class_folders(tmp_path)
    assert [(v.key, v.label_name) for v in videos] == [("run_sub_a", "run"), ("swim_a", "swim"), ("swim_b", "swim")]


def test_classes_file_forms_and_rejected_labels(tmp_path):
    (tmp_path / "c.txt").write_text("zebra\napple\n\n")
    (tmp_path / "c.json").write_text(json.dumps(["zebra", "apple"]))
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": ["zebra", "apple"], "format": "x"}))
    for name in ("c.txt", "c.json", "manifest.json"):
        assert read_classes_file(tmp_path / name) == ["zebra", "apple"]  # order kept: index = position
    (tmp_path / "dup.txt").write_text("a\na\n")
    with pytest.raises(InputError, match="duplicate"):
        read_classes_file(tmp_path / "dup.txt")

    videos = [VideoInput("k1", "s1", "apple"), VideoInput("k2", "s2", "pear")]
    inputs = resolve_labels(videos, ["zebra", "apple"])
    assert [v.key for v in inputs.videos] == ["k1"] and inputs.label_index("apple") == 1
    assert inputs.rejected == [{"source": "s2", "reason": "label 'pear' is not in the class list"}]


def test_keys_are_safe_and_unique():
    assert sanitize_key("a/b.c d") == "a_b_c_d"
    long_key = sanitize_key("x" * 300)
    assert len(long_key) <= 80 and "." not in long_key
    videos = [VideoInput("same", f"s{i}", "a") for i in range(3)] + [VideoInput("same-2", "t", "a")]
    keys = [v.key for v in resolve_labels(videos, None).videos]
    assert len(set(keys)) == 4 and keys[0] == "same"


def test_plan_order_is_seeded_and_ignores_listing_order():
    videos = [VideoInput(f"k{i:02d}", f"s{i}", "a") for i in range(20)]
    a = plan_order(videos, seed=1)
    assert [v.key for v in a] == [v.key for v in plan_order(list(reversed(videos)), seed=1)]
    assert [v.key for v in a] != [v.key for v in plan_order(videos, seed=2)]
    assert sorted(v.key for v in a) == [v.key for v in videos]


def test_collect_inputs_needs_exactly_one_layout(tmp_path):
    with pytest.raises(InputError, match="exactly one"):
        collect_inputs()
    with pytest.raises(InputError, match="--csv needs --root"):
        collect_inputs(csv_path=str(tmp_path / "x.csv"))
