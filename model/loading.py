"""`load_pretrained`: a ready VideoMAE model from any checkpoint people have.

Understood formats (detected from the path's contents):
  * this project's own checkpoints: a torch.save'd dict with "format": "videomae-fast/1", "kind",
    "model_config" (VideoMAEConfig.to_dict()), "model" (state dict), "class_names" (list or None);
  * Hugging Face VideoMAE directories: config.json + model.safetensors or pytorch_model.bin, of
    VideoMAEForPreTraining or VideoMAEForVideoClassification (label names from config.json's id2label);
    older (q_bias / v_bias) and newer (query.bias / value.bias) key spellings (the key table: `model.hf_keys`);
  * official VideoMAE .pth files: the state dict under "model" or "module" (optionally "module."-prefixed),
    pretraining ones with encoder./decoder. prefixes, fine-tuned ones with fc_norm / head. Their state dicts
    carry no input geometry, so num_frames / img_size default to 16 / 224 (pass overrides otherwise), and head
    counts follow the official sizes from the embedding width (override num_heads / decoder_num_heads if not).

Loading is safe: files are read with `torch.load(weights_only=True)` (tensors and plain containers, plus the
argparse.Namespace that official checkpoints pickle beside their weights), which cannot run code. A file that needs
full unpickling (arbitrary classes or functions, i.e. possibly code) is refused with one line naming it, unless the
caller says it trusts the file: `trust_pickle=True` (`--trust-pickle` of apps.predict / apps.reconstruct,
`model.trust_pickle=true` in train.py).

Loading is strict: every weight of the model must come from the checkpoint with the right shape, and every
checkpoint weight must be used. The single exception is starting a classifier from a pretraining checkpoint
(fine-tuning): the encoder is taken, the decoder is dropped, and the classifier's fc_norm/head are newly
initialised, which is logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import load_error_reason, torch_load_refusal
from .config import VideoMAEConfig
from .hf_keys import hf_to_ours
from .layers import sinusoid_position_table
from .videomae import VideoMAEClassifier, VideoMAEPretrain

log = logging.getLogger("model.load")

KINDS = ("pretrain", "classify")

# official head counts by width (modeling_finetune.py / modeling_pretrain.py), for state dicts without a config
_HEADS_BY_DIM = {384: 6, 768: 12, 1024: 16, 1280: 16}
_DECODER_HEADS_BY_DIM = {192: 3, 384: 6, 512: 8, 640: 8}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into (names the file and the offending keys)."""


def build_model(kind: str, cfg: VideoMAEConfig) -> nn.Module:
    """A freshly initialised model: kind "pretrain" -> VideoMAEPretrain, "classify" -> VideoMAEClassifier."""
    if kind == "pretrain":
        return VideoMAEPretrain(cfg)
    if kind == "classify":
        return VideoMAEClassifier(cfg)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


# ----------------------------------------------------------------------------------------------------------------
# strict state-dict loading


