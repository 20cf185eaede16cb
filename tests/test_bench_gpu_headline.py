"""CPU rehearsal of the GPU headline run (`bash bench/gpu.sh headline`), so that a wrong flag, a missing file or a
broken import never costs GPU minutes.

Real commands end to end, on tiny data: `bench/gpu_data.sh headline` builds the data set (3 videos of 2 s at short
side 64, both layouts), `bench/stage_gpu.sh pack` packs a small site tree and that data set into parts as it packs
DALI for the GPU machine, `bench/gpu.sh unpack` unpacks them as the GPU machine does (and refuses a damaged part),
and `bench/gpu.sh headline` runs every step's own command line on the unpacked data with the CPU backend and a tiny
model. Each step must end with rc 0 and leave its JSON with sane fields; headline.md must hold the three numbers.
"""

import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, module_env

SIDE = 64
REHEARSAL = {  # the GPU run's parameters, scaled down (bench/gpu_headline.sh)
    "DEVICE": "cpu",
    "MODEL": "tiny",
    "BATCH": "4",
    "BATCHES": "2",
    "WARMUP": "1",
    "STEPS": "4",
    "LOG_INTERVAL": "2",
    "TRAIN_WARMUP": "1",
    "INPUT": "32",
    "THREADS": "4",  # a rank's threads, split between a strategy's pipelines: 4 pipelines need 4
    "REPEAT": "4",
    "PEAK_TFLOPS": "1",
    "BUDGET": "3000",  # the GPU limits assume a GPU; on a busy 2-core machine steps take longer
    "LIMIT_SCALE": "20",
}
STEPS = ["env", "nvdec", "check", "decode_old", "decode_new1", "decode_new2", "decode_new3", "train"]


def bash(script: str, *args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc


def shell_env(**extra: str) -> dict:
    env = module_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 = this interpreter
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Tiny data set -> staged parts (with a small site tree) -> unpacked as on the GPU machine."""
    root = tmp_path_factory.mktemp("headline")
    data = root / "data"
    built = bash(
        "bench/gpu_data.sh",
        "headline",
        str(data),
        env=shell_env(HL_VIDEOS="3", HL_SIDE=str(SIDE), HL_SECONDS="2"),
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    for layout in ("timeline", "cut4"):  # the first three videos of the list, named after their sources
        keys = json.loads((data / layout / "manifest.json").read_text())["keys"]
        assert sorted(keys) == ["bigbuckbunny_bigbuckbunny", "bikes_bikes", "carphone_carphone"], keys
    described = json.loads((data / "dataset.json").read_text())
    assert described["layouts"]["cut4"]["videos"] == 3 and described["bytes"] > 0
    assert set(described["layouts"]) == {"timeline", "cut4"}
    # the GPU check's clips, pre-built (no ffmpeg on the GPU machine): 12 videos in 4 phases
    prebuilt = json.loads((data / "testshards" / "gpu_train_p4_ivf" / "manifest.json").read_text())
    assert prebuilt["num_samples"] == 12
    site = root / "site"
    (site / "headline_probe").mkdir(parents=True)
    (site / "headline_probe" / "__init__.py").write_text("VALUE = 'unpacked'\n")
    (site / "headline_probe" / "blob.bin").write_bytes(random.Random(0).randbytes(6000))  # incompressible
    stage = root / "stage"
    packed = bash(
        "bench/stage_gpu.sh",
        "pack",
        env=shell_env(STAGE=str(stage), SITE=str(site), DATA=str(data), PART_BYTES="2048", XZ_THREADS="1"),
        timeout=300,
    )
    assert packed.returncode == 0, packed.stdout[-2000:] + packed.stderr[-2000:]
    return root, data, stage, packed.stdout


def test_stage_parts_unpack_to_the_site_and_data_set(staged):
    root, data, stage, packed = staged
    parts = sorted(p.name for p in stage.glob("p[0-9]*"))
    assert len(parts) >= 2, packed  # PART_BYTES=2048: the xz stream is split over several calls
    last = stage / f"p{len(parts) - 1}"
    assert (last / "data.tar").is_file() and (last / "stage.txt").is_file()
    assert not list(stage.glob("p0/data.tar"))
    assert "MiB of 64" in packed  # each call's size, against the limit
    unpacked = root / "unpacked"
    proc = bash("bench/gpu.sh", "unpack", env=shell_env(STAGE=str(stage), DATA=str(unpacked)), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = stage / "unpacked" / "headline_probe"
    assert (probe / "__init__.py").read_text() == "VALUE = 'unpacked'\n"
    assert (probe / "blob.bin").read_bytes() == random.Random(0).randbytes(6000)
    for layout in ("timeline", "cut4"):
        original = {p.relative_to(data): p.read_bytes() for p in (data / layout).iterdir()}
        copied = {p.relative_to(unpacked): p.read_bytes() for p in (unpacked / layout).iterdir()}
        assert original == copied


def test_check_refuses_a_call_over_the_limit_less_the_margin(tmp_path):
    """`stage_gpu.sh check`: part + tree <= 64 - 2 MiB passes, one byte more fails loudly, naming the call. The tree
    is a small git checkout of known size (TREE), the parts sparse files of exact sizes."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file.bin").write_bytes(b"x" * 100_000)
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    stage = tmp_path / "stage"
    for index in (0, 1):
        (stage / f"p{index}").mkdir(parents=True)
    folder = int(subprocess.run(["du", "-sb", str(stage / "p0")], capture_output=True, text=True).stdout.split()[0])
    allowed = (64 - 2) * 1024 * 1024 - 100_000 - folder  # du -sb counts the part's folder too
    for index, size in ((0, allowed), (1, allowed - 1)):
        subprocess.run(["truncate", "-s", str(size), str(stage / f"p{index}" / f"site.txz.0{index}")], check=True)
    env = shell_env(STAGE=str(stage), TREE=str(tree))
    fits = bash("bench/stage_gpu.sh", "check", env=env, timeout=60)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert fits.stdout.count("MiB of 64 (at most 62: a 2 MiB margin)") == 2
    subprocess.run(["truncate", "-s", str(allowed + 1), str(stage / "p1" / "site.txz.01")], check=True)
    over = bash("bench/stage_gpu.sh", "check", env=env, timeout=60)
    assert over.returncode == 1
    assert f"stage_gpu: CALL TOO LARGE: {stage}/p1: {64 * 1024 * 1024 - 2 * 1024 * 1024 + 1} bytes" in over.stderr
    assert "p0:" not in over.stderr


