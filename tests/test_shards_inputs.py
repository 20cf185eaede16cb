"""The three input layouts, the class list, keys, and the planned order (no transcoding here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.inputs import (
    InputError,
    VideoInput,
    collect_inputs,
    read_class_folders,
    read_classes_file,
    read_kinetics_csv,
    read_list_file,
    resolve_labels,
    sanitize_key,
)
from shards.plan import plan_order


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
        assert [v.key for v in videos] == [
            "--07WQ2iBlw_000001_000011",
            "-VtLx-mcPds_000014_000024",
            "ZZZZZZZZZZZ_000005_000015",
        ]
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


# Issue 16, item 9: nothing in an annotation list is dropped, duplicated or counted without a word.
BROKEN_CSV = """label,youtube_id,time_start,time_end,split,is_cc
abseiling,aaaaaaaaaaa,0,10,train,0
abseiling,bbbbbbbbbbb,0,10
air drumming,"ccccccccccc,0,10,train,0
bowling,ddddddddddd,0,10,train,0
bowling,eeeeeeeeeee,0,10,train,0
cooking,fffffffffff,0,10,train,0
cooking,fffffffffff,0,10,train,0
cooking,fffffffffff,0,10,train,0
dancing,ggggggggggg,0,10,train,0
zumba,ggggggggggg,0,10,train,0
juggling,hhhhhhhhhhh,x,10,train,0
"""


def _kinetics_root(tmp_path: Path, text: str) -> tuple[Path, Path]:
    csv_path = tmp_path / "k.csv"
    csv_path.write_text(text)
    root = tmp_path / "videos"
    for yid in "abcdefgh":
        touch(root / f"{yid * 11}_000000_000010.mp4")
    return csv_path, root


@pytest.mark.parametrize("all_rows", [False, True])
def test_broken_kinetics_rows_are_rejected_and_counted(tmp_path, all_rows):
    csv_path, root = _kinetics_root(tmp_path, BROKEN_CSV)
    inputs = collect_inputs(csv_path=str(csv_path), root=str(root), split="train", all_rows=all_rows)
    by_source = {r["source"]: r["reason"] for r in inputs.rejected}
    # the short row (line 3) and the unbalanced quote that swallowed lines 4-12 (bowling ... juggling)
    assert by_source[f"{csv_path}:3"] == "4 fields, the header has 6"
    assert by_source[f"{csv_path}:4"] == "unbalanced quote: lines 4-12 read as one row"
    assert [v.key for v in inputs.videos] == ["aaaaaaaaaaa_000000_000010"]
    assert inputs.classes == ["abseiling"]  # no label of a rejected row
    assert inputs.warnings == [
        f"2 unreadable rows of {csv_path} rejected (first: {csv_path}:3: 4 fields, the "
        f"header has 6); see failures.jsonl"
    ]


def test_duplicates_are_dropped_and_conflicting_labels_rejected(tmp_path):
    text = "\n".join(ln for i, ln in enumerate(BROKEN_CSV.splitlines()) if i not in (2, 3)) + "\n"
    csv_path, root = _kinetics_root(tmp_path, text)
    inputs = collect_inputs(csv_path=str(csv_path), root=str(root), split="train")
    keys = [v.key for v in inputs.videos]
    assert len(keys) == len(set(keys))  # no "-2" copies of the same video
    assert sorted(keys) == [f"{y * 11}_000000_000010" for y in "adef"]
    g_video = str(root / "ggggggggggg_000000_000010.mp4")
    conflict = f"listed with conflicting labels 'dancing' ({csv_path}:8) and 'zumba' ({csv_path}:9)"
    assert inputs.rejected == [
        {"source": f"{csv_path}:10", "reason": "bad time_start/time_end 'x', '10'"},
        {"source": g_video, "key": "ggggggggggg_000000_000010", "reason": conflict},
    ]
    assert inputs.classes == ["abseiling", "bowling", "cooking"]  # not dancing, zumba or juggling
    assert inputs.warnings == [
        f"1 unreadable rows of {csv_path} rejected (first: {csv_path}:10: bad time_start/time_end 'x', '10'); "
        f"see failures.jsonl",
        f"2 duplicate entries dropped (the same video listed again with the same label; first: {csv_path}:6 "
        f"repeats {csv_path}:5)",
        f"1 videos rejected for conflicting labels (first: {g_video} {conflict}); see failures.jsonl",
    ]


def test_list_lines_that_fail_leave_no_label_in_the_class_list(tmp_path):
    touch(tmp_path / "a.mp4")
    touch(tmp_path / "b.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    lst = tmp_path / "train.list"
    lst.write_text("a.mp4 run\nno_label_here.mp4\nmissing.mp4 zebra\nempty.mp4 yak\nb.mp4 swim\na.mp4 run\n")
    inputs = collect_inputs(list_path=str(lst))
    assert inputs.classes == ["run", "swim"]
    assert [(v.key, v.label_name) for v in inputs.videos] == [("a", "run"), ("b", "swim")]
    assert [(r["source"], r["reason"]) for r in inputs.rejected] == [
        (f"{lst}:2", "expected 'path LABEL', got 'no_label_here.mp4'"),
        (str(tmp_path / "missing.mp4"), "file not found"),
        (str(tmp_path / "empty.mp4"), "empty file (0 bytes)"),
    ]
    assert len(inputs.warnings) == 2 and inputs.warnings[1].startswith("1 duplicate entries dropped")
    # integer labels: a rejected line's index does not stretch the class list either
    lst.write_text("a.mp4 0\nmissing.mp4 7\nb.mp4 1\n")
    assert collect_inputs(list_path=str(lst)).classes == ["0", "1"]
