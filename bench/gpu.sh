#!/usr/bin/env bash
# The GPU suite: checks and measures everything that needs an NVIDIA GPU, writing logs and JSON under OUTDIR.
#
#   bash bench/gpu.sh headline [OUTDIR]        the three numbers in one device window (bench/gpu_headline.sh)
#   bash bench/gpu.sh [PART] [OUTDIR] [DATA]   the whole suite or one part of it (about four windows)
#   bash bench/gpu.sh unpack                   only unpack the staged parts (.stage/p*), as every part does first
#
# == The headline in one device window (15 minutes of device time, start-up and transfers included) ==============
# Here, on the CPU machine, in the checkout whose working tree the device calls carry (the session's own):
#   bash bench/gpu_data.sh headline        the data set (.gpu/data/headline, 11.6 MB) and the GPU check's test clips
#                                          pre-built in it (testshards/, 0.5 MB: no ffmpeg there); ~1 min on 2 cores
#   bash bench/stage_gpu.sh                DALI + small wheels (no ffmpeg) -> .stage/site (pip, ~20 s), one xz -9
#                                          stream (126.5 MiB; 11-25 min on 2 busy cores, once) into .stage/p0..p2,
#                                          the data set in p2; prints each call's size: 46.0 MiB per part, 47.5 MiB
#                                          with today's tree (pack keeps a call <= 58 MiB with the tree)
#   bash bench/stage_gpu.sh check          again right before the calls: exit 1 naming any call over 62 MiB with the
#                                          tree (the 64 MiB limit less a 2 MiB margin; the tree may have grown)
# Then three device calls, back to back (a machine stays warm only 30 s after a call; a cold one has lost p0/p1):
#   1. run  carry [".stage/p0"]  command "du -sh .stage; nvidia-smi -L"                       (start ~1-2 min + ~48 MiB)
#   2. run  carry [".stage/p1"]  command "du -sh .stage"                                                  (~48 MiB)
#   3. run  carry [".stage/p2"]  timeout_s 480
#           command "PACK_TO=$OUT bash bench/gpu.sh headline .gpu/headline"  (~10 s unpacking, <= 6 min of steps)
#      $OUT then holds headline.md (the three numbers), headline.json and headline.tgz (every step's JSON and log,
#      refreshed after each step, so a call cut short still brings back the steps that ended); give_back at once.
# Expected: ~9-10 of the 15 minutes (start-up and the transfer rate are not yet measured on this machine). If
# `unpack` reports a missing part (the machine went cold between calls), start again from call 1.
#
# == The suite (PART) =================================================================================================
# PART    all (default) | checks | decode | model | train | pipeline | h264 (within 10 minutes on an H100, each)
#             checks:   machine facts (bench.gpu_env), GPU tests (pipeline GPU backend vs CPU backend for each
#                       decoding strategy, H.264 on NVDEC, zero-copy handoff, resume, corrupt samples; Triton loss
#                       kernel on CUDA); then several pipelines and decode=auto against one pipeline, and the
#                       CUDA-graph training step against eager steps
#             decode:   NVDEC alone (bench.bench_decode --device gpu): whether it seeks or decodes from the
#                       stream's start, and the three VP9 layouts of the same videos (timeline MP4, 4-phase MP4,
#                       4-phase IVF cut at key frames); then the GPU backend's decoding strategies side by side
#                       on the cut layout (bench.bench_pipeline --decode-sweep, K = 2): NVDEC with 1x/2x
#                       threads, NVDEC x2/x4 instances, CPU threads + GPU augmentation, hybrids with 1/2 to 3/4
#                       of each batch decoded on the CPU, 2 and 4 DALI pipelines (each with its own decoders and
#                       its share of the threads), and decode=auto (the loader times candidates and keeps the
#                       fastest); then some of them on the 4-phase MP4 layout
#             model:    bench.bench_model, ViT-B pretraining step at batch 64: eager and compiled fused bf16, the
#                       whole step as one CUDA graph, flash vs cuDNN attention, VideoMAE V2 decoder masking (its
#                       own table), max-autotune last (the longest warm-up)
#             pipeline: bench.bench_pipeline --device gpu against the decord + DataLoader baseline, K = 1, 2, 4,
#                       VP9 shards (timeline MP4 and the cut layout), with a thread/worker sweep point
#             h264:     the same on H.264 shards (NVDEC only)
#             train:    bench.bench_train: ViT-B pretraining step fed by the real pipeline vs in-memory tensors
#   OUTDIR  default bench/out/gpu
#   DATA    folder with shard directories vp9/, vp9p4/, vp9c4/ and h264/ (default .gpu/data; build them with
#           bench/gpu_data.sh on a machine that has ffmpeg)
#   BUDGET  (environment) seconds for the whole run, default 590
#
# Engine use: while each step runs, `nvidia-smi dmon -s u -d 1` samples SM and NVDEC utilization into
# OUTDIR/STEP.dmon.log; bench.gpu_util then prints one line per step and adds the summary to the step's JSON
# ("gpu_utilization") and to OUTDIR/gpu_util.json.
#
# Offline machine: what the machine lacks is carried in as parts, from the project root (see README, "GPU suite"):
#   .stage/pN      DALI, its small dependencies and the headline data set (bench/stage_gpu.sh; or
#                  the wheels of ../shared/offline-gpu/stage-dali.sh), unpacked here
#   .whl/          optional extra wheels (decord for the baseline), installed beside DALI
#   .ffm/          optional ffmpeg (ffmpeg.xz + the imageio_ffmpeg package) for tests that encode their own clips
set -u
part=${1:-all}; out=${2:-bench/out/gpu}; data=${3:-.gpu/data}
case $part in headline | unpack) data=${DATA:-${3:-.gpu/data/headline}} ;; esac  # the headline's data set
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
mkdir -p "$out"
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# -- bring in what an offline machine lacks ------------------------------------------------------------------------
# bench/stage_gpu.sh's parts: STAGE/pN/site.txz.NN (one xz stream of a site-packages tree, in order) and, in the
# last part, data.tar (the headline data set) and stage.txt (sha256 of every piece). Unpacked once into
# STAGE/unpacked (marker .unpacked; STAGE/site is stage_gpu.sh's source tree) and DATA; a missing or damaged part is
# named before anything is unpacked.
stage=${STAGE:-.stage}
unpack_stage() {
  local manifest pieces
  manifest=$(ls "$stage"/p*/stage.txt 2>/dev/null | tail -n 1)
  if [ -z "$manifest" ]; then
    echo "stage: no $stage/pN/stage.txt: the last part ($(ls -d "$stage"/p* 2>/dev/null | tr '\n' ' ')present) is missing"
    return 1
  fi
  if ! (cd "$stage" && sha256sum -c --quiet "${manifest#"$stage"/}" 2>&1 | sed 's/^/stage: /'; exit "${PIPESTATUS[0]}"); then
    echo "stage: a part is missing or damaged (above); carry the parts again, in order, to a warm machine"
    return 1
  fi
  if [ ! -f "$stage/unpacked/.unpacked" ]; then
    local t0=$SECONDS unxz=(xz -dc -T0)
    command -v xz >/dev/null || unxz=(python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)")
    pieces=$(ls "$stage"/p*/site.txz.* | awk -F/ '{print $NF " " $0}' | sort | cut -d' ' -f2-)
    rm -rf "$stage/unpacked" && mkdir -p "$stage/unpacked"
    # shellcheck disable=SC2086 # one piece per line, no blanks in these names
    cat $pieces | "${unxz[@]}" | tar -x -C "$stage/unpacked" || { echo "stage: unpacking failed"; return 1; }
    touch "$stage/unpacked/.unpacked"
    echo "stage: unpacked $(du -sh "$stage/unpacked" | cut -f1) in $((SECONDS - t0)) s"
  fi
  if [ -f "$(dirname "$manifest")/data.tar" ] && [ ! -f "$data/.unpacked" ]; then
    mkdir -p "$data" && tar -x -C "$data" -f "$(dirname "$manifest")/data.tar" && touch "$data/.unpacked" &&
      echo "stage: data set in $data ($(du -sh "$data" | cut -f1))"
  fi
}
if ls "$stage"/p*/site.txz.* >/dev/null 2>&1 && { [ "$part" = unpack ] || ! python3 -c "import nvidia.dali" 2>/dev/null; }; then
  unpack_stage || exit 2
  export PYTHONPATH=$(cd "$stage/unpacked" && pwd):$PYTHONPATH
