"""bench.gpu_util: the `nvidia-smi dmon -s u` logs bench/gpu.sh records during each step, summarized per step."""

import json

import pytest

from bench import gpu_util

# As `nvidia-smi dmon -s u -d 1` prints it on an H100 (driver 580): a header (repeated every few dozen samples),
# then one row per GPU per second. The first seconds are the step's start-up (nothing busy), then NVDEC and SMs.
H100_LOG = """\
# gpu     sm    mem    enc    dec    jpg    ofa 
# Idx      %      %      %      %      %      % 
    0      0      0      0      0      0      0 
    0      0      0      0      0      0      0 
    0     35     10      0     14      0      0 
    0     45     12      0     28      0      0 
# gpu     sm    mem    enc    dec    jpg    ofa 
# Idx      %      %      %      %      %      % 
    0     40     11      0     42      0      0 
    0     60     20      0     -      0      0 
    0     4"""  # the sampler was stopped mid-line

# An older driver (no jpg / ofa columns), two GPUs, date and time columns (`-o DT`).
TWO_GPU_LOG = """\
#Date       Time        gpu    sm   mem   enc   dec
#YYYYMMDD   HH:MM:SS    Idx     %     %     %     %
 20261201   10:00:01      0    80    30     0    10
 20261201   10:00:01      1     0     0     0     0
 20261201   10:00:02      0    90    35     0    30
 20261201   10:00:02      1     5     1     0    60
"""


def test_parse_follows_the_header_and_skips_what_does_not_fit():
    rows = gpu_util.parse_dmon(H100_LOG)
    assert list(rows) == ["0"] and len(rows["0"]) == 6
    assert rows["0"][2] == {"sm": 35.0, "mem": 10.0, "enc": 0.0, "dec": 14.0, "jpg": 0.0, "ofa": 0.0}
    assert rows["0"][5]["dec"] is None and rows["0"][5]["sm"] == 60.0
    two = gpu_util.parse_dmon(TWO_GPU_LOG)
    assert sorted(two) == ["0", "1"] and [r["dec"] for r in two["1"]] == [0.0, 60.0]
    assert set(two["0"][0]) == {"sm", "mem", "enc", "dec"}


def test_summary_means_maxima_and_active_means():
    summary = gpu_util.summarize(H100_LOG)
    gpu = summary["gpus"]["0"]
    assert (gpu["samples"], gpu["active_samples"]) == (6, 4)
    sm, dec = gpu["engines"]["sm"], gpu["engines"]["dec"]
    assert sm == {"mean": 30.0, "max": 60.0, "active_mean": 45.0}  # (35+45+40+60)/6, /4
    assert dec == {"mean": 16.8, "max": 42.0, "active_mean": 28.0}  # "-" is no sample: 84/5, 84/3
    assert "gpu 0: sm mean 30% (active 45%) max 60%, dec mean 17% (active 28%) max 42% over 6 s" in gpu_util.describe(
        "decode", summary
    )
    two = gpu_util.summarize(TWO_GPU_LOG)["gpus"]
    assert two["1"]["engines"]["dec"] == {"mean": 30.0, "max": 60.0, "active_mean": 60.0}
    assert "jpg" not in two["0"]["engines"]


@pytest.mark.parametrize("text", ["", "nvidia-smi: command not found\n", "# gpu sm mem enc dec\n"])
def test_a_log_without_samples_says_so(text):
    summary = gpu_util.summarize(text)
    assert summary["gpus"] == {} and summary["error"].startswith("no samples")
    assert "\n" not in gpu_util.describe("train", summary)


def test_cli_writes_into_the_step_json_and_the_summary_file(tmp_path, capsys):
    log = tmp_path / "pipeline_decode.dmon.log"
    log.write_text(H100_LOG)
    step_json = tmp_path / "pipeline_decode.json"
    step_json.write_text(json.dumps({"decode_sweep": [{"clips_per_s": 170.0}]}))
    summary = tmp_path / "gpu_util.json"
    summary.write_text(json.dumps({"train_saturation": {"gpus": {}}}))
    assert gpu_util.main(["summarize", str(log), "--json", str(step_json), "--summary", str(summary)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("gpu_util pipeline_decode: gpu 0: sm mean 30%")
    data = json.loads(step_json.read_text())
    assert data["decode_sweep"] == [{"clips_per_s": 170.0}] and data["gpu_utilization"]["gpus"]["0"]["samples"] == 6
    merged = json.loads(summary.read_text())
    assert sorted(merged) == ["pipeline_decode", "train_saturation"]
    # a step without a JSON of its own (or a missing log) still lands in the summary file
    assert (
        gpu_util.main(
            [
                "summarize",
                str(tmp_path / "absent.dmon.log"),
                "--json",
                str(tmp_path / "absent.json"),
                "--summary",
                str(summary),
            ]
        )
        == 0
    )
    assert json.loads(summary.read_text())["absent"]["error"] == "no samples (empty log)"
    assert not (tmp_path / "absent.json").exists()
