"""bench.headline's summaries: a run cut short still gives a headline with what it measured, the loader's fallback
is found wherever it is logged, and step 4 trains with the strategy step 3 actually ran (decode=auto: its choice)."""

import json

from bench import headline

FALLBACK = (
    "pipeline: NVDEC does not read IVF members cut at a key frame (frames differ); handing them to it whole "
    "(each clip decoded from its member's start)"
)


def sweep_json(path, layout, spec, decoded, threads, pipelines, groups, cpu_groups, auto=False, sm=None):
    """A decode step's JSON as bench.bench_pipeline writes it (one --decode-sweep entry: `threads` of all its
    pipelines together, each built with threads // pipelines), with bench.gpu_util's entry when `sm` is given."""
    run = {
        "loader": "dali",
        "layout": layout,
        "repeats": 2,
        "threads": threads,
        "pipeline_threads": [threads // pipelines] * pipelines,
        "decoded_clips_per_s": decoded,
        "clips_per_s": 2 * decoded,
        "decoder_groups": groups,
        "cpu_decoder_groups": cpu_groups,
        "pipelines": pipelines,
        "spec": spec,
    }
    if auto:
        run["decode"] = "auto"
        run["decode_table"] = [{"pipelines": pipelines, "decoder_groups": groups, "cpu_decoder_groups": cpu_groups}]
    data = {"benchmark": "bench.bench_pipeline", "decode_sweep": [run]}
    if sm is not None:
        engines = {
            "sm": {"mean": sm, "active_mean": sm + 5, "max": 99.0},
            "dec": {"mean": 14.0, "active_mean": 20.0, "max": 30.0},
        }
        data["gpu_utilization"] = {"gpus": {"0": {"samples": 9, "active_samples": 8, "engines": engines}}}
    path.write_text(json.dumps(data))


def test_a_run_cut_short_after_decoding_reports_what_it_measured(tmp_path):
    (tmp_path / "nvdec.json").write_text(json.dumps({"device": "gpu", "nvdec": True}))
    sweep_json(tmp_path / "decode_old.json", "timeline", "1:0", 80.0, 16, 1, 1, 0, sm=40.0)
    sweep_json(tmp_path / "decode_new1.json", "cut4", "1:0:4:4", 300.0, 4, 4, 1, 0, sm=70.0)
    sweep_json(tmp_path / "decode_new2.json", "cut4", "2:1:8:2", 250.0, 8, 2, 2, 1)
    sweep_json(tmp_path / "decode_new3.json", "cut4", "auto", 420.0, 16, 2, 2, 1, auto=True)
    (tmp_path / "decode_new3.log").write_text(f"bench_pipeline: ...\nWARNING {FALLBACK}\n")
    summary = headline.decode_summary(tmp_path)
    assert [r["step"] for r in summary["runs"]] == ["decode_new1", "decode_new2", "decode_new3", "decode_old"]
    assert summary["best"]["step"] == "decode_new3" and summary["gain"] == round(420 / 80, 2)
    assert summary["runs"][0]["sm_util"] == {"mean": 70.0, "active_mean": 75.0, "max": 99.0}
    assert summary["best"]["fallback"] == [FALLBACK]
    # decode=auto: step 4 trains with what it chose, not with another round of timing
    assert headline.best_overrides(summary) == [
        "data.num_threads=16",
        "data.options.pipelines=2",
        "data.options.decoder_groups=2",
        "data.options.cpu_decoder_groups=1",
    ]
    (tmp_path / "decode_summary.json").write_text(json.dumps(summary))
    result = headline.headline(tmp_path)
    assert result["decoded_clips_per_s"] == 420.0 and "saturation" not in result
    text = headline.headline_text(result)
    assert "1. Decoded clips/s per GPU, K = 2: 420.0 (cut4, decode=auto chose 2 pipeline(s) x 8 threads" in text
    assert "old configuration 80.0" in text and ": 5.25x" in text
    assert "2. End-to-end saturation: not measured" in text and "3. MFU: not measured" in text
    assert "Machine: not recorded" in text and f"auto: loader fallback: {FALLBACK}" in text


def test_nothing_measured_yet_says_so(tmp_path):
    text = headline.headline_text(headline.headline(tmp_path))
    assert text.count("not measured") == 3 and headline.best_overrides(headline.decode_summary(tmp_path)) == []


def test_check_summary_reads_outcomes_and_the_loaders_fallback(tmp_path):
    junit = tmp_path / "check.xml"
    junit.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="1" failures="1">'
        '<testcase classname="tests.test_pipeline_gpu" '
        'name="test_gpu_backend_reads_stride_phase_shards_like_the_cpu_backend[nvdec-ivf]">'
        '<failure message="AssertionError: NVDEC did not read cut IVF members">trace</failure></testcase>'
        "</testsuite></testsuites>"
    )
    log = tmp_path / "check.log"
    log.write_text(
        f"WARNING  pipeline:loader.py:645 {FALLBACK}\nE  AssertionError: NVDEC did not read cut IVF members\n"
    )
    summary = headline.check_summary(junit, log, rc=1)
    assert (summary["selected"], summary["passed"], summary["failed"], summary["skipped"]) == (1, 0, 1, 0)
    assert summary["tests"][0]["detail"] == ["AssertionError: NVDEC did not read cut IVF members"]
    assert summary["fallback"] == sorted([FALLBACK, "NVDEC did not read cut IVF members"])
    assert headline.check_summary(tmp_path / "absent.xml", tmp_path / "absent.log")["selected"] == 0
