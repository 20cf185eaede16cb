"""The one two-way key table between our VideoMAE state dicts and transformers' (`VideoMAEForPreTraining`,
`VideoMAEForVideoClassification`): `hf_to_ours` reads a Hugging Face directory (`model.loading`), `ours_to_hf`
writes one (`model.export_hf`), both from the tables below, so that a key spelt one way is spelt back the same way.

    ours (kind "pretrain" adds "encoder." in front)   transformers
    patch_embed.proj.*                                 videomae.embeddings.patch_embeddings.projection.*
    blocks.{i}.*                                       videomae.encoder.layer.{i}.*           (BLOCK_KEYS inside)
    norm.*                                             videomae.layernorm.*
    fc_norm.*, head.*                                  fc_norm.*, classifier.*                (classify)
    encoder_to_decoder.*, mask_token                   the same                               (pretrain)
    decoder.blocks.{i}.*                               decoder.decoder_layers.{i}.*           (pretrain)
    decoder.norm.*, decoder.head.*                     the same                               (pretrain)

Inside a block our fused `attn.qkv.weight` float[3D, D] is transformers' query / key / value weights float[D, D]
each, in q, k, v order (VideoMAE attention has no key bias). transformers spells the q / v biases two ways:
`attention.attention.q_bias` (what `save_pretrained` writes and hub checkpoints use; transformers 5 renames it to
`query.bias` on load) and `attention.attention.query.bias`; both are read, the first is written. The fixed sin-cos
position tables are not weights on either side (see `model.loading`).

tests/test_model_export_hf.py checks the round trip bit for bit; tests/test_model_parity_hf.py checks the import
against transformers' own outputs.
"""

from __future__ import annotations

import re

import torch

