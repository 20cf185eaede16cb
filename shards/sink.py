"""Writing transcoded videos into shards: the tar members of a sample, and the sink that groups samples into shards
in plan order and records a marker per finished shard (`shards.records.ShardMarker`, `shards.resume`)."""

from __future__ import annotations

from collections.abc import Callable

from shards import format as fmt
from shards.inputs import VideoInput
from shards.records import ShardMarker
from shards.resume import BuildState
from shards.transcode import TranscodeResult
from shards.writer import ShardWriter, member_bytes


def sample_members(
    item: VideoInput, result: TranscodeResult, label: int, sample_id: int, codec: str
) -> list[tuple[str, bytes]]:
    """The tar members (extension, data) of one sample, in the order format.py lists them."""
    info = result.info
    meta = {
        "key": item.key,
        "source": item.source,
        "label": label,
        "label_name": item.label_name,
        "fps": round(info.fps, 6),
        "num_frames": info.num_frames,
        "width": info.width,
        "height": info.height,
        "duration": round(info.duration, 6),
        "codec": codec,
        "sample_id": sample_id,
    }
    videos = result.videos
    if len(videos) > 1:
        meta["phases"] = len(videos)
    container = fmt.IVF_EXT if result.cuts is not None else fmt.VIDEO_EXT
    return [
        *zip(fmt.video_exts(len(videos), container), videos),
        *([(fmt.CUTS_EXT, result.cuts)] if result.cuts is not None else []),
        (fmt.LABEL_EXT, str(label).encode()),
        (fmt.META_EXT, fmt.pack_meta(meta)),
        (fmt.INFO_EXT, fmt.pack_info(info.num_frames, label, sample_id)),
    ]


class ShardSink:
    """Groups transcoded samples into shards in plan order and records a resume marker per finished shard.

    A shard is closed before a sample would take it past `max_samples` samples or `max_bytes` bytes (either may be
    None: no bound). `kept` are the markers of the shards an earlier run finished (`BuildState.prepare`): the sink
    goes on after them, at the plan position and sample id where the last one ended.
    """

    def __init__(
        self,
        state: BuildState,
        codec: str,
        label_of: Callable[[str | None], int],
        kept: list[ShardMarker],
        max_bytes: int | None,
        max_samples: int | None,
    ) -> None:
        self.state, self.prefix, self.codec, self.label_of = state, state.prefix, codec, label_of
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.markers = list(kept)
        # a part numbers its samples from its first plan position on (provisional ids; shards.merge renumbers)
        self.next_sample_id = state.id_base + sum(m.num_samples for m in kept)
        self.position = kept[-1].plan_end if kept else 0  # plan position the next open shard starts at
        self.writer: ShardWriter | None = None
        self.pending_failures: list[dict] = []
        self.first_sample_id = self.next_sample_id
        self.shard_frames = 0
        self.shard_duration = 0.0

    @property
    def num_samples(self) -> int:
        """Samples in the finished shards."""
        return sum(m.num_samples for m in self.markers)

    @property
    def num_bytes(self) -> int:
        """Bytes of the finished shards."""
        return sum(m.bytes for m in self.markers)

    def add_failure(self, item: VideoInput, reason: str) -> None:
        self.pending_failures.append({"source": item.source, "key": item.key, "reason": reason})

    def add_sample(self, position: int, item: VideoInput, result: TranscodeResult) -> None:
        label = self.label_of(item.label_name)
        members = sample_members(item, result, label, self.next_sample_id, self.codec)
        size = sum(member_bytes(len(data)) for _, data in members)
        if self.writer is not None and (
            (self.max_samples and len(self.writer.keys) >= self.max_samples)
            or (self.max_bytes and self.writer.bytes_written + size > self.max_bytes)
        ):
            self.close_shard(position)
        if self.writer is None:
            self.writer = ShardWriter(
                self.state.out_dir, fmt.shard_name(self.prefix, len(self.markers)), self.state.work_dir
            )
            self.first_sample_id = self.next_sample_id
        self.writer.add_sample(item.key, members)
        self.next_sample_id += 1
        self.shard_frames += result.info.num_frames
        self.shard_duration += result.info.duration

    def close_shard(self, plan_end: int) -> None:
        """Finish the open shard; it owns plan positions [self.position, plan_end) and their failures."""
        record = self.writer.close()
        marker = ShardMarker(
            shard=len(self.markers),
            tar=record.tar,
            index=record.index,
            num_samples=record.num_samples,
            bytes=record.bytes,
            sha256=record.sha256,
            first_sample_id=self.first_sample_id,
            plan_start=self.position,
            plan_end=plan_end,
            keys=record.keys,
            failures=self.pending_failures,
            num_frames=self.shard_frames,
            duration=round(self.shard_duration, 6),
        )
        self.state.record_shard(marker)
        self.markers.append(marker)
        self.writer, self.pending_failures = None, []
        self.position, self.shard_frames, self.shard_duration = plan_end, 0, 0.0

    def finish(self, plan_end: int) -> list[dict]:
        """Close the last shard; returns the failures that belong to no shard (only when no shard was written)."""
        if self.writer is not None:
            self.close_shard(plan_end)
            return []
        if self.markers and self.pending_failures:
            # Failures after the last written shard of an earlier run cannot happen (the last shard is closed
            # at the end of the plan), but stay safe: attach them to the last shard's record.
            self.markers[-1].failures.extend(self.pending_failures)
            self.pending_failures = []
        return self.pending_failures

    def abort(self) -> None:
        """Drop the open shard (its videos are redone by the next run, its failures recorded again then)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
