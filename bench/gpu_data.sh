#!/usr/bin/env bash
# Build the small shard sets the GPU suite (bench/gpu.sh) reads, on a machine with ffmpeg (the GPU machine has
# none): 96 synthetic clips of 80 frames at 25 fps, short side 240, as VP9, as VP9 in 4 stride phases and as
# H.264 shards (~75 MB, small enough to carry). A 16x4 clip costs the same to decode from a 3.2 s video as from a 10 s one (~68 frames from
# the keyframe before its start), so short videos keep the set small without flattering the decode rate.
#   bash bench/gpu_data.sh [OUT]        (default .gpu/data)
set -euo pipefail
out=${1:-.gpu/data}
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
py=${PYTHON:-.venv/bin/python}
rm -rf "$out" && mkdir -p "$out"
$py -m shards.synth --out "$out/videos" --classes 8 --per-class 12 --val-per-class 1 --size 426x240 --frames 80 --seed 0
for codec in vp9 h264; do
  $py -m shards.build --csv "$out/videos/train.csv" --root "$out/videos" --split train --out "$out/$codec" \
    --codec "$codec" --short-side 240 --samples-per-shard 4 --quiet
done
# the same VP9 videos stored in 4 stride phases (bench.bench_decode compares the two layouts)
$py -m shards.build --csv "$out/videos/train.csv" --root "$out/videos" --split train --out "$out/vp9p4" \
  --short-side 240 --samples-per-shard 4 --phases 4 --quiet
rm -rf "$out/videos"
du -sh "$out"/*