# (ours, transformers) prefixes inside a block: after "blocks.{i}." / after "layer.{i}."
BLOCK_KEYS: tuple[tuple[str, str], ...] = (
    ("attn.proj.", "attention.output.dense."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
# (ours, transformers spellings: all are read, the first is written), whole keys inside a block
BIAS_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn.q_bias", ("attention.attention.q_bias", "attention.attention.query.bias")),
    ("attn.v_bias", ("attention.attention.v_bias", "attention.attention.value.bias")),
)
QKV_WEIGHT = "attn.qkv.weight"
HF_QKV_WEIGHTS = tuple(f"attention.attention.{name}.weight" for name in ("query", "key", "value"))
HF_KEY_BIAS = "attention.attention.key.bias"


def block_stacks(kind: str) -> tuple[tuple[str, str], ...]:
    """(ours, transformers) prefixes of the stacks of blocks a model of `kind` has; the layer index follows."""
    enc = "encoder." if kind == "pretrain" else ""
    encoder = (f"{enc}blocks.", "videomae.encoder.layer.")
    return (encoder, ("decoder.blocks.", "decoder.decoder_layers.")) if kind == "pretrain" else (encoder,)


def outer_keys(kind: str) -> tuple[tuple[str, str], ...]:
    """(ours, transformers) prefixes of the weights of a model of `kind` outside its blocks."""
    enc = "encoder." if kind == "pretrain" else ""
    embed_and_norm = (
        (f"{enc}patch_embed.proj.", "videomae.embeddings.patch_embeddings.projection."),
        (f"{enc}norm.", "videomae.layernorm."),
    )
    if kind == "classify":
        return (*embed_and_norm, ("fc_norm.", "fc_norm."), ("head.", "classifier."))
    return (
        *embed_and_norm,
        ("encoder_to_decoder.", "encoder_to_decoder."),
        ("decoder.norm.", "decoder.norm."),
        ("decoder.head.", "decoder.head."),
        ("mask_token", "mask_token"),
    )


def _rename_prefix(key: str, prefixes: dict[str, str]) -> str | None:
    """`key` with its first matching prefix (of `prefixes`, old -> new, in order) replaced; None when none matches."""
    for src, dst in prefixes.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def _layers(state: dict[str, torch.Tensor], prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    """The keys under `prefix{i}.`, grouped by layer: {i: {rest of the key: tensor}}."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return layers


# ------------------------------------------------------------------------------------------- transformers -> ours
_HF_BLOCK_TO_OURS = {hf: ours for ours, hf in BLOCK_KEYS}
_HF_BIAS_TO_OURS = {hf: ours for ours, spellings in BIAS_KEYS for hf in spellings}


def _block_to_ours(parts: dict[str, torch.Tensor], src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    """One transformers layer (`parts`: the keys after `src`) into `out` under `dst`; query / key / value weights
    fused into qkv. A key of no known meaning keeps its transformers name (the strict load then names it)."""
    qkv = [parts.pop(name, None) for name in HF_QKV_WEIGHTS]
    if any(w is not None for w in qkv):
        if any(w is None for w in qkv):
            raise ValueError(f"layer {src[:-1]}: query/key/value weights incomplete")
        out[dst + QKV_WEIGHT] = torch.cat(qkv, dim=0)
    if HF_KEY_BIAS in parts:
        raise ValueError(f"layer {src[:-1]} has a key bias; VideoMAE attention has none (q and v biases only)")
    for rest, value in parts.items():
        mapped = _HF_BIAS_TO_OURS.get(rest) or _rename_prefix(rest, _HF_BLOCK_TO_OURS)
        out[dst + mapped if mapped else src + rest] = value


def hf_to_ours(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A transformers VideoMAE state dict (of a model of `kind`) under our keys. Keys the table does not know keep
    their transformers name (and then fail the strict load with it). ValueError (one line) for a layer whose
    query / key / value weights are incomplete or that has a key bias."""
    out: dict[str, torch.Tensor] = {}
    in_blocks: set[str] = set()
    for ours, hf in block_stacks(kind):
        for i, parts in _layers(state, hf).items():
            in_blocks.update(f"{hf}{i}.{rest}" for rest in parts)
            _block_to_ours(parts, f"{hf}{i}.", f"{ours}{i}.", out)
    outer = {hf: ours for ours, hf in outer_keys(kind)}
    for key, value in state.items():
        if key not in in_blocks:
            out[_rename_prefix(key, outer) or key] = value
    return out


# ------------------------------------------------------------------------------------------- ours -> transformers
_BLOCK_TO_HF = dict(BLOCK_KEYS)
_BIAS_TO_HF = {ours: spellings[0] for ours, spellings in BIAS_KEYS}


def _no_counterpart(key: str) -> ValueError:
    return ValueError(f"{key}: no transformers VideoMAE counterpart")


def ours_to_hf(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Our state dict (of a model of `kind`) under transformers' keys; the inverse of `hf_to_ours`. qkv.weight
    float[3D, D] becomes query, key, value float[D, D] each (copies: safetensors refuses tensors that share storage,
    and chunks of one weight do). ValueError (one line, naming it) for a key without a transformers counterpart."""
    out: dict[str, torch.Tensor] = {}
    in_blocks: set[str] = set()
    for ours, hf in block_stacks(kind):
        for i, parts in _layers(state, ours).items():
            src, dst = f"{ours}{i}.", f"{hf}{i}."
            for rest, value in parts.items():
                in_blocks.add(src + rest)
                if rest == QKV_WEIGHT:
                    for name, part in zip(HF_QKV_WEIGHTS, value.chunk(3, dim=0)):
                        out[dst + name] = part.clone()
                    continue
                mapped = _BIAS_TO_HF.get(rest) or _rename_prefix(rest, _BLOCK_TO_HF)
                if mapped is None:
                    raise _no_counterpart(src + rest)
                out[dst + mapped] = value
    outer = dict(outer_keys(kind))
    for key, value in state.items():
        if key in in_blocks:
            continue
        renamed = _rename_prefix(key, outer)
        if renamed is None:
            raise _no_counterpart(key)
        out[renamed] = value
    return out
