# The headline run, sourced by `bash bench/gpu.sh headline [OUTDIR]` (after the stage is unpacked; `step` and
# `budget` come from gpu.sh). Three numbers in one device window: decoded clips/s per GPU, end-to-end saturation,
# MFU. Within BUDGET (default 360 s of command time on an H200, 16 cores), in the issue's order:
#   1. env, nvdec      machine facts and ceilings (bench.gpu_env); NVDEC: libnvcuvid loads and one whole video of
#                      each layout decoded by DALI on NVDEC equals the CPU decoder's frames (bench.headline nvdec).
#                      Without NVDEC the run says so in one line and step 3 decodes on CPU threads with GPU
#                      augmentation instead of stopping.
#   2. check           tests/test_pipeline_gpu.py narrowed to the cut IVF layout on NVDEC (-k below): the same
#                      batches and frames as the CPU backend; the loader's fallback, if it triggers, named in the log.
#                      Its clips come pre-built with the data set (DATA/testshards: the machine has no ffmpeg)
#   3. decode_old      the old configuration: timeline MP4, 1 pipeline, NVDEC, all cores (as on the H100, 2026-11-25)
#      decode_new1..3  cut IVF (the default layout) with three strategies chosen from the CPU-side figures
#                      (bench/RESULTS.md): 4 pipelines of cores/4 threads on NVDEC (one pipeline kept about one of
#                      the GPU's NVDEC engines busy); a hybrid, 2 pipelines of cores/2 threads each decoding half of
#                      its rows on NVDEC and half on CPU threads (16 threads at ~25 clips/s per core at 320 px
#                      against NVDEC's estimated ~200 per engine on cut clips: about equal shares); decode=auto.
#                      Each at K = 2, one process per strategy so that bench.gpu_util gives each its own SM and
#                      NVDEC use; decode_summary.json holds the runs and the gain (best new / old), one run.
#   4. train           bench.bench_train, the published recipe (configs/pretrain_vitb_k400.yaml: ViT-B, compiled
#                      blocks, bf16, K = 2, BATCH videos per step) fed by step 3's fastest strategy on the cut
#                      layout, against the same train.py run on in-memory batches (data.source=synthetic,
#                      synthetic_in_memory): clips/s, data wait, saturation, MFU of both sides
#   then headline.json and headline.md (the three numbers), rewritten after every step.
# Decoder masking (another objective) is not run here.
#
# Parameters (environment), GPU sizes by default; the CPU rehearsal (tests/test_bench_gpu_headline.py) sets
#   DEVICE=cpu MODEL=tiny BATCH=4 BATCHES=2 WARMUP=1 STEPS=4 LOG_INTERVAL=2 TRAIN_WARMUP=1 INPUT=32 THREADS=4 ...
#   DEVICE        gpu (default where nvidia-smi answers) | cpu: the CPU backend, NVDEC never tried
#   MODEL         base (the recipe) | tiny (a 1-block 64-wide ViT, blocks not compiled: a CPU can run it)
#   BATCH         videos per batch (default 32, the recipe's per-GPU batch; x K = 2 clips)
#   BATCHES       timed batches per decoding run (default 10), after WARMUP (default 2)
#   STEPS         training steps per side (default 60), LOG_INTERVAL steps per window (10), TRAIN_WARMUP windows
#                 discarded (2: start-up and compilation)
#   DATA          the data set (default .gpu/data/headline: bench/gpu_data.sh headline), timeline/ and cut4/
#   REPEAT        each shard list read REPEAT times per epoch (default 128: epochs of 28 batches of 32, not a few)
#   THREADS       CPU threads of every run (default nproc), split between a strategy's pipelines (G:C:THREADS:P:
#                 P pipelines of THREADS // P), INPUT crop size (default 224), BUDGET seconds (default 360),
#                 LIMIT_SCALE times each step's own limit (default 1; the rehearsal's steps are slower on a CPU)
#   NEW           the strategies of step 3 (default below), PEAK_TFLOPS for MFU where the GPU is not listed (the
#                 rehearsal sets 1 so that the field exists)
#   PACK_TO       a folder (the device call's $OUT): headline.tgz (OUTDIR's files), headline.json and headline.md
#                 copied there after every step (a device call brings back at most 8 files)
device=${DEVICE:-$(nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)}
model=${MODEL:-base}
batch=${BATCH:-32}; batches=${BATCHES:-10}; warmup=${WARMUP:-2}
steps=${STEPS:-60}; log_interval=${LOG_INTERVAL:-10}; train_warmup=${TRAIN_WARMUP:-2}
repeat=${REPEAT:-128}; cores=${THREADS:-$(nproc)}; input=${INPUT:-224}
headline_rc=0