def _summarize(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_state_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, allow_missing: tuple[str, ...] = ()
) -> list[str]:
    """Copy `state` into `model`, failing on any missing, unexpected or shape-mismatched key.

    Keys of the model starting with a prefix in `allow_missing` may be absent (they keep their fresh init);
    returns the list of such keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    allowed = [k for k in missing if k.startswith(allow_missing)] if allow_missing else []
    missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} (checkpoint {list(state[k].shape)} vs model {list(own[k].shape)})"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarize(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarize(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_summarize(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=not allowed)
    return allowed


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face (weights: model.hf_keys)


def config_from_hf(hf: dict[str, Any], source: str, kind: str) -> VideoMAEConfig:
    """VideoMAEConfig from an HF config.json dict of a model of `kind`."""

    def size(v: Any) -> int:
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise CheckpointError(f"{source}: non-square sizes {v} are not supported")
            return int(v[0])
        return int(v)

    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (VideoMAE uses exact GELU)")
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if float(hf.get(k, 0.0) or 0.0) != 0.0:
            log.warning("%s: %s=%s is ignored (VideoMAE trains without dropout in blocks)", source, k, hf[k])
    hidden = int(hf.get("hidden_size", 768))
    mlp_ratio = int(hf.get("intermediate_size", 3072)) / hidden
    decoder: dict[str, Any] = {}
    # Only the parts the model of `kind` has are read: HF classification configs still carry decoder_* values
    # (defaults or leftovers of the pretraining run) for a decoder the classifier does not have.
    if kind == "pretrain":
        dec_hidden = int(hf.get("decoder_hidden_size", 384))
        dec_inter = int(hf.get("decoder_intermediate_size", 1536))
        if dec_inter != int(dec_hidden * mlp_ratio):
            raise CheckpointError(
                f"{source}: decoder_intermediate_size {dec_inter} != decoder_hidden_size x mlp "
                f"ratio ({dec_hidden} x {mlp_ratio}); one MLP ratio for encoder and decoder is "
                "assumed"
            )
        decoder = dict(
            decoder_embed_dim=dec_hidden,
            decoder_depth=int(hf.get("decoder_num_hidden_layers", 4)),
            decoder_num_heads=int(hf.get("decoder_num_attention_heads", 6)),
        )
    # pretraining configs carry HF's placeholder labels (LABEL_0, LABEL_1): keep our default class count there
    id2label = (hf.get("id2label") or {}) if kind == "classify" else {}
    num_classes = len(id2label) if id2label else VideoMAEConfig.num_classes
    return VideoMAEConfig(
        img_size=size(hf.get("image_size", 224)),
        patch_size=size(hf.get("patch_size", 16)),
        tubelet_size=int(hf.get("tubelet_size", 2)),
        num_frames=int(hf.get("num_frames", 16)),
        in_chans=int(hf.get("num_channels", 3)),
        embed_dim=hidden,
        depth=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_ratio=mlp_ratio,
        qkv_bias=bool(hf.get("qv_bias", hf.get("qkv_bias", True))),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        head_norm_eps=1e-5,  # HF's fc_norm/decoder norm: torch default
        **decoder,
        norm_pix_loss=bool(hf.get("norm_pix_loss", True)),
        num_classes=num_classes,
        use_mean_pooling=bool(hf.get("use_mean_pooling", True)),
    )


def _hf_kind(hf: dict[str, Any], source: str) -> str:
    archs = hf.get("architectures") or []
    if "VideoMAEForPreTraining" in archs:
        return "pretrain"
    if "VideoMAEForVideoClassification" in archs:
        return "classify"
    raise CheckpointError(
        f"{source}: config.json architectures {archs} is neither VideoMAEForPreTraining nor "
        "VideoMAEForVideoClassification"
    )


def _drop_fixed_position_tables(state: dict[str, torch.Tensor], cfg: VideoMAEConfig, source: str) -> None:
    """HF's sin-cos tables are constants; should a file store them, they must equal ours (then they are dropped)."""
    for key, dim in (
        ("videomae.embeddings.position_embeddings", cfg.embed_dim),
        ("position_embeddings", cfg.decoder_embed_dim),
    ):
        if key in state:
            stored = state.pop(key).float()
            expected = sinusoid_position_table(cfg.num_patches, dim)
            if stored.shape != expected.shape or not torch.allclose(stored, expected, atol=1e-5):
                raise CheckpointError(
                    f"{source}: {key} {list(stored.shape)} is not the fixed sin-cos table "
                    f"{list(expected.shape)} this architecture uses"
                )


def _read_hf_dir(path: Path) -> tuple[str, VideoMAEConfig, dict[str, torch.Tensor], list[str] | None]:
    cfg_path = path / "config.json"
    hf = json.loads(cfg_path.read_text())
    if hf.get("model_type") not in (None, "videomae"):
        raise CheckpointError(f"{cfg_path}: model_type {hf.get('model_type')!r} is not videomae")
    kind = _hf_kind(hf, str(cfg_path))
    cfg = config_from_hf(hf, str(cfg_path), kind)
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(
            f"{path}: no model.safetensors or pytorch_model.bin (sharded HF checkpoints are not supported)"
        )
    _drop_fixed_position_tables(state, cfg, str(path))
    class_names = None
    if kind == "classify" and hf.get("id2label"):
        id2label = {int(k): v for k, v in hf["id2label"].items()}
        class_names = [id2label[i] for i in range(len(id2label))]
    try:
        ours = hf_to_ours(state, kind)
    except ValueError as e:  # a layer with incomplete query / key / value weights, or a key bias
        raise CheckpointError(f"{path}: {e}") from None
    return kind, cfg, ours, class_names


# ----------------------------------------------------------------------------------------------------------------
# official .pth and our own format