def test_a_damaged_part_is_named_before_anything_is_unpacked(staged, tmp_path):
    _, _, stage, _ = staged
    copy = tmp_path / "stage"
    subprocess.run(["cp", "-r", str(stage), str(copy)], check=True)
    subprocess.run(["rm", "-rf", str(copy / "unpacked")], check=True)
    piece = next(copy.glob("p1/site.txz.*"))
    piece.write_bytes(piece.read_bytes()[:-1] + b"\0")
    proc = bash("bench/gpu.sh", "unpack", env=shell_env(STAGE=str(copy), DATA=str(tmp_path / "d")), timeout=120)
    assert proc.returncode == 2
    assert f"p1/{piece.name}: FAILED" in proc.stdout
    assert not (copy / "unpacked").exists()


@pytest.mark.timeout(1800)  # ~90 s alone on 2 cores; much longer when other work shares them
def test_headline_rehearsal_runs_every_step(staged, tmp_path):
    root, _, _, _ = staged
    unpacked = root / "unpacked"
    if not (unpacked / "cut4").is_dir():  # the unpack test did not run first (-k)
        proc = bash("bench/gpu.sh", "unpack", env=shell_env(STAGE=str(staged[2]), DATA=str(unpacked)), timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    out, pack = tmp_path / "out", tmp_path / "pack"
    env = shell_env(**REHEARSAL, DATA=str(unpacked), PACK_TO=str(pack), STAGE=str(tmp_path / "no-stage"))
    proc = bash("bench/gpu.sh", "headline", str(out), env=env, timeout=1700)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-6000:]
    assert "headline: the GPU check reads its test clips pre-built in" in console
    for name in STEPS:  # in the order, each with its own command line and rc 0
        assert f"=== {name} (limit" in console and f"--- {name}: rc=0" in console, name
    order = [console.index(f"=== {name} (limit") for name in STEPS]
    assert order == sorted(order)

    env_facts = json.loads((out / "env.json").read_text())
    assert env_facts["cpus"] >= 1 and env_facts["torch"] and env_facts["nvdec"]

    nvdec = json.loads((out / "nvdec.json").read_text())
    assert nvdec["device"] == "cpu" and nvdec["nvdec"] is False
    for layout, clip in nvdec["clips"].items():
        frames, height, width, channels = clip["cpu_frames"]
        assert frames > 0 and height == SIDE and width > SIDE and channels == 3, layout
    assert nvdec["clips"]["cut4"]["cpu_frames"][0] < nvdec["clips"]["timeline"]["cpu_frames"][0]  # a phase member

    check = json.loads((out / "check.json").read_text())
    assert check["rc"] == 0 and check["selected"] == 1 and check["failed"] == 0
    assert check["tests"][0]["test"].endswith(
        "test_gpu_backend_reads_stride_phase_shards_like_the_cpu_backend[nvdec-ivf]"
    )
    assert check["skipped"] == 1  # no CUDA here: the GPU check itself runs only on the GPU machine

    runs = {}
    for name in STEPS[3:7]:
        (run,) = json.loads((out / f"{name}.json").read_text())["decode_sweep"]
        assert run["decoded_clips_per_s"] > 0 and run["repeats"] == 2, name
        runs[name] = run
    assert runs["decode_old"]["layout"] == "timeline" and runs["decode_old"]["spec"] == "1:0"
    assert [runs[f"decode_new{i}"]["spec"] for i in (1, 2, 3)] == ["1:0:4:4", "2:1:4:2", "auto"]
    assert all(runs[f"decode_new{i}"]["layout"] == "cut4" for i in (1, 2, 3))
    assert runs["decode_new1"]["pipelines"] == 4 and runs["decode_new2"]["cpu_decoder_groups"] == 1
    # the 4 threads of every run split between its pipelines, as DALI built them
    assert runs["decode_new1"]["pipeline_threads"] == [1] * 4 and runs["decode_new2"]["pipeline_threads"] == [2, 2]
    assert runs["decode_old"]["pipeline_threads"] == [4]
    assert runs["decode_new3"]["decode_table"]  # decode=auto timed its candidates

    decode = json.loads((out / "decode_summary.json").read_text())
    best = max((runs[f"decode_new{i}"] for i in (1, 2, 3)), key=lambda r: r["decoded_clips_per_s"])
    assert decode["best"]["decoded_clips_per_s"] == best["decoded_clips_per_s"]
    assert decode["gain"] == round(best["decoded_clips_per_s"] / runs["decode_old"]["decoded_clips_per_s"], 2)

    train = json.loads((out / "train.json").read_text())
    assert train["config"] == "configs/pretrain_vitb_k400.yaml"
    assert f"data.options.pipelines={decode['best']['pipelines']}" in train["overrides"]
    assert any(o.startswith("data.train=") and "/cut4/" in o for o in train["overrides"])
    for side in ("real", "in_memory"):
        (result,) = train[side]
        assert result["clips_per_s"] > 0 and 0 <= result["data_wait"] <= 1 and result["mfu"] > 0, side
    assert train["ratio"] == pytest.approx(train["real"][0]["clips_per_s"] / train["in_memory"][0]["clips_per_s"])

    headline = json.loads((out / "headline.json").read_text())
    assert headline["decoded_clips_per_s"] == best["decoded_clips_per_s"]
    assert headline["saturation"] == train["ratio"] and headline["mfu"] == train["real"][0]["mfu"]
    text = (out / "headline.md").read_text()
    assert "not measured" not in text
    for line in ("1. Decoded clips/s per GPU, K = 2: ", "2. End-to-end saturation", "3. MFU: "):
        assert line in text

    # what a device call brings back: at most 8 files, the step files inside headline.tgz
    assert sorted(p.name for p in pack.iterdir()) == ["headline.json", "headline.md", "headline.tgz"]
    with tarfile.open(pack / "headline.tgz") as tgz:
        names = {Path(n).name for n in tgz.getnames()}
    assert {f"{name}.log" for name in STEPS} <= names and "train.json" in names