after_step() {  # the summary, and what a device call brings back, after every step
  python3 -m bench.headline summary "$out" >/dev/null || headline_rc=1
  if [ -n "${PACK_TO:-}" ]; then
    mkdir -p "$PACK_TO"
    tar -czf "$PACK_TO/.headline.tgz.tmp" -C "$out" . && mv "$PACK_TO/.headline.tgz.tmp" "$PACK_TO/headline.tgz"
    cp "$out/headline.json" "$out/headline.md" "$PACK_TO/" 2>/dev/null
  fi
}
need() {  # a step's JSON must exist: a missing one fails the run (exit 1) but not the steps after it
  [ -f "$out/$1" ] || { echo "headline: $1 missing (step failed, see $out/${1%.json}.log)"; headline_rc=1; }
}
for layout in timeline cut4; do
  [ -f "$data/$layout/manifest.json" ] ||
    { echo "headline: no $data/$layout (build it: bash bench/gpu_data.sh headline $data)"; exit 2; }
done
echo "headline: device $device, model $model, batch $batch, $cores cores, data $data, budget ${budget}s"

# 1. machine facts, NVDEC
step env 45 python3 -m bench.gpu_env --out "$out/env.json"
need env.json
step nvdec 45 python3 -m bench.headline nvdec --shards "timeline=$data/timeline,cut4=$data/cut4" --device "$device" \
  --out "$out/nvdec.json"
need nvdec.json
nvdec=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1])).get('nvdec', False))" "$out/nvdec.json" \
  2>/dev/null || echo False)
if [ "$device" = gpu ] && [ "$nvdec" != True ]; then
  echo "headline: NVDEC is not reachable here (nvdec.json): decoding on CPU threads, augmenting on the GPU"
  old=1:1; new=${NEW:-1:1:$cores:4,2:2:$cores:2,auto}
else
  old=1:0; new=${NEW:-1:0:$cores:4,2:1:$cores:2,auto}
fi

# 2. one GPU check: cut IVF on NVDEC = the CPU backend (skipped by pytest without CUDA; rc 5 if -k selects nothing),
# on the test clips pre-built in the data set (no ffmpeg on the GPU machine; tests/pipeline_shards.py)
export PIPELINE_TEST_SHARDS=$data/testshards
if [ -f "$PIPELINE_TEST_SHARDS/gpu_train_p4_ivf/manifest.json" ]; then
  echo "headline: the GPU check reads its test clips pre-built in $PIPELINE_TEST_SHARDS"
else
  echo "headline: no pre-built test clips in $PIPELINE_TEST_SHARDS (bash bench/gpu_data.sh headline makes them):" \
    "the GPU check encodes its own, which needs ffmpeg"
fi
step check 90 python3 -m pytest -q -p no:cacheprovider tests/test_pipeline_gpu.py \
  -k "reads_stride_phase_shards and nvdec-ivf" --junit-xml="$out/check.xml" -o log_cli=true --log-cli-level=WARNING
python3 -m bench.headline check --junit "$out/check.xml" --log "$out/check.log" --rc "$last_rc" --out "$out/check.json"
need check.json
[ "$last_rc" = 0 ] || { echo "headline: the GPU check failed (rc $last_rc), see check.log"; headline_rc=1; }
after_step check

# 3. decoding, K = 2: the old configuration, then the new strategies on the cut layout
decode() {  # STEP LAYOUT SPEC
  step "$1" "$4" python3 -m bench.bench_pipeline --device "$device" --shards "$2=$data/$2" --layouts "$2" \
    --shard-repeat "$repeat" --batch-size "$batch" --cores "$cores" --batches "$batches" --warmup "$warmup" \
    --input-size "$input" --repeats "" --sweep "" --baselines "" --decode-sweep "$3" --decode-sweep-k 2 \
    --out "$out/$1.json"
  need "$1.json"
}
decode decode_old timeline "$old" 50
i=0
for spec in ${new//,/ }; do
  i=$((i + 1))
  decode "decode_new$i" cut4 "$spec" "$([ "${spec%%:*}" = auto ] && echo 90 || echo 50)"
done
python3 -m bench.headline decode "$out" && after_step decode_summary

# 4. end to end: the recipe fed by the fastest strategy, against in-memory batches
best=$(python3 -m bench.headline best "$out/decode_summary.json")
[ -n "$best" ] || { echo "headline: no decoding run finished; training with the configured strategy"; }
ntar=$(ls "$data/cut4"/train-*.tar | wc -l); range="{000000..$(printf %06d $((ntar - 1)))}"
cut_repeated="$data/cut4/train-{$(printf "$range,%.0s" $(seq "$repeat") | sed 's/,$//')}.tar"
sizes=(data.batch_size="$batch" data.input_size="$input")
if [ "$model" = tiny ]; then
  sizes+=(model.name=small model.overrides.depth=1 model.overrides.embed_dim=64 model.overrides.num_heads=2
    model.overrides.decoder_embed_dim=32 model.overrides.decoder_depth=1 model.overrides.decoder_num_heads=1
    model.overrides.compile_blocks=false)
fi
[ -n "${PEAK_TFLOPS:-}" ] && sizes+=(run.peak_tflops="$PEAK_TFLOPS")
# shellcheck disable=SC2086 # $best: overrides, one word each
step train 200 python3 -m bench.bench_train --config configs/pretrain_vitb_k400.yaml --steps "$steps" \
  --log-interval "$log_interval" --warmup "$train_warmup" --out "$out/train.json" data.train="$cut_repeated" \
  "${sizes[@]}" $best
need train.json
echo "=== headline ($out/headline.md)"
cat "$out/headline.md"
