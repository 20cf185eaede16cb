"""Options of the input pipeline, with VideoMAE's defaults per mode.

`PipelineConfig` is plain data: the DALI graph (`pipeline.graph`) reads it, the loader (`pipeline.loader`) owns it.
Fields left at `None` take the mode's default when `resolved()` is called:

| option            | pretrain              | finetune                       | eval                          |
|-------------------|-----------------------|--------------------------------|-------------------------------|
| spatial crop      | multi-scale crop      | random resized crop            | short side -> size, 3 crops   |
| flip              | off (official recipe) | on                             | off                           |
| RandAugment       | -                     | n=4, m=7 (of 10)               | -                             |
| random erasing    | -                     | p=0.25, per frame, pixel noise | -                             |
| antialias resize  | on (PIL bilinear)     | off (torch bilinear)           | off                           |
| shuffle           | shards + buffer       | shards + buffer                | none                          |
| last batch        | dropped               | dropped                        | trimmed: every sample once    |

Decoding strategy (none of it changes a batch): `decoder_groups` / `cpu_decoder_groups` split each batch over
decoder instances inside one graph, `pipelines` over whole DALI pipelines, and `decode="auto"` lets the loader time
candidates at start and keep the fastest (see `pipeline.strategy`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODES = ("pretrain", "finetune", "eval")  # the one definition: other modules import it
DECODE_CHOICES = ("fixed", "auto")
MASK_TYPES = ("tube", "random")  # the official --mask_type choices
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PipelineConfig:
    mode: str = "pretrain"
    num_frames: int = 16  # T, frames per clip
    stride: int = 4  # sampling rate between consecutive frames of a clip
    input_size: int = 224  # output frames are input_size x input_size
    num_repeats: int = 1  # K views per decoded clip (repeated augmentation)
    # pretraining mask: "tube" (official TubeMaskingGenerator: int(ratio * spatial tokens) per temporal slot, the same
    # spatial pattern at every slot) or "random" (RandomMaskingGenerator: int(ratio * N) of all N tokens, a fresh
    # pattern per slot; the paper's ablation, which lets a token be predicted from its place in another slot)
    mask_ratio: float = 0.9
    mask_type: str = "tube"
    patch_size: int = 16
    tubelet_size: int = 2
    # spatial augmentation
    flip: bool | None = None
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)  # multi-scale crop, fractions of the short side
    max_distort: int = 1
    more_fix_crop: bool = True
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop (fine-tuning)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    antialias: bool | None = None
    # fine-tuning extras
    rand_augment: bool | None = None
    rand_augment_n: int = 4
    rand_augment_m: int = 7  # magnitude on timm's 0..10 scale
    erase_prob: float | None = None
    # evaluation protocol
    eval_clips: int = 5
    eval_crops: int = 3
    short_side: int | None = None  # eval: resize the short side to this before cropping (default input_size)
    # normalization
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # reading
    shuffle: bool | None = None
    shuffle_buffer: int = 512  # DALI reader shuffle buffer, samples (per rank)
    use_mmap: bool = True  # map the tars (local disks); False reads them with plain I/O (network mounts)
    drop_last: bool | None = None
    debug_outputs: bool = False  # also emit uint8 frames before normalization (preview/dump)
    # decoding strategy (GPU backend; experimental, to be measured: bench.bench_pipeline --decode-sweep)
    decoder_groups: int = 1  # split each batch over this many concurrent decoder instances (NVDEC engines)
    cpu_decoder_groups: int = 0  # of those, how many decode on CPU threads, then move to the GPU for
    # augmentation (hybrid decoding; = decoder_groups: CPU decode, GPU augment)
    pipelines: int = 1  # independent DALI pipelines per rank, each with its own threads and decoders,
    # pipeline i decoding rows i::pipelines of every batch (outputs do not change)
    decode: str = "fixed"  # "auto": time candidate strategies (pipelines, decoder groups, CPU groups) on
    # the first batches at start and keep the fastest (outputs do not change)
    auto_batches: int = 3  # decode="auto": timed batches per candidate, after one untimed batch
    # remote shard sets (s3://, gs://, https://; pipeline.remote): read through a node-local cache, in segments
    cache_dir: str | None = None  # default: $VIDEOMAE_CACHE_DIR, else <tmp>/videomae-shard-cache
    cache_gb: float = 64.0  # bound on the cache's bytes, shared by every rank of the node
    segment_shards: int = 4  # shards' worth of samples per segment (one DALI reader each), per rank
    prefetch_segments: int = 2  # segments fetched ahead of the one being read, per rank
    fetch_workers: int = 4  # downloads in flight per rank
    segmented: bool = False  # read a local set in segments too, as a remote one is (comparisons, benchmarks)

    def resolved(self) -> PipelineConfig:
        """A copy with every mode-dependent `None` replaced by the mode's default, validated."""
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {MODES}")
        train = self.mode != "eval"
        cfg = dataclasses.replace(
            self,
            flip=(self.mode == "finetune") if self.flip is None else self.flip,
            antialias=(self.mode == "pretrain") if self.antialias is None else self.antialias,
            rand_augment=(self.mode == "finetune") if self.rand_augment is None else self.rand_augment,
            erase_prob=(0.25 if self.mode == "finetune" else 0.0) if self.erase_prob is None else self.erase_prob,
            shuffle=train if self.shuffle is None else self.shuffle,
            drop_last=train if self.drop_last is None else self.drop_last,
            short_side=self.input_size if self.short_side is None else self.short_side,
            num_repeats=1 if self.mode == "eval" else self.num_repeats,
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.num_frames < 1 or self.stride < 1:
            raise ValueError(f"num_frames={self.num_frames}, stride={self.stride}: both must be >= 1")
        if self.decoder_groups < 1:
            raise ValueError(f"decoder_groups={self.decoder_groups}: must be >= 1")
        if self.pipelines < 1:
            raise ValueError(f"pipelines={self.pipelines}: must be >= 1")
        if self.decode not in DECODE_CHOICES:
            raise ValueError(f"decode={self.decode!r}: expected one of {DECODE_CHOICES}")
        if self.auto_batches < 1:
            raise ValueError(f"auto_batches={self.auto_batches}: must be >= 1")
        if not 0 <= self.cpu_decoder_groups <= self.decoder_groups:
            raise ValueError(
                f"cpu_decoder_groups={self.cpu_decoder_groups}: must be in [0, decoder_groups={self.decoder_groups}]"
            )
        if self.num_repeats < 1:
            raise ValueError(f"num_repeats={self.num_repeats}: must be >= 1")
        if self.mode == "pretrain":
            if self.input_size % self.patch_size:
                raise ValueError(f"input_size={self.input_size} is not a multiple of patch_size={self.patch_size}")
            if self.num_frames % self.tubelet_size:
                raise ValueError(f"num_frames={self.num_frames} is not a multiple of tubelet_size={self.tubelet_size}")
            if not 0.0 <= self.mask_ratio < 1.0:
                raise ValueError(f"mask_ratio={self.mask_ratio}: must be in [0, 1)")
            if self.mask_type not in MASK_TYPES:
                raise ValueError(f"mask_type={self.mask_type!r}: expected one of {MASK_TYPES}")
        if self.mode == "eval":
            if self.eval_clips < 1 or self.eval_crops < 1:
                raise ValueError(f"eval_clips={self.eval_clips}, eval_crops={self.eval_crops}: both must be >= 1")
            if self.short_side < self.input_size:
                raise ValueError(f"short_side={self.short_side} is smaller than input_size={self.input_size}")
        if self.segment_shards < 1 or self.prefetch_segments < 0 or self.fetch_workers < 1 or self.cache_gb <= 0:
            raise ValueError(
                f"segment_shards={self.segment_shards}, prefetch_segments={self.prefetch_segments}, fetch_workers="
                f"{self.fetch_workers}, cache_gb={self.cache_gb}: need >= 1, >= 0, >= 1, > 0"
            )
        if not 0.0 <= self.erase_prob <= 1.0:
            raise ValueError(f"erase_prob={self.erase_prob}: must be in [0, 1]")

    # derived sizes ---------------------------------------------------------------------------------------------
    @property
    def views_per_sample(self) -> int:
        """Rows per sample in a batch: K repeats (train) or clips x crops (eval)."""
        return self.eval_clips * self.eval_crops if self.mode == "eval" else self.num_repeats

    def decodes_on(self, device: str) -> set[str]:
        """The decoders a `device` backend uses: {"cpu"} on the CPU backend; on the GPU backend "mixed" (NVDEC)
        and/or "cpu" (hybrid), by `cpu_decoder_groups`."""
        if device == "cpu":
            return {"cpu"}
        return ({"cpu"} if self.cpu_decoder_groups else set()) | (
            {"mixed"} if self.cpu_decoder_groups < self.decoder_groups else set()
        )

    @property
    def spatial_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """N = T/tubelet * (H/patch) * (W/patch)."""
        return self.num_frames // self.tubelet_size * self.spatial_tokens

    @property
    def masked_per_slot(self) -> int:
        """Masked spatial tokens per temporal slot, as the official TubeMaskingGenerator counts them."""
        return int(self.mask_ratio * self.spatial_tokens)

    @property
    def num_masked(self) -> int:
        """Masked tokens per clip: tube int(ratio * S) * T', random int(ratio * N) (the official generators)."""
        if self.mask_type == "random":
            return int(self.mask_ratio * self.num_tokens)
        return self.masked_per_slot * (self.num_frames // self.tubelet_size)
