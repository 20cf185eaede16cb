"""shards.format's own helpers: the one DALI index parser and writer, member names, atomic writes, JSON files."""

from __future__ import annotations

import json

import pytest

from shards import format as fmt

MEMBERS = [
    ("abc.p0.ivf", 512, 1000),
    ("abc.p1.ivf", 2048, 900),
    ("abc.cls", 3584, 1),
    ("dir/xyz.ivf", 4608, 77),
    ("dir/xyz.info", 5632, 12),
]


def test_split_member_name():
    assert fmt.split_member_name("abc.p0.ivf") == ("abc", "p0.ivf")
    assert fmt.split_member_name("some/dir/abc.info") == ("abc", "info")
    assert fmt.split_member_name("abc") == ("abc", "")


def test_write_dali_index_round_trips(tmp_path):
    path = tmp_path / "x.idx"
    fmt.write_dali_index(MEMBERS, path)
    assert path.read_text() == (
        "v1.2 2\n"
        "p0.ivf 512 1000 abc.p0.ivf p1.ivf 2048 900 abc.p1.ivf cls 3584 1 abc.cls\n"
        "ivf 4608 77 dir/xyz.ivf info 5632 12 dir/xyz.info\n"
    )
    samples = fmt.read_index(path)
    assert [[(e.name, e.offset, e.size) for e in sample] for sample in samples] == [MEMBERS[:3], MEMBERS[3:]]
    assert [e.ext for e in samples[0]] == ["p0.ivf", "p1.ivf", "cls"]
    assert fmt.index_text(samples) == path.read_text()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "text,problem",
    [
        ("v1.2 3\nivf 0 1 a.ivf\nivf 512 1 b.ivf\n", "header says 3 samples, the file lists 2"),
        ("v1.2 1\nivf 0 1 a.ivf cls 512\n", "line 2"),
        ("v1.2 1\nivf zero 1 a.ivf\n", "not an integer"),
        ("v1.2 2\nivf 0 1 a.ivf\n\n", "line 3"),
        ("v1.1 1\nivf 0 1 a.ivf\n", "is not 'v1.2 <num_samples>'"),
        ("", "is not 'v1.2 <num_samples>'"),
    ],
)
def test_read_index_refuses_a_malformed_index_in_one_line(tmp_path, text, problem):
    path = tmp_path / "bad.idx"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        fmt.read_index(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.txt"
    fmt.atomic_write(path, "first\n")
    fmt.atomic_write(path, b"second\n")
    assert path.read_text() == "second\n"

    def fails(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        fmt.atomic_write(path, fails)
    assert path.read_text() == "second\n" and not (tmp_path / "out.txt.tmp").exists()
    fmt.atomic_write(path, lambda tmp: open(tmp, "w").close())
    assert path.read_text() == ""


def test_manifest_written_atomically_and_json_objects_read_in_one_line(tmp_path):
    manifest = {"format": fmt.FORMAT_VERSION, "shards": [], "keys": [], "classes": ["a"], "num_samples": 0}
    fmt.write_manifest(tmp_path, manifest)
    assert (tmp_path / fmt.MANIFEST_NAME).read_text() == json.dumps(manifest, indent=1) + "\n"
    assert fmt.read_manifest(tmp_path) == manifest == fmt.read_json_object(tmp_path / fmt.MANIFEST_NAME)
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"list\.json: not a JSON object$"):
        fmt.read_json_object(tmp_path / "list.json")
    with pytest.raises(ValueError, match=r"broken\.json: unreadable \("):
        fmt.read_json_object(tmp_path / "broken.json")
    with pytest.raises(ValueError, match=r"missing\.json: unreadable \("):
        fmt.read_json_object(tmp_path / "missing.json")
