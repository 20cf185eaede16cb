"""Export a VideoMAE model to a Hugging Face directory that `transformers` loads with `from_pretrained(DIR)`.

    python -m model.export_hf --checkpoint runs/finetune_vitb_k400 --out export/videomae-b-k400
    python -m model.export_hf --checkpoint runs/pretrain_vitb_k400/checkpoint-00100000.pt --out export/pre

`--checkpoint` takes anything `model.load_pretrained` reads: our run directory (its latest checkpoint) or
checkpoint file, a Hugging Face directory, an official VideoMAE `.pth` (pass `--num-frames` / `--img-size` /
`--num-heads` / `--decoder-num-heads` when they differ from what its shapes imply, as for `load_pretrained`).
The output directory holds `config.json` and `model.safetensors`:

  * a classifier becomes `VideoMAEForVideoClassification`, with `id2label` / `label2id` from the checkpoint's
    class names (HF's placeholder names `LABEL_i` when it has none: HF needs id2label to know the class count);
  * a pretraining model becomes `VideoMAEForPreTraining` (encoder, encoder_to_decoder, mask token, decoder).

The weights are renamed by the key table of `model.hf_keys` that the import reads too (`ours_to_hf`): the fused
`qkv` weight is split into query / key / value, the q / v biases are written as `attention.attention.q_bias` /
`.v_bias` (the spelling `save_pretrained` of transformers 5 itself writes and the hub checkpoints use; transformers 5
renames it to `query.bias` / `value.bias` on load, transformers 4 reads it as it is). The fixed sin-cos position
tables are not stored (transformers rebuilds them, as we do). Every export is checked before it is written: the HF
state dict converted back with `hf_to_ours` must give the model's own state dict bit for bit, and `config_from_hf`
on the written config must give the model's architecture; a model the format cannot express (learnable position
embeddings, no classifier head) is refused in one line.

What transformers cannot express and is therefore approximated (logged as a warning): the eps of `fc_norm` and of
the decoder's final norm, which transformers hard-codes to torch's 1e-5 while our models default to 1e-6 (the
official value). The exported model then computes exactly what ours computes with `head_norm_eps=1e-5`; on
trained ViT features the difference is far below bf16 resolution. Training-only settings (drop path, head dropout,
init scale) and speed switches are not part of the HF config; an import of the export gets the defaults.

The directory is written into a temporary directory beside `--out`, then renamed into place, so `--out` is either
absent, the previous export (without `--overwrite`, a non-empty `--out` is refused), or the complete new one.

CLI exit status: 0 written; 1 the checkpoint is missing, unreadable or not exportable; 2 bad arguments (an
existing non-empty `--out` without `--overwrite`, `--out` naming a file, or an `--out` that is the checkpoint or
holds it, such as its run directory: replacing it would delete what is read). Errors are one `error: ...` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shards.logs import configure_logging

from .checkpoint import resolve_checkpoint_path
from .config import VideoMAEConfig
from .hf_keys import hf_to_ours, ours_to_hf
from .loading import config_from_hf, load_pretrained
from .videomae import VideoMAEClassifier, VideoMAEPretrain

log = logging.getLogger("model.export_hf")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ARCHITECTURES = {"classify": "VideoMAEForVideoClassification", "pretrain": "VideoMAEForPreTraining"}
# transformers builds fc_norm and the decoder's final norm as nn.LayerNorm(dim): torch's default eps, not configurable
HF_HEAD_NORM_EPS = 1e-5


class ExportError(ValueError):
    """A model that the transformers VideoMAE format cannot express (one line, naming the source and the reason)."""


def model_kind(model: nn.Module) -> str:
    """ "pretrain" for a VideoMAEPretrain, "classify" for a VideoMAEClassifier; ExportError otherwise."""
    if isinstance(model, VideoMAEPretrain):
        return "pretrain"
    if isinstance(model, VideoMAEClassifier):
        return "classify"
    raise ExportError(f"a {type(model).__name__} is neither a VideoMAEPretrain nor a VideoMAEClassifier")


# ----------------------------------------------------------------------------------------------------------------
# config


def _mlp_hidden(dim: int, ratio: float) -> int:
    """MLP width of a block of width `dim`: int(dim * mlp_ratio), as `layers.Block` builds it."""
    return int(dim * ratio)


def hf_config(cfg: VideoMAEConfig, kind: str, class_names: list[str] | None = None) -> dict[str, Any]:
    """The config.json dict of transformers' VideoMAE for our `cfg` (a model of `kind`).

    A classifier's config also carries our (unused) decoder sizes and norm_pix_loss, as transformers' own
    classification configs do. A pretraining encoder always ends in a LayerNorm, which transformers'
    VideoMAEModel builds only with use_mean_pooling=False, so pretraining exports say False.
    """
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": "videomae",
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "num_frames": cfg.num_frames,
        "tubelet_size": cfg.tubelet_size,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": _mlp_hidden(cfg.embed_dim, cfg.mlp_ratio),
        "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU() in our blocks
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,  # blocks (encoder and decoder) and the encoder's final norm
        "qv_bias": cfg.qkv_bias,
        "use_mean_pooling": cfg.use_mean_pooling if kind == "classify" else False,
        "decoder_hidden_size": cfg.decoder_embed_dim,
        "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_num_attention_heads": cfg.decoder_num_heads,
        "decoder_intermediate_size": _mlp_hidden(cfg.decoder_embed_dim, cfg.mlp_ratio),
        "norm_pix_loss": cfg.norm_pix_loss,
        "dtype": "float32",
    }
    if kind == "classify":
        names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(cfg.num_classes)]
        if len(names) != cfg.num_classes:
            raise ExportError(f"{len(names)} class names for {cfg.num_classes} classes")
        out["id2label"] = {str(i): name for i, name in enumerate(names)}
        # a repeated name keeps its last index (a dict cannot hold both); id2label stays complete
        out["label2id"] = {name: i for i, name in enumerate(names)}
    return out


def _architecture(cfg: VideoMAEConfig, kind: str) -> dict[str, Any]:
    """The fields that decide what a model of `kind` computes at inference (MLP widths instead of the ratio,
    the effective head-norm eps apart: it is handled by `approximations`)."""
    fields = (
        "img_size",
        "patch_size",
        "tubelet_size",
        "num_frames",
        "in_chans",
        "embed_dim",
        "depth",
        "num_heads",
        "qkv_bias",
        "norm_eps",
        "learnable_pos_emb",
    )
    arch = {f: getattr(cfg, f) for f in fields}
    arch["mlp_hidden"] = _mlp_hidden(cfg.embed_dim, cfg.mlp_ratio)
    if kind == "classify":
        arch.update(num_classes=cfg.num_classes, use_mean_pooling=cfg.use_mean_pooling)
    else:
        arch.update(
            decoder_embed_dim=cfg.decoder_embed_dim,
            decoder_depth=cfg.decoder_depth,
            decoder_num_heads=cfg.decoder_num_heads,
            norm_pix_loss=cfg.norm_pix_loss,
            decoder_mlp_hidden=_mlp_hidden(cfg.decoder_embed_dim, cfg.mlp_ratio),
        )
    return arch


def approximations(cfg: VideoMAEConfig, kind: str) -> list[str]:
    """What transformers computes differently from our model (empty when the export is exact): the eps of the
    norms transformers hard-codes (fc_norm with mean pooling; the pretraining decoder's final norm)."""
    eps = cfg.final_head_norm_eps
    if eps == HF_HEAD_NORM_EPS:
        return []
    norms = ["fc_norm"] if kind == "classify" and cfg.use_mean_pooling else []
    norms += ["decoder.norm"] if kind == "pretrain" else []
    return [f"{n} eps {eps:g} becomes {HF_HEAD_NORM_EPS:g} (transformers hard-codes torch's default)" for n in norms]


def _check_config(cfg: VideoMAEConfig, kind: str, written: dict[str, Any], source: str) -> None:
    """The written config must read back (through loading.config_from_hf) as the same architecture."""
    if cfg.learnable_pos_emb:
        raise ExportError(
            f"{source}: learnable position embeddings cannot be exported (transformers' VideoMAE "
            "has only the fixed sin-cos table)"
        )
    if kind == "classify" and cfg.num_classes <= 0:
        raise ExportError(
            f"{source}: a classifier without a head (num_classes {cfg.num_classes}) cannot be "
            "exported as VideoMAEForVideoClassification"
        )
    try:
        back = config_from_hf(written, source, kind)
    except ValueError as e:
        raise ExportError(f"{source}: the transformers config cannot express this model: {e}") from None
    want, got = _architecture(cfg, kind), _architecture(back, kind)
    diff = [f"{k} {want[k]!r} -> {got[k]!r}" for k in want if want[k] != got[k]]
    if diff:
        raise ExportError(f"{source}: the transformers config cannot express this model: {', '.join(diff)}")


# ----------------------------------------------------------------------------------------------------------------
# weights


def to_hf_state_dict(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Our state dict (of a model of `kind`) under transformers' keys (`model.hf_keys.ours_to_hf`); a key without a
    transformers counterpart raises ExportError naming it."""
    try:
        return ours_to_hf(state, kind)
    except ValueError as e:
        raise ExportError(str(e)) from None


def _check_inverse(state: dict[str, torch.Tensor], hf_state: dict[str, torch.Tensor], kind: str, source: str) -> None:
    """`hf_to_ours(hf_state)` (the import's direction) must give `state` back exactly (same keys, bit-equal
    tensors)."""
    back = hf_to_ours(hf_state, kind)
    if set(back) != set(state):
        extra, missing = sorted(set(back) - set(state)), sorted(set(state) - set(back))
        raise ExportError(f"{source}: export does not invert the HF import: extra {extra[:4]}, missing {missing[:4]}")
    bad = [k for k in state if back[k].dtype != state[k].dtype or not torch.equal(back[k], state[k])]
    if bad:
        raise ExportError(f"{source}: export does not invert the HF import for {bad[:4]}")


# ----------------------------------------------------------------------------------------------------------------
# writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_occupied_export_dir(out: Path, overwrite: bool) -> None:
    """ValueError (one line) when `out` may not be written: a file, or a non-empty directory without overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: directory exists and is not empty (pass --overwrite to replace it)")


def refuse_out_over_source(out: Path, checkpoint: str | os.PathLike) -> None:
    """ValueError (one line) when `out` is the checkpoint (file or directory) or a directory holding it, such as its
    run directory: replacing `out` would delete the data being read (and a run's other checkpoints and logs)."""
    source, target = Path(checkpoint).resolve(), out.resolve()
    if source == target or target in source.parents:
        raise ValueError(
            f"--out {out} would replace {'the checkpoint' if source == target else 'the directory holding'} "
            f"{checkpoint} that it exports; choose an --out outside it"
        )


def export_model(model: nn.Module, out: str | os.PathLike, overwrite: bool = False, source: str | None = None) -> Path:
    """Write `model` (a VideoMAEPretrain or VideoMAEClassifier, its class names from `model.class_names`) as a
    transformers VideoMAE directory `out` (config.json + model.safetensors), atomically. Returns `out`.

    Raises ExportError (a ValueError) for a model the format cannot express, ValueError for an `out` that may not
    be written (see `refuse_occupied_export_dir`). Approximations (see `approximations`) are logged as warnings.
    """
    from safetensors.torch import save_file

    out = Path(out)
    source = source or type(model).__name__
    refuse_occupied_export_dir(out, overwrite)
    kind = model_kind(model)
    cfg: VideoMAEConfig = model.cfg
    class_names = getattr(model, "class_names", None) if kind == "classify" else None
    config = hf_config(cfg, kind, class_names)
    _check_config(cfg, kind, config, source)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    non_fp32 = sorted({str(v.dtype) for v in state.values() if v.dtype != torch.float32})
    if non_fp32:
        raise ExportError(f"{source}: weights must be float32 (config.json says so), found {non_fp32}")
    hf_state = {k: v.contiguous() for k, v in to_hf_state_dict(state, kind).items()}
    _check_inverse(state, hf_state, kind, source)
    for note in approximations(cfg, kind):
        log.warning(
            "%s: %s; transformers computes what ours does with head_norm_eps=%g", source, note, HF_HEAD_NORM_EPS
        )
    if kind == "classify" and class_names is None:
        log.info(
            "%s: no class names; id2label gets transformers' placeholders LABEL_0 ... LABEL_%d",
            source,
            cfg.num_classes - 1,
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    # a temp directory beside `out` (same filesystem, so the rename below is atomic), hidden by its dot
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(hf_state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            _fsync(tmp / name)
        if out.is_dir() and any(out.iterdir()):
            # overwrite (checked above): move the old export aside first; rename cannot replace a non-empty dir
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)
        os.replace(tmp, out)  # onto a missing or empty directory: atomic
        _fsync(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def export_checkpoint(
    checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, **overrides: Any
) -> tuple[Path, nn.Module]:
    """Load `checkpoint` (anything `load_pretrained` reads; a run directory means its latest checkpoint) and
    `export_model` it to `out`. `overrides`: VideoMAEConfig fields for `load_pretrained` (geometry and head counts
    of official .pth files). Returns (out, the loaded model)."""
    refuse_out_over_source(Path(out), checkpoint)
    refuse_occupied_export_dir(Path(out), overwrite)  # before the (possibly long) load
    path = resolve_checkpoint_path(checkpoint)
    model = load_pretrained(path, **overrides)
    return export_model(model, out, overwrite=overwrite, source=str(path)), model


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m model.export_hf",
        description="Write a checkpoint as a Hugging Face transformers VideoMAE directory "
        "(config.json + model.safetensors).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="our run directory or checkpoint file, a Hugging Face directory, or an official .pth",
    )
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--num-frames", type=int, help="official .pth only: frames per clip if not 16")
    p.add_argument("--img-size", type=int, help="official .pth only: input size if not 224")
    p.add_argument("--num-heads", type=int, help="official .pth only: encoder heads if not the official count")
    p.add_argument("--decoder-num-heads", type=int, help="official .pth only: decoder heads if not official")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    out = Path(args.out)
    try:
        refuse_out_over_source(out, args.checkpoint)
        refuse_occupied_export_dir(out, args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {
        k: v
        for k, v in (
            ("num_frames", args.num_frames),
            ("img_size", args.img_size),
            ("num_heads", args.num_heads),
            ("decoder_num_heads", args.decoder_num_heads),
        )
        if v is not None
    }
    try:
        _, model = export_checkpoint(args.checkpoint, out, overwrite=args.overwrite, **overrides)
    except Exception as e:  # noqa: BLE001 - a CLI boundary: any failure to read or convert is one line
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, (OSError, ValueError)):  # unpickling / zip errors do not name the file
            text = f"{args.checkpoint}: not a readable checkpoint ({type(e).__name__}: {text})"
        print(f"error: {text}", file=sys.stderr)
        return 1
    kind = model_kind(model)
    cfg = model.cfg
    size_mb = (out / WEIGHTS_NAME).stat().st_size / 2**20
    what = (
        f"{cfg.num_classes} classes" if kind == "classify" else f"decoder {cfg.decoder_embed_dim} x {cfg.decoder_depth}"
    )
    print(
        f"export_hf: {ARCHITECTURES[kind]} (embed {cfg.embed_dim}, depth {cfg.depth}, {what}) -> {out} "
        f"({size_mb:.1f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
