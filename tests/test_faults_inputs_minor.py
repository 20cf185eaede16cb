"""The minor input defects of issue 24 (item 12): transport streams in class folders, a CSV with a byte-order mark,
a bad --classes JSON and a non-UTF-8 list named in their errors. The readers of `shards.inputs`, on real files.
"""

from __future__ import annotations

import pytest

from shards.inputs import InputError, collect_inputs, read_classes_file, read_list_file


def test_class_folders_include_transport_streams(tmp_path):
    for name in ("a.ts", "b.mp4", "c.m2ts", "notes.txt"):
        (tmp_path / "walk" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "walk" / name).write_bytes(b"\0" * 188)
    videos = collect_inputs(folders=str(tmp_path)).videos
    assert sorted(v.source.rsplit("/", 1)[1] for v in videos) == ["a.ts", "b.mp4", "c.m2ts"]


def test_a_csv_with_a_byte_order_mark_is_read_as_without(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "abc_000001_000011.mp4").write_bytes(b"\0" * 10)
    text = "label,youtube_id,time_start,time_end,split\nwalk,abc,1,11,train\n"
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_text(text)
    marked.write_bytes("\ufeff".encode() + text.encode())
    read = lambda path: collect_inputs(csv_path=str(path), root=str(tmp_path / "v"), split="train").videos
    assert read(marked) == read(plain) and len(read(plain)) == 1


def test_a_bad_classes_json_names_the_file(tmp_path):
    bad = tmp_path / "classes.json"
    bad.write_text('["walk", "run",')
    with pytest.raises(InputError, match=rf"^{bad}: not JSON \("):
        read_classes_file(bad)
    latin = tmp_path / "classes.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"^{latin}: not UTF-8 text"):
        read_classes_file(latin)


def test_a_non_utf8_list_names_the_file(tmp_path):
    listing = tmp_path / "train.list"
    listing.write_bytes("caf\xe9.mp4 walk\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"^{listing}: not UTF-8 text \(invalid continuation byte at byte 3\)"):
        read_list_file(listing)
    good = tmp_path / "good.list"
    good.write_bytes("\ufeffa.mp4 walk\r\nb.mp4\t2\n".encode())
    assert [(v.key, v.label_name) for v in read_list_file(good)] == [("a", "walk"), ("b", "2")]