elif ! python3 -c "import nvidia.dali" 2>/dev/null && ls .stage/p*/part.* >/dev/null 2>&1; then  # stage-dali.sh's wheels
  if [ ! -d .stage/site/nvidia/dali ]; then
    mkdir -p .stage/whl && cat .stage/p*/part.* | tar -x -C .stage/whl &&
      python3 -m pip install -q --no-index --no-deps --target .stage/site .stage/whl/*.whl .whl/*.whl 2>&1 | tail -2
  fi
  export PYTHONPATH=$root/.stage/site:$PYTHONPATH
fi
if ! python3 -c "import imageio_ffmpeg" 2>/dev/null && [ -f .ffm/ffmpeg.xz ]; then
  [ -x /tmp/ffmpeg ] || python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.ffm/ffmpeg.xz'), open('/tmp/ffmpeg', 'wb'))"
  chmod +x /tmp/ffmpeg
  export IMAGEIO_FFMPEG_EXE=/tmp/ffmpeg PYTHONPATH=$root/.ffm/site:$PYTHONPATH
fi
[ "$part" = unpack ] && exit 0

# -- run one step with a time limit; its log goes to OUTDIR, its tail to the console ------------------------------
# The whole suite stays within BUDGET seconds (default 590: a 10-minute call; the headline's 360): each step's
# limit is cut to what is left, and a step with under 15 s left is skipped and said so. `last_rc` is the step's
# exit status (124: its time limit); `after_step`, when defined, runs after every step.
budget=${BUDGET:-590}
[ "$part" = headline ] && budget=${BUDGET:-360}
last_rc=0
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((budget - SECONDS)) dmon=""
  if [ "$left" -lt 15 ]; then echo "=== $name: skipped, ${left}s left of the ${budget}s budget"; last_rc=124; return; fi
  limit=$((limit * ${LIMIT_SCALE:-1}))  # the CPU rehearsal's steps are slower than the GPU sizes assume
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  if command -v nvidia-smi >/dev/null 2>&1; then  # engine use while the step runs, one sample a second
    nvidia-smi dmon -s u -d 1 >"$out/$name.dmon.log" 2>&1 &
    dmon=$!
  fi
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  if [ -n "$dmon" ]; then
    kill "$dmon" 2>/dev/null; wait "$dmon" 2>/dev/null
    python3 -m bench.gpu_util summarize "$out/$name.dmon.log" --step "$name" --json "$out/$name.json" \
      --summary "$out/gpu_util.json"
  fi
  echo "--- $name: rc=$rc in $((SECONDS - t0))s"
  tail -n "${TAIL:-12}" "$out/$name.log"
  last_rc=$rc
  if declare -F after_step >/dev/null; then after_step "$name"; fi
}

if [ "$part" = headline ]; then
  # shellcheck source=bench/gpu_headline.sh
  source bench/gpu_headline.sh
  exit "$headline_rc"
fi

cores=$(nproc)
if [ "$part" = all ] || [ "$part" = checks ]; then
  step env 60 python3 -m bench.gpu_env --out "$out/env.json"
  step tests_gpu 150 python3 -m pytest -q -p no:cacheprovider tests/test_pipeline_gpu.py tests/test_model_fused_loss.py
  step tests_gpu_strategies 150 python3 -m pytest -q -p no:cacheprovider tests/test_pipeline_strategies.py \
    tests/test_train_step_options.py -k "gpu or cuda_graph_step_equals"
fi
# The carried sets are small (96 videos): read each 8 times per epoch so that per-epoch costs (DALI builds a
# pipeline per epoch) weigh as on a real dataset, not every few batches.
repeat=8
ntar=$(ls "$data/vp9c4"/train-*.tar | wc -l); range="{000000..$(printf %06d $((ntar - 1)))}"
cut_repeated="$data/vp9c4/train-{$(printf "$range,%.0s" $(seq $repeat) | sed 's/,$//')}.tar"
layouts="timeline=$data/vp9,phases4=$data/vp9p4,cut4=$data/vp9c4"
if [ "$part" = all ] || [ "$part" = decode ]; then
  step decode_layouts 60 python3 -m bench.bench_decode --device gpu --shards "$layouts" \
    --threads "$cores" --batch-size 32 --batches 8 --rounds 2 --out "$out/decode_layouts.json"
  # G:C[:threads of all pipelines[:pipelines]], or auto; pipelines and auto after the single-pipeline strategies
  step pipeline_decode 260 python3 -m bench.bench_pipeline --device gpu --shards "cut4=$data/vp9c4" \
    --layouts cut4 --shard-repeat $repeat --batch-size 32 --cores "$cores" --batches 10 --warmup 2 --repeats "" \
    --sweep "" --baselines "" --out "$out/pipeline_decode.json" --decode-sweep \
    "1:0,1:0:$((2 * cores)),2:0,4:0,1:1,2:1,3:2,4:3,1:0:$cores:2,1:0:$cores:4,2:0:$cores:2,2:1:$cores:2,auto"
  step pipeline_decode_phases 140 python3 -m bench.bench_pipeline --device gpu --shards "phases4=$data/vp9p4" \
    --layouts phases4 --shard-repeat $repeat --batch-size 32 --cores "$cores" --batches 10 --warmup 2 \
    --repeats "" --sweep "" --baselines "" --decode-sweep "1:0,4:0,1:1,3:2,1:0:$cores:2" \
    --out "$out/pipeline_decode_phases.json"
fi
if [ "$part" = all ] || [ "$part" = model ]; then
  step model_step 540 python3 -m bench.bench_model --device cuda --kinds pretrain --batch 64 --steps 20 --warmup 5 \
    --variants "fused-bf16,fused-bf16-graphstep,fused-bf16-compile,fused-bf16-compile-graphstep,\
fused-bf16-compile-flash,fused-bf16-compile-cudnn,fused-bf16-compile-decmask,fused-bf16-compile-graphstep-decmask,\
fused-bf16-compile-autotune" --out "$out/model_step.json"
fi
if [ "$part" = all ] || [ "$part" = train ]; then
  step train_saturation 220 python3 -m bench.bench_train --config configs/pretrain_vitb_k400.yaml --steps 60 \
    --log-interval 10 --warmup 2 --out "$out/train_saturation.json" data.train="$cut_repeated" data.batch_size=16
fi
if [ "$part" = all ] || [ "$part" = pipeline ]; then
  step pipeline_vp9 170 python3 -m bench.bench_pipeline --device gpu --shards "timeline=$data/vp9,cut4=$data/vp9c4" \
    --layouts timeline,cut4 --shard-repeat $repeat --batch-size 32 --cores "$cores" --batches 12 --warmup 2 \
    --sweep 4 --out "$out/pipeline_vp9.json"
fi
if [ "$part" = all ] || [ "$part" = h264 ]; then
  step pipeline_h264 120 python3 -m bench.bench_pipeline --device gpu --shards "timeline=$data/h264" --shard-repeat $repeat \
    --batch-size 32 --cores "$cores" --batches 12 --warmup 2 --sweep "" --out "$out/pipeline_h264.json"
fi
echo "=== results in $out"
