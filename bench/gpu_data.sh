#!/usr/bin/env bash
# Build the small shard sets the GPU suite (bench/gpu.sh) reads, on a machine with ffmpeg (the GPU machine has
# none): 24 synthetic clips of 160 frames at 25 fps, short side 240, in four layouts of the same videos (bench.layouts):
#   vp9    timeline order, VP9 in MP4, GOP 16 (the decord baseline reads it too)
#   vp9p4  4 stride phases, VP9 in MP4, GOP 64 (decoded from each member's start)
#   vp9c4  4 stride phases, VP9 in IVF + cuts table (the default layout: cut at the key frame before each clip)
#   h264   timeline order, H.264 in MP4, GOP 16 (NVDEC only)
# (~50 MB). Short videos keep the set small; per clip DALI decodes ~109 / ~28 / ~22 frames (timeline / 4-phase MP4 /
# cut), against ~154 / ~39 / ~23 on 10 s videos: 6.4 s clips understate the MP4 layouts' cost.
#   bash bench/gpu_data.sh [OUT]        (default .gpu/data)
set -euo pipefail
out=${1:-.gpu/data}
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
py=${PYTHON:-.venv/bin/python}
rm -rf "$out" && mkdir -p "$out"
$py -m shards.synth --out "$out/videos" --classes 4 --per-class 6 --val-per-class 1 --size 426x240 --frames 160 --seed 0
build() {  # OUT-NAME, then shards.build options
  local name=$1; shift
  $py -m shards.build --csv "$out/videos/train.csv" --root "$out/videos" --split train --out "$out/$name" \
    --short-side 240 --samples-per-shard 4 --quiet "$@"
}
build vp9 --container mp4 --gop 16
build vp9p4 --container mp4 --phases 4 --gop 64
build vp9c4 --phases 4
build h264 --codec h264
rm -rf "$out/videos"
du -sh "$out"/*
