"""The DALI graph: read a shard sample, choose frames, decode once, build K augmented views, normalize.

Everything per sample happens here, in DALI operators: frame indices come from the sample's `KEY.info`
(int32 [num_frames, label, sample_id]) and uniform draws; crops come from arithmetic on the decoded frame size;
masks, flips and erasing boxes are random tensors shaped per view. One pipeline = one epoch of one rank.

Outputs of one batch of B samples (K = views per sample: num_repeats, or clips x crops in eval):

    video      float[B, K, C, T, S, S]   normalized, on the training device          (trainer)
    sample_id  int64[B, K]              on the training device                      (trainer)
    label      int64[B, K]              finetune/eval, on the training device       (trainer)
    mask       bool[B, K, N]            pretrain, on the training device            (trainer)
    frame_idx  int32[B, T] or [B, clips*T]  indices into the video's timeline, CPU  (inspection)
    box        int32[B, K, 5]           (y0, x0, h, w, flipped) of each view, CPU  (inspection)
    source     uint8[B, *]              "tar:offset:member" of the video, CPU      (inspection, recovery)
    frames     uint8[B, K, T, S, S, C]  views before normalization (only with debug_outputs)

Boxes are in source-frame pixels for pretrain/finetune and in short-side-resized pixels for eval.

Videos stored in P stride phases (`shards.build --phases P`; P divides the stride) are P members per sample: the
reader reads all of them (eval, whose indices are stride multiples, only the first), and the clip's frames, all of
phase start % P, are decoded from that member at positions index // P (`phase_member`). Everything else sees
timeline indices.

Decoding (`frame_run`, `keyframe_cut`, `decode_run`, `repeat_frames`): DALI 2.4's decoder decodes from the first byte it
is handed and reopens the stream for a repeated frame index, so the decoder is asked for each distinct frame once, as
one strided run (`start_frame`, `stride`, `sequence_length`), and repeats (edge padding of short videos, eval clips that
overlap) are made after decoding (`fn.sequence_rearrange`). IVF members are first cut (`keyframe_cut`): the member's
header, then its bytes from the last key frame at or before the run's first frame to the end of its last frame, found in
the sample's cuts table (`shards.format`). A clip then costs its own frames plus its distance to that key frame.

Plan: an external source feeds one int32 per sample per iteration (`pipeline.plan.DecodePlan`: a whole-batch numpy
array, the graph's only Python input; no per-sample callback). A sample planned -1 is skipped: the expensive branch
(decode, resize, RandAugment, normalize, erase) is not run for it and small placeholders are emitted instead. Every
random draw except those inside RandAugment and the erasing noise is made outside the branch, so a skipped iteration
advances the random state exactly like a decoded one (the loader fast-forwards with it). A sample planned g >= 0 is
decoded by decoder instance g of `decoder_groups` (groups below `cpu_decoder_groups` on CPU threads).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import OperatorConcurrency, StreamPolicy, fn, pipeline_def, types
from nvidia.dali.auto_aug import augmentations as aa
from nvidia.dali.auto_aug import rand_augment as ra
from nvidia.dali.auto_aug.core import augmentation

from pipeline.config import PipelineConfig
from pipeline.ivfcheck import checked_header, checked_member
from pipeline.masking import mask_score_count, mask_scores, pretrain_masks
from shards import format as fmt

RRC_ATTEMPTS = 10  # torchvision/VideoMAE random resized crop: 10 attempts, then a central fallback
ERASE_ATTEMPTS = 10  # timm RandomErasing: 10 attempts per frame
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)
FIX_OFFSETS = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2)]  # (x, y) multiples of the step
MORE_FIX_OFFSETS = [(0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]


def output_names(cfg: PipelineConfig) -> list[str]:
    names = ["video", "sample_id"]
    if cfg.mode != "pretrain":
        names.append("label")
    if cfg.mode == "pretrain":
        names.append("mask")
    names += ["frame_idx", "box", "source"]
    if cfg.debug_outputs:
        names.append("frames")
    return names


def build_pipeline(
    cfg: PipelineConfig,
    paths: list[str],
    index_paths: list[str],
    *,
    batch_size: int,
    device: str,
    device_id: int | None,
    shard_id: int,
    num_shards: int,
    seed: int,
    num_threads: int,
    prefetch_depth: int,
    plan_source: Callable[[], np.ndarray],
    layout: fmt.Layout = fmt.Layout(),  # noqa: B008 - a frozen dataclass: one shared default is safe
    cut: bool = True,
):
    """A DALI pipeline reading `paths` as shard `shard_id` of `num_shards` (one epoch's worth); `plan_source()`
    returns int32[batch_size] per iteration (see the module docstring); `layout`: how the shards store videos;
    `cut=False` hands IVF members to the decoder whole (for a decoder that cannot read cut ones)."""
    parallel = {}
    if device == "gpu" and cfg.decoder_groups > 1:  # let the decoder instances run at once, each on its stream
        parallel = dict(concurrency=OperatorConcurrency.FULL, stream_policy=StreamPolicy.PER_OPERATOR)
    return _video_pipeline(
        cfg,
        paths,
        index_paths,
        device,
        shard_id,
        num_shards,
        plan_source,
        layout,
        cut,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,
        seed=seed,
        prefetch_queue_depth=prefetch_depth,
        **parallel,
    )


@pipeline_def(enable_conditionals=True)
def _video_pipeline(cfg, paths, index_paths, device, shard_id, num_shards, plan_source, layout, cut):
    # module level, so that DALI's autograph converts this graph once per process, not once per pipeline
    return _graph(cfg, paths, index_paths, device, shard_id, num_shards, plan_source, layout, cut)


# ---------------------------------------------------------------------------------------------------------------
def _graph(cfg, paths, index_paths, device, shard_id, num_shards, plan_source, layout: fmt.Layout, cut: bool):
    phases = layout.phases
    video_exts = layout.video_exts
    if cfg.mode == "eval":  # eval reads frames at multiples of the stride, which P divides: phase 0 only
        video_exts = video_exts[:1]
    table_exts = [fmt.CUTS_EXT] if layout.cuttable else []
    *members, info = fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=[*video_exts, *table_exts, fmt.INFO_EXT],
        dtypes=[types.UINT8] * len(video_exts) + [types.INT32] * len(table_exts) + [types.INT32],
        missing_component_behavior="skip",
        random_shuffle=cfg.shuffle,
        initial_fill=cfg.shuffle_buffer,
        dont_use_mmap=not cfg.use_mmap,
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,
        pad_last_batch=True,
        name="reader",
    )
    cuts = cut_rows(members.pop()) if layout.cuttable else None
    plan = fn.external_source(source=plan_source, batch=True, dtype=types.INT32, ndim=0, name="plan")
    skip = plan < 0
    source = fn.get_property(members[0], key="source_info")
    num_frames = dmath.max(info[0], 1)
    if cuts is not None:  # never past the frames actually stored, whatever the info member claims
        num_frames = dmath.max(dmath.min(num_frames, stored_frames(cuts)), 1)
    k = cfg.views_per_sample
    per_view = types.Constant(np.ones(k, dtype=np.int64))
    sample_id = fn.cast(info[2], dtype=types.INT64) * per_view
    label = fn.cast(info[1], dtype=types.INT64) * per_view

    if cfg.mode == "eval":
        frame_idx = eval_frame_indices(num_frames, cfg)
        draws = {}
    else:
        frame_idx = train_frame_indices(num_frames, cfg, fn.random.uniform(range=[0.0, 1.0]))
        draws = _view_draws(cfg)

    member, phase = phase_member(members, frame_idx, phases)
    run = frame_run(frame_idx, phases, cfg.stride)
    if skip:
        video, box, frames, mask = _placeholders(cfg, device)
    else:
        encoded = checked_member(member, cuts, phase) if cuts is not None and not cut else member
        encoded, run = keyframe_cut(member, cuts, phase, run) if cuts is not None and cut else (encoded, run)
        video, box, frames, mask = _decode_and_augment(encoded, run, plan, draws, cfg, device)

    outputs = {
        "video": video,
        "sample_id": _to(sample_id, device),
        "label": _to(label, device),
        "frame_idx": frame_idx,
        "box": box,
        "source": source,
        "frames": frames,
        "mask": mask,
    }
    return tuple(outputs[name] for name in output_names(cfg))


def _to(node, device):
    return node.gpu() if device == "gpu" else node


def _const(array, device):
    return types.Constant(array, device="gpu" if device == "gpu" else "cpu")


def _int(value: int):
    return types.Constant(np.int32(value))


def _arange(n: int):
    return types.Constant(np.arange(n, dtype=np.int32))


# -- temporal sampling ------------------------------------------------------------------------------------------
def train_frame_indices(num_frames, cfg: PipelineConfig, u):
    """int32[T]: random start in [0, max(n - T*stride, 0)] (VideoMAE's uniform start over n - 64 + 1 positions),
    then every `stride`-th frame; past the end the last frame on the stride grid repeats (edge padding)."""
    span = cfg.num_frames * cfg.stride
    max_start = dmath.max(num_frames - span, 0)
    start = dmath.min(fn.cast(u * fn.cast(max_start + 1, dtype=types.FLOAT), dtype=types.INT32), max_start)
    last_step = (num_frames - 1 - start) // cfg.stride
    steps = types.Constant(np.arange(cfg.num_frames, dtype=np.int32))
    return fn.cast(start + cfg.stride * dmath.min(steps, last_step), dtype=types.INT32)


def eval_frame_indices(num_frames, cfg: PipelineConfig):
    """int32[clips*T]: VideoMAE's test sampling. The video is read at `stride` (M = ceil(n/stride) positions,
    repeated at the end up to T); clip c starts at position (c * (max(M, T) - T)) // (clips - 1)."""
    t, clips, stride = cfg.num_frames, cfg.eval_clips, cfg.stride
    positions = (num_frames + (stride - 1)) // stride
    room = dmath.max(positions, t) - t
    steps = types.Constant(np.arange(t, dtype=np.int32))
    per_clip = []
    for c in range(clips):
        start = (room * c) // (clips - 1) if clips > 1 else room // 2
        per_clip.append(stride * dmath.min(start + steps, positions - 1))
    return fn.cast(fn.cat(*per_clip), dtype=types.INT32)


def phase_member(members: list, frame_idx, phases: int):
    """(encoded video, int32 phase) of a clip in videos stored in `phases` P phases: member frame_idx[0] % P. All
    of a clip's frames share that phase when P divides the stride. `members`: the P members, or only the first when
    every clip is known to be of phase 0 (eval)."""
    if len(members) == 1:
        return members[0], _int(0)
    chosen = members[0]
    phase = clip_phase(frame_idx, phases)
    for p in range(1, phases):  # per-sample selection, in the graph (DALI conditionals merge the branches)
        if phase == p:
            chosen = members[p]
    return chosen, phase


def clip_phase(frame_idx, phases: int):
    """int32: the stride phase (member) of a clip, frame_idx[0] % P (every frame of a clip shares it)."""
    return frame_idx[0] - phases * (frame_idx[0] // phases)


class FrameRun:
    """The frames a clip needs from its member, as one strided run without repeats: frames first, first + step,
    ..., first + (count - 1) * step of the member, and `order` (int32[L]): output frame i is run frame order[i]."""

    def __init__(self, first, step: int, count, order):
        self.first, self.step, self.count, self.order = first, step, count, order

    def moved(self, by) -> FrameRun:
        """The same run in a stream that starts `by` frames later into the member (a keyframe cut)."""
        return FrameRun(self.first - by, self.step, self.count, self.order)


def frame_run(frame_idx, phases: int, stride: int) -> FrameRun:
    """The run of member frames behind timeline indices `frame_idx` (int32[L], non-decreasing per clip, all on the
    grid of `stride` from the first, all of one phase): positions frame_idx // P, step stride // P."""
    positions = fn.cast(frame_idx // phases, dtype=types.INT32)
    step = stride // phases
    first = fn.reductions.min(positions)
    count = (fn.reductions.max(positions) - first) // step + 1
    return FrameRun(first, step, count, (positions - first) // step)


def cut_rows(cuts):
    """The cuts table (int32 1-D, see shards.format) as int32[rows, 4]: member, frame, offset, kind."""
    return fn.reshape(cuts, shape=[-1, len(fmt.CUT_COLUMNS)])


def stored_frames(rows):
    """Frames stored in all the sample's members: the sum of the end rows' frame counts."""
    frame, kind = rows[:, 1], rows[:, 3]
    return fn.reductions.sum(fn.cast(kind == fmt.CUT_END, dtype=types.INT32) * frame)


def keyframe_cut(member, rows, phase, run: FrameRun):
    """(the IVF stream of `member` from the last key frame at or before the run's first frame to the end of its
    last frame, the run in that stream). All from the cuts table rows of member `phase`, by masked reductions: the
    key frame is the largest key frame number <= first (offsets grow with frame numbers, so its offset is the
    largest among them too); the end is the offset of frame last + 1 (the member's end row for its last frame)."""
    member_no, frame, offset, kind = (rows[:, i] for i in range(len(fmt.CUT_COLUMNS)))
    mine = member_no == phase
    before = fn.cast(mine & (kind == fmt.CUT_KEY) & (frame <= run.first), dtype=types.INT32)
    key, start = fn.reductions.max(before * frame), fn.reductions.max(before * offset)
    last = run.first + (run.count - 1) * run.step
    end = fn.reductions.max(fn.cast(mine & (frame == last + 1), dtype=types.INT32) * offset)
    body = fn.slice(member, fn.stack(start), fn.stack(end - start), axes=[0])
    return fn.cat(checked_header(member, rows, phase), body), run.moved(key)  # a corrupt member raises


def build_probe(layout: fmt.Layout, stride: int, device: str, device_id: int | None, cut: bool = True):
    """A one-sample pipeline that decodes a clip exactly as the training graph does, from inputs fed by name:
    "video" (uint8[bytes] of the clip's member), "frame_idx" (int32[L] timeline indices) and, in IVF layouts,
    "cuts" (int32[rows * 4]). Outputs the frames the decoder produced (uint8[count, H, W, 3], each distinct frame
    once) and the clip (uint8[L, H, W, 3], in frame_idx order). Used to find corrupt samples and to check what a
    decoder reads."""

    device_id = device_id if device == "gpu" else None

    @pipeline_def(batch_size=1, num_threads=1, prefetch_queue_depth=1, enable_conditionals=False, device_id=device_id)
    def probe():
        member = fn.external_source(name="video", dtype=types.UINT8, ndim=1)
        frame_idx = fn.external_source(name="frame_idx", dtype=types.INT32, ndim=1)
        phase = clip_phase(frame_idx, layout.phases)
        run = frame_run(frame_idx, layout.phases, stride)
        if layout.cuttable:  # checked against its cuts table as in the training graph, cut or whole
            rows = cut_rows(fn.external_source(name="cuts", dtype=types.INT32, ndim=1))
            member, run = keyframe_cut(member, rows, phase, run) if cut else (checked_member(member, rows, phase), run)
        video = decode_run(member, run, "mixed" if device == "gpu" else "cpu")
        return video, fn.sequence_rearrange(video, new_order=run.order)

    return probe()


# -- random draws (outside the conditional branch) --------------------------------------------------------------
def _view_draws(cfg: PipelineConfig) -> dict:
    k = cfg.num_repeats
    uniform = lambda *shape: fn.random.uniform(range=[0.0, 1.0], shape=list(shape))
    draws = {}
    if cfg.mode == "pretrain":
        draws["pair"], draws["offset"] = uniform(k), uniform(k)
        draws["mask_scores"] = mask_scores(k, mask_score_count(cfg))
    else:
        draws["area"], draws["ratio"] = uniform(k, RRC_ATTEMPTS), uniform(k, RRC_ATTEMPTS)
        draws["top"], draws["left"] = uniform(k, RRC_ATTEMPTS), uniform(k, RRC_ATTEMPTS)
    draws["flip"] = (
        fn.random.coin_flip(probability=0.5, shape=[k], dtype=types.INT32)
        if cfg.flip
        else types.Constant(np.zeros(k, dtype=np.int32))
    )
    if cfg.erase_prob > 0:
        draws["erase"] = [uniform(k, cfg.num_frames)] + [uniform(k, cfg.num_frames, ERASE_ATTEMPTS) for _ in range(4)]
    return draws


def _first_valid(valid, values: list, attempts: int, axis: int):
    """Select, along `axis` (the last), the values of the first attempt where `valid` holds.
    Returns (selected values..., any_valid as float 0/1)."""
    shape = [1] * axis + [attempts]
    index = types.Constant(np.arange(attempts, dtype=np.float32).reshape(shape))
    first = fn.reductions.min(index + (1.0 - fn.cast(valid, dtype=types.FLOAT)) * attempts, axes=[axis], keep_dims=True)
    onehot = fn.cast(index == first, dtype=types.FLOAT)
    chosen = [fn.reductions.sum(onehot * v, axes=[axis]) for v in values]
    any_valid = fn.cast(fn.reductions.min(first, axes=[axis]) < attempts, dtype=types.FLOAT)
    return chosen, any_valid


def erase_boxes(cfg: PipelineConfig, u_apply, u_area, u_ratio, u_top, u_left):
    """timm RandomErasing per frame (mode 'pixel', as VideoMAE applies it to the [T, C, H, W] clip): with
    probability p, one box of area 2%..33% and aspect 0.3..3.3, first valid of 10 attempts.
    Returns float[K, 5, T]: (apply, top, left, h, w) per view and frame."""
    s = float(cfg.input_size)
    area = s * s * (ERASE_AREA[0] + u_area * (ERASE_AREA[1] - ERASE_AREA[0]))
    log_lo, log_hi = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = dmath.exp(log_lo + u_ratio * (log_hi - log_lo))
    h = dmath.floor(dmath.sqrt(area * aspect) + 0.5)
    w = dmath.floor(dmath.sqrt(area / aspect) + 0.5)
    valid = (h < s) & (w < s)
    top = dmath.floor(u_top * (s - h + 1.0))
    left = dmath.floor(u_left * (s - w + 1.0))
    (top, left, h, w), found = _first_valid(valid, [top, left, h, w], ERASE_ATTEMPTS, axis=2)
    apply = fn.cast(u_apply < cfg.erase_prob, dtype=types.FLOAT) * found
    return fn.stack(apply, top, left, h, w, axis=1)


# -- decode + spatial augmentation (the skippable branch) -------------------------------------------------------
def _placeholders(cfg: PipelineConfig, device: str):
    k, t = cfg.views_per_sample, cfg.num_frames
    video = fn.reshape(fn.zeros(shape=[k, 3, t, 1, 1], dtype=types.FLOAT), layout="FCDHW")
    frames = fn.reshape(fn.zeros(shape=[k, t, 1, 1, 3], dtype=types.UINT8), layout="FDHWC")
    box = fn.zeros(shape=[k, 5], dtype=types.INT32)
    mask = fn.zeros(shape=[k, 1], dtype=types.BOOL)
    return _to(video, device), box, _to(frames, device), _to(mask, device)


def decode_run(encoded, run: FrameRun, decoder: str):
    """uint8[count, H, W, 3]: the run's frames, each decoded once. `decoder`: "cpu" or "mixed" (NVDEC). Past the
    stream's end (a stream shorter than its sample claims) the last frame repeats instead of black frames."""
    return fn.decoders.video(
        encoded, device=decoder, start_frame=run.first, stride=run.step, sequence_length=run.count, pad_mode="edge"
    )


def repeat_frames(video, run: FrameRun, length: int):
    """uint8[length, H, W, 3]: the decoded run in the clip's frame order (repeats for edge padding and overlapping
    eval clips); the decoded run itself where it already is that order."""
    in_order = fn.reductions.min(fn.cast(run.order == _arange(length), dtype=types.INT32)) == 1
    if in_order:  # the common case in training (a long video): nothing to reorder
        ordered = video
    else:
        ordered = fn.sequence_rearrange(video, new_order=run.order)
    return ordered


def _decode(encoded, run: FrameRun, group, low: int, high: int, cfg: PipelineConfig, device: str):
    """Decode with one decoder instance per group in [low, high): the batch is split by `group` in a binary tree
    of conditionals, so that several decoder sessions can work at once. On the GPU backend, groups below
    `cpu_decoder_groups` decode on the pipeline's CPU threads and move their frames to the GPU (hybrid)."""
    if high - low == 1:
        if device != "gpu":
            return decode_run(encoded, run, "cpu")
        if low < cfg.cpu_decoder_groups:
            return decode_run(encoded, run, "cpu").gpu()
        return decode_run(encoded, run, "mixed")
    middle = (low + high) // 2
    if group < middle:
        video = _decode(encoded, run, group, low, middle, cfg, device)
    else:
        video = _decode(encoded, run, group, middle, high, cfg, device)
    return video


def _decode_and_augment(encoded, run: FrameRun, group, draws, cfg: PipelineConfig, device: str):
    length = cfg.num_frames * (cfg.eval_clips if cfg.mode == "eval" else 1)
    video = repeat_frames(_decode(encoded, run, group, 0, cfg.decoder_groups, cfg, device), run, length)
    shape = video.shape()
    height, width = fn.cast(shape[1], dtype=types.INT32), fn.cast(shape[2], dtype=types.INT32)
    if cfg.mode == "eval":
        frames, box = _eval_views(video, cfg)
    else:
        frames, box = _train_views(video, height, width, draws, cfg)
    video = fn.crop_mirror_normalize(
        frames,
        dtype=types.FLOAT,
        output_layout="FCDHW",
        mean=[255.0 * m for m in cfg.mean],
        std=[255.0 * s for s in cfg.std],
    )
    if cfg.mode != "eval" and cfg.erase_prob > 0:
        video = _erase(video, erase_boxes(cfg, *draws["erase"]), cfg, device)
    if cfg.mode == "pretrain":
        mask = pretrain_masks(_to(draws["mask_scores"], device), cfg, device)
    else:
        mask = _to(fn.zeros(shape=[cfg.views_per_sample, 1], dtype=types.BOOL), device)
    return video, box, frames, mask


def _train_views(video, height, width, draws, cfg: PipelineConfig):
    s = cfg.input_size
    views, boxes = [], []
    for k in range(cfg.num_repeats):
        if cfg.mode == "pretrain":
            y0, x0, h, w = multiscale_crop_box(height, width, draws["pair"][k], draws["offset"][k], cfg)
        else:
            y0, x0, h, w = random_resized_crop_box(
                height, width, draws["area"][k], draws["ratio"][k], draws["top"][k], draws["left"][k], cfg
            )
        flip = draws["flip"][k]
        # a reversed x range in the ROI mirrors the crop: flip costs nothing extra
        x_from, x_to = x0 + flip * w, x0 + (1 - flip) * w
        roi_start = fn.cast(fn.stack(y0, x_from), dtype=types.FLOAT)
        roi_end = fn.cast(fn.stack(y0 + h, x_to), dtype=types.FLOAT)
        views.append(
            fn.resize(
                video, roi_start=roi_start, roi_end=roi_end, size=[s, s], antialias=cfg.antialias, dtype=types.UINT8
            )
        )
        boxes.append(fn.cast(fn.stack(y0, x0, h, w, flip), dtype=types.INT32))
    frames = fn.stack(*views) if len(views) > 1 else fn.expand_dims(views[0], axes=[0])
    if cfg.rand_augment:
        k, t = cfg.num_repeats, cfg.num_frames
        frames = fn.reshape(
            _rand_augment(fn.reshape(frames, shape=[k * t, s, s, 3], layout="FHWC"), cfg), shape=[k, t, s, s, 3]
        )
    return fn.reshape(frames, layout="FDHWC"), fn.stack(*boxes)


def multiscale_crop_box(height, width, u_pair, u_offset, cfg: PipelineConfig):
    """VideoMAE's GroupMultiScaleCrop: crop sides int(short_side * scale) (snapped to input_size within 3 px),
    a (w, h) scale pair at most `max_distort` apart, a fixed offset among 13 (more_fix_crop)."""
    s = cfg.input_size
    thousandths = [int(round(x * 1000)) for x in cfg.scales]  # int(base * scale) == base * thousandths // 1000
    pairs = [(i, j) for i in range(len(cfg.scales)) for j in range(len(cfg.scales)) if abs(i - j) <= cfg.max_distort]
    offsets = FIX_OFFSETS + (MORE_FIX_OFFSETS if cfg.more_fix_crop else [])
    base = dmath.min(height, width)
    p = dmath.min(fn.cast(u_pair * len(pairs), dtype=types.INT32), len(pairs) - 1)
    o = dmath.min(fn.cast(u_offset * len(offsets), dtype=types.INT32), len(offsets) - 1)

    def side(index_of_pair):
        per_pair = [thousandths[index_of_pair(pair)] for pair in pairs]
        scale = fn.lookup_table(p, keys=list(range(len(pairs))), values=per_pair, dtype=types.INT32)
        crop = base * scale // 1000
        return crop + fn.cast(dmath.abs(crop - s) < 3, dtype=types.INT32) * (s - crop)

    crop_h, crop_w = side(lambda pair: pair[0]), side(lambda pair: pair[1])
    x_mult = fn.lookup_table(o, keys=list(range(len(offsets))), values=[a for a, _ in offsets], dtype=types.INT32)
    y_mult = fn.lookup_table(o, keys=list(range(len(offsets))), values=[b for _, b in offsets], dtype=types.INT32)
    x0 = x_mult * ((width - crop_w) // 4)
    y0 = y_mult * ((height - crop_h) // 4)
    return y0, x0, crop_h, crop_w


def random_resized_crop_box(height, width, u_area, u_ratio, u_top, u_left, cfg: PipelineConfig):
    """VideoMAE's random_resized_crop (torchvision's algorithm): 10 attempts of area U(scale) * H * W and
    log-uniform aspect ratio; the first that fits wins; otherwise a central crop clamped to the ratio range."""
    hf, wf = fn.cast(height, dtype=types.FLOAT), fn.cast(width, dtype=types.FLOAT)
    (s0, s1), (r0, r1) = cfg.rrc_scale, cfg.rrc_ratio
    area = hf * wf * (s0 + u_area * (s1 - s0))
    aspect = dmath.exp(math.log(r0) + u_ratio * (math.log(r1) - math.log(r0)))
    w = dmath.floor(dmath.sqrt(area * aspect) + 0.5)
    h = dmath.floor(dmath.sqrt(area / aspect) + 0.5)
    valid = (w > 0.0) & (w <= wf) & (h > 0.0) & (h <= hf)
    top = dmath.floor(u_top * (hf - h + 1.0))
    left = dmath.floor(u_left * (wf - w + 1.0))
    (top, left, h, w), found = _first_valid(valid, [top, left, h, w], RRC_ATTEMPTS, axis=0)
    # fallback: whole frame, narrowed to the ratio range
    in_ratio = wf / hf
    too_narrow = fn.cast(in_ratio < r0, dtype=types.FLOAT)
    too_wide = fn.cast(in_ratio > r1, dtype=types.FLOAT)
    fb_w = wf + too_wide * (dmath.floor(hf * r1 + 0.5) - wf)
    fb_h = hf + too_narrow * (dmath.floor(wf / r0 + 0.5) - hf)
    fb_top, fb_left = dmath.floor((hf - fb_h) / 2.0), dmath.floor((wf - fb_w) / 2.0)
    pick = lambda a, b: fn.cast(found * a + (1.0 - found) * b, dtype=types.INT32)
    return pick(top, fb_top), pick(left, fb_left), pick(h, fb_h), pick(w, fb_w)


@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=aa.sharpness_kernel, param_device="auto")
def sharpness(data, kernel):
    """DALI's RandAugment sharpness, on fn.filter (the suite's fn.experimental.filter alias warns on every use)."""
    return fn.filter(data, kernel)


@augmentation
def equalize(data, _):
    """DALI's RandAugment equalize, on fn.equalize (the suite's experimental alias warns on every use)."""
    return fn.equalize(data)


def rand_augment_suite() -> list:
    """DALI's RandAugment suite (timm's ops with increasing magnitudes), without identity."""
    replace = {aa.sharpness.name: sharpness, aa.equalize.name: equalize}
    return [replace.get(a.name, a) for a in ra.get_rand_augment_suite(use_shape=True) if a.name != aa.identity.name]


def _rand_augment(frames, cfg: PipelineConfig):
    """timm's RandAugment (rand-m{m}-n{n}, increasing magnitudes): n layers, each applying with probability 0.5 one
    op drawn from the suite, at magnitude m of 10, identically to every frame of the sample (DALI treats FHWC as one
    sample). Applied once per clip to its stacked views, so the K views of a clip share the draw: building a
    RandAugment graph per view would cost seconds of graph construction per view and epoch. timm's magnitude noise
    (mstd=0.5) has no DALI counterpart: the magnitude is fixed."""
    suite = rand_augment_suite()
    s = cfg.input_size
    coins = fn.random.coin_flip(probability=0.5, shape=[cfg.rand_augment_n], dtype=types.INT32)
    for layer in range(cfg.rand_augment_n):
        if coins[layer]:
            frames = ra.apply_rand_augment(
                suite, frames, n=1, m=cfg.rand_augment_m, num_magnitude_bins=11, shape=[s, s], fill_value=128
            )
    return frames


def _erase(video, params, cfg: PipelineConfig, device: str):
    """Fill each erasing box with per-pixel N(0, 1) noise (values are already normalized)."""
    k, t, s = cfg.num_repeats, cfg.num_frames, cfg.input_size
    p = _to(fn.reshape(params, shape=[k, 5, 1, t, 1, 1]), device)  # -> broadcast over [K, C, T, H, W]
    apply, top, left, h, w = (p[:, i] for i in range(5))
    yy = _const(np.arange(s, dtype=np.float32).reshape(1, 1, 1, s, 1), device)
    xx = _const(np.arange(s, dtype=np.float32).reshape(1, 1, 1, 1, s), device)
    inside = (yy >= top) & (yy < top + h) & (xx >= left) & (xx < left + w)
    m = apply * fn.cast(inside, dtype=types.FLOAT)
    noise = fn.random.normal(video, device=device)
    return fn.reshape(video + m * (noise - video), layout="FCDHW")


def _eval_views(video, cfg: PipelineConfig):
    """5 clips x 3 crops: short side resized to `short_side`; crops of input_size at (c * (L - S)) // (crops-1)
    along the long side (VideoMAE's int(c * (L - S) / (crops - 1))), centred along the short side.
    Views are clip-major: view = clip * crops + crop."""
    s, t, clips, crops = cfg.input_size, cfg.num_frames, cfg.eval_clips, cfg.eval_crops
    resized = fn.resize(video, resize_shorter=cfg.short_side, antialias=cfg.antialias, dtype=types.UINT8)
    shape = resized.shape()
    hr, wr = fn.cast(shape[1], dtype=types.INT32), fn.cast(shape[2], dtype=types.INT32)
    long_is_h = fn.cast(hr > wr, dtype=types.INT32)
    long_side, short_side = dmath.max(hr, wr), dmath.min(hr, wr)
    across = (short_side - s) // 2
    views, boxes = [], []
    for c in range(crops):
        along = (c * (long_side - s)) // (crops - 1) if crops > 1 else (long_side - s) // 2
        y0 = long_is_h * along + (1 - long_is_h) * across
        x0 = (1 - long_is_h) * along + long_is_h * across
        start = fn.stack(y0, x0)
        crop = fn.slice(resized, start=start, shape=[s, s], axis_names="HW")  # [clips*T, S, S, C]
        views.append(fn.reshape(crop, shape=[clips, t, s, s, 3], layout="FDHWC"))
        boxes.append(fn.stack(y0, x0, _int(s), _int(s), _int(0)))
    frames = fn.stack(*views, axis=1) if crops > 1 else fn.expand_dims(views[0], axes=[1])  # [clips, crops, ...]
    frames = fn.reshape(frames, shape=[clips * crops, t, s, s, 3], layout="FDHWC")
    box = fn.stack(*(boxes * clips))  # clip-major
    return frames, box