def _torch_load(path: Path, trust_pickle: bool = False) -> Any:
    """torch.load with weights_only=True (plus argparse.Namespace: official checkpoints pickle their run's
    arguments). Anything else a file asks to unpickle could be code, so it is refused (one line naming the file and
    the opt-in) unless `trust_pickle`; a damaged file is a one-line CheckpointError either way."""
    try:
        if trust_pickle:
            log.warning("%s: full unpickling (trust_pickle): this file can run code; it is trusted", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if trust_pickle:
            raise CheckpointError(f"{path}: not a readable checkpoint ({load_error_reason(exc)})") from exc
        raise CheckpointError(torch_load_refusal(path, exc)) from exc


def _official_kind(state: dict[str, torch.Tensor], source: str) -> str:
    if any(k.startswith(("encoder.", "decoder.")) for k in state):
        return "pretrain"
    if any(k.startswith(("blocks.", "patch_embed.")) for k in state):
        return "classify"
    raise CheckpointError(
        f"{source}: state dict has neither encoder./decoder. (pretraining) nor blocks./patch_embed. "
        f"(classification) keys; first keys: {_summarize(list(state))}"
    )


def config_from_official(state: dict[str, torch.Tensor], kind: str, source: str) -> VideoMAEConfig:
    """Infer the architecture from an official state dict's shapes (geometry defaults: 16 frames, 224 px)."""
    enc = "encoder." if kind == "pretrain" else ""
    try:
        proj = state[f"{enc}patch_embed.proj.weight"]
    except KeyError:
        raise CheckpointError(f"{source}: no {enc}patch_embed.proj.weight in the state dict") from None
    dim, in_chans, tubelet, patch, _ = proj.shape

    def depth_of(prefix: str) -> int:
        ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return max(ids) + 1 if ids else 0

    fc1 = state.get(f"{enc}blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / dim if fc1 is not None else 4.0
    fields: dict[str, Any] = dict(
        embed_dim=dim,
        in_chans=in_chans,
        tubelet_size=tubelet,
        patch_size=patch,
        depth=depth_of(f"{enc}blocks."),
        num_heads=_HEADS_BY_DIM.get(dim, max(1, dim // 64)),
        mlp_ratio=mlp_ratio,
        qkv_bias=f"{enc}blocks.0.attn.q_bias" in state,
        learnable_pos_emb=f"{enc}pos_embed" in state,
    )
    if kind == "pretrain":
        dec = state.get("decoder.blocks.0.norm1.weight")
        if dec is not None:
            fields.update(
                decoder_embed_dim=dec.shape[0],
                decoder_depth=depth_of("decoder.blocks."),
                decoder_num_heads=_DECODER_HEADS_BY_DIM.get(dec.shape[0], max(1, dec.shape[0] // 64)),
            )
    else:
        head = state.get("head.weight")
        fields.update(num_classes=head.shape[0] if head is not None else 0, use_mean_pooling="fc_norm.weight" in state)
    return VideoMAEConfig(**fields)


def _fix_official_pos_embed(state: dict[str, torch.Tensor], kind: str, cfg: VideoMAEConfig) -> None:
    # the official pretraining encoder allocates its learnable table with one extra row it never uses
    key = ("encoder." if kind == "pretrain" else "") + "pos_embed"
    if key in state and state[key].shape[1] == cfg.num_patches + 1:
        state[key] = state[key][:, : cfg.num_patches]


def _read_torch_file(
    path: Path, cfg_overrides: dict[str, Any], trust_pickle: bool = False
) -> tuple[str, VideoMAEConfig, dict[str, torch.Tensor], list[str] | None, str]:
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        kind = obj.get("kind")
        if kind not in KINDS:
            raise CheckpointError(f"{path}: kind {kind!r} is not one of {KINDS}")
        lacking = [k for k in ("model_config", "model") if not isinstance(obj.get(k), dict)]
        if lacking:
            raise CheckpointError(f"{path}: a {CHECKPOINT_FORMAT} checkpoint without {' or '.join(lacking)}")
        cfg = VideoMAEConfig.from_dict(obj["model_config"])
        state = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in obj["model"].items()}
        return kind, cfg, state, obj.get("class_names"), "videomae-fast"
    if isinstance(obj, dict) and isinstance(obj.get("format"), str):
        raise CheckpointError(f"{path}: checkpoint format {obj['format']!r} is not {CHECKPOINT_FORMAT!r}")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (got {type(obj).__name__})")
    state = None
    for key in ("model", "module"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    if state is None:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj  # a bare state dict
        else:
            raise CheckpointError(f"{path}: no 'model' or 'module' state dict; top-level keys: {_summarize(list(obj))}")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    kind = _official_kind(state, str(path))
    arch_fields = {
        k: v for k, v in cfg_overrides.items() if k in ("num_frames", "img_size", "num_heads", "decoder_num_heads")
    }
    cfg = config_from_official(state, kind, str(path)).replace(**arch_fields)
    _fix_official_pos_embed(state, kind, cfg)
    return kind, cfg, state, None, "official"


# ----------------------------------------------------------------------------------------------------------------


def _pretrain_to_classifier_state(state: dict[str, torch.Tensor], cfg: VideoMAEConfig) -> dict[str, torch.Tensor]:
    """Encoder weights of a pretraining state dict under classifier names; the decoder side is dropped."""
    out = {}
    for k, v in state.items():
        if not k.startswith("encoder."):
            continue
        k = k[len("encoder.") :]
        if k.startswith("norm.") and cfg.use_mean_pooling:
            continue  # mean pooling uses fc_norm instead of the encoder's final norm (official fine-tuning)
        out[k] = v
    return out


def load_pretrained(
    path: str | os.PathLike,
    kind: str | None = None,
    num_classes: int | None = None,
    *,
    trust_pickle: bool = False,
    **cfg_overrides: Any,
) -> nn.Module:
    """A ready model (eval mode, on the CPU) from a checkpoint at `path` (see the module docstring for formats).

    kind: "pretrain" | "classify" | None (= the checkpoint's own kind). A pretraining checkpoint loaded with
    kind="classify" starts fine-tuning: encoder weights are taken, fc_norm/head are new (logged).
    num_classes: classifier classes (for a fine-tuning start; for a classification checkpoint it must match).
    cfg_overrides: VideoMAEConfig fields to change, e.g. speed switches (fused_attn, grad_checkpointing,
    compile_blocks), drop_path_rate, or geometry for official .pth files (num_frames, img_size).
    trust_pickle: read a .pth/.pt file with full unpickling instead of the weights-only loader, for files that
    pickle more than weights. Full unpickling runs whatever code the file carries: set it only for a file from a
    source you trust. Without it such a file is refused with a CheckpointError naming the file and this flag.
    The model carries `.cfg` and `.class_names` (label names of classification checkpoints, else None).
    """
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: a directory without config.json is not a Hugging Face checkpoint")
        src_kind, cfg, state, class_names = _read_hf_dir(path)
        fmt = "huggingface"
    elif path.is_file():
        src_kind, cfg, state, class_names, fmt = _read_torch_file(path, cfg_overrides, trust_pickle)
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")

    want = kind or src_kind
    if want == "pretrain" and src_kind == "classify":
        raise CheckpointError(
            f"{path}: a classification checkpoint has no decoder; it cannot be loaded as a pretraining model"
        )
    changes = dict(cfg_overrides)
    if want == "classify" and src_kind == "pretrain":
        # fine-tuning starts with the official head (mean pooling + fc_norm) whatever the pretraining config
        # said (HF pretraining configs set use_mean_pooling=False only to keep the encoder's final norm)
        changes.setdefault("use_mean_pooling", True)
    if num_classes is not None:
        changes["num_classes"] = num_classes
    cfg = cfg.replace(**changes) if changes else cfg

    model = build_model(want, cfg)
    if want == "classify" and src_kind == "pretrain":
        state = _pretrain_to_classifier_state(state, cfg)
        fresh = load_state_strict(model, state, str(path), allow_missing=("fc_norm.", "head."))
        if isinstance(model.head, nn.Linear):
            model.reset_head()
        log.warning(
            "%s: fine-tuning start from a %s pretraining checkpoint: encoder weights loaded, decoder "
            "dropped, newly initialised (%d classes): %s",
            path,
            fmt,
            cfg.num_classes,
            ", ".join(fresh) or "nothing",
        )
        class_names = None
    else:
        load_state_strict(model, state, str(path))
        log.info(
            "%s: loaded %s %s checkpoint (embed %d, depth %d%s)",
            path,
            fmt,
            want,
            cfg.embed_dim,
            cfg.depth,
            f", {cfg.num_classes} classes" if want == "classify" else "",
        )
    if class_names is not None and want == "classify" and len(class_names) != cfg.num_classes:
        raise CheckpointError(f"{path}: {len(class_names)} class names for {cfg.num_classes} classes")
    model.class_names = list(class_names) if class_names is not None else None
    return model.eval()


def load_model_of_class(
    checkpoint_or_model: str | os.PathLike | nn.Module,
    model_class: type[nn.Module],
    what: str,
    why: str,
    trust_pickle: bool = False,
) -> nn.Module:
    """`checkpoint_or_model` as an instance of `model_class` (VideoMAEPretrain or VideoMAEClassifier): a model passes
    through, a path goes through `load_pretrained` (a run directory means its latest checkpoint; `trust_pickle` as
    there). Another class is a one-line error naming the source: "SOURCE: a X is not a WHAT (WHY)"."""
    from model.checkpoint import resolve_checkpoint_path

    if isinstance(checkpoint_or_model, nn.Module):
        model, source = checkpoint_or_model, type(checkpoint_or_model).__name__
    else:
        source = str(checkpoint_or_model)
        model = load_pretrained(resolve_checkpoint_path(checkpoint_or_model), trust_pickle=trust_pickle)
    if not isinstance(model, model_class):
        raise ValueError(f"{source}: a {type(model).__name__} is not a {what} ({why})")
    return model
