#!/usr/bin/env bash
# Stages what the offline GPU machine lacks for `bash bench/gpu.sh headline` into the fewest device calls: DALI and
# the small packages it and the headline need, as one xz stream split over .stage/p0 .. .stage/pN (git-ignored),
# the headline data set riding in the last part. Run from the checkout whose working tree the device calls carry.
# Each call carries at most PACK_MIB (58) MiB with the tree, leaving 6 MiB for the tree to grow before `check`, which
# refuses any call above 62 MiB (the 64 MiB limit less a 2 MiB margin), asks for a fresh `pack`.
#
#   bash bench/stage_gpu.sh [download|pack|check|verify|all]        (default all: download, pack, check)
#
#   download  .stage/dl: the wheels, for the GPU machine's Python 3.12 on x86-64 (pip download --only-binary
#             --platform manylinux..., pinned below); .stage/site: them installed there (pip install --target,
#             --no-deps, same platform), less what never runs there: nvidia/dali/include (17 MB of C++ headers),
#             the extension modules DALI ships for Pythons other than 3.12 (cpython-310/311/313/314/315), bin/,
#             __pycache__. No ffmpeg (imageio-ffmpeg: ~45 MB of the stream): the GPU check of step 2
#             (tests/test_pipeline_gpu.py) reads its test clips pre-built in the data set (testshards/, made by
#             `bash bench/gpu_data.sh headline`; $PIPELINE_TEST_SHARDS, tests/pipeline_shards.py).
#   pack      tar .stage/site | xz -9 (multi-threaded: blocks that the GPU machine decompresses in parallel)
#             -> split so that every call (part + the working tree) carries the same, at most PACK_MIB, in the
#             fewest calls; the data set (DATA, default .gpu/data/headline, built by `bash bench/gpu_data.sh
#             headline`) as data.tar in the last part, and a manifest (stage.txt: each piece's name, size and
#             sha256) that gpu.sh checks before unpacking.
#   check     per call: the part's size + the working tree's (tracked and untracked-not-ignored files of TREE,
#             default this checkout) against LIMIT_MIB - MARGIN_MIB; exit 1 with one line per call over it.
#   verify    unpack the parts into a temporary folder and, with a Python 3.12 (VERIFY_PYTHON, default
#             python3.12 or pyenv's 3.12), import nvidia.dali from the unpacked site and run a tiny CPU DALI
#             pipeline that decodes one clip of the data set (numpy for that Python is downloaded to .stage/verify,
#             which is never carried).
#
# Environment: DATA (data set folder), TREE (the checkout whose tree travels), STAGE (default .stage), SITE (the tree
# to pack, default STAGE/site), PART_BYTES (force a piece size; default: the fewest equal calls that fit PACK_MIB),
# XZ_THREADS (default: all cores), LIMIT_MIB (default 64), MARGIN_MIB (default 2), PACK_MIB (default 58).
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
what=${1:-all}
stage=${STAGE:-.stage}
site=${SITE:-$stage/site}
data=${DATA:-.gpu/data/headline}
tree=${TREE:-$root}
limit_mib=${LIMIT_MIB:-64}
margin_mib=${MARGIN_MIB:-2}
pack_mib=${PACK_MIB:-58}
MiB=1048576
grep -qxF '/.stage/' .gitignore 2>/dev/null || grep -qxF '/.stage/' .git/info/exclude 2>/dev/null ||
  echo '/.stage/' >> "$(git rev-parse --git-path info/exclude)"

# the GPU machine: x86-64, CPython 3.12, glibc >= 2.28 (manylinux_2_28)
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# DALI's video path needs neither nvimgcodec nor nvcomp (../shared/offline-gpu/README.md), so its dependencies are
# listed by hand, at the versions this project's venv runs. libcst and nvtx are left out too (~5 MB of the stream):
# only DALI's experimental dynamic mode and its PyTorch proxy import them, never this project (checked: neither is
# in sys.modules after a loader's first batch and training's imports). The machine has numpy, six, packaging,
# PyYAML, typing extensions, torch, timm, safetensors, tqdm, tensorboard (bench/gpu_env.py records what it found).
wheels=(nvidia-dali-cuda130==2.4.0 astunparse==1.6.3 gast==0.7.0 optree==0.20.0 makefun==1.16.0 webdataset==1.0.2
  braceexpand==0.1.7 ${EXTRA_WHEELS:-})

tree_bytes() {  # what a device call sends besides its carried paths
  (cd "$tree" && { git ls-files -z --cached; git ls-files -z --others --exclude-standard; } |
    xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
}

download() {
  rm -rf "$stage/dl" && mkdir -p "$stage/dl"
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$stage/dl" "${wheels[@]}"
  rm -rf "$site"
  python3 -m pip install -q --no-deps --no-compile "${plat[@]}" --target "$site" "$stage"/dl/*.whl
  local dali=$site/nvidia/dali
  rm -rf "$dali/include" "$site/bin"
  find "$site" -name '*.cpython-3*' ! -name '*.cpython-312-*' ! -name '*.cpython-312.*' -delete
  find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
  touch "$stage/site.stamp"
  echo "site: $(du -sb "$site" | cut -f1) bytes unpacked ($(du -sh "$site" | cut -f1)), DALI $(du -sh "$dali" | cut -f1)"
}

compress() {  # .stage/site.txz, made again only when the site is newer (xz -9 of ~600 MB takes minutes)
  if [ -f "$stage/site.stamp" ] && [ "$stage/site.txz" -nt "$stage/site.stamp" ]; then
    echo "reusing $stage/site.txz"; return
  fi
  local t0=$SECONDS
  tar -C "$site" --sort=name --owner=0 --group=0 -cf - . | xz -9 -T"${XZ_THREADS:-0}" >"$stage/site.txz.tmp"
  mv "$stage/site.txz.tmp" "$stage/site.txz"
  echo "xz -9 -T${XZ_THREADS:-0}: $((SECONDS - t0)) s for $(du -sb "$site" | cut -f1) bytes -> $(stat -c %s "$stage/site.txz")"
}

pack() {
  [ -d "$site" ] || { echo "stage_gpu: no $site (run: bash bench/stage_gpu.sh download)"; exit 2; }
  [ -d "$data/timeline" ] && [ -d "$data/cut4" ] ||
    { echo "stage_gpu: no data set in $data (run: bash bench/gpu_data.sh headline $data)"; exit 2; }
  rm -rf "$stage"/p[0-9]* "$stage/pack" && mkdir -p "$stage/pack"
  compress
  cp "$stage/site.txz" "$stage/pack/site.txz"
  tar -C "$data" --owner=0 --group=0 -cf "$stage/pack/data.tar" .
  local site_b data_b tree_b room n chunk
  site_b=$(stat -c %s "$stage/pack/site.txz"); data_b=$(stat -c %s "$stage/pack/data.tar"); tree_b=$(tree_bytes)
  room=$((pack_mib * MiB - tree_b - 4096))  # what one call may carry besides the tree
  if [ -n "${PART_BYTES:-}" ]; then
    chunk=$PART_BYTES
  else  # the fewest calls, all carrying the same: n pieces of the stream, the data set added to the last
    n=$(((site_b + data_b + room - 1) / room))
    while :; do
      chunk=$(((site_b + data_b + n - 1) / n))
      [ $(((n - 1) * chunk)) -ge "$site_b" ] && chunk=$(((site_b + n - 1) / n))  # a data set larger than a piece
      [ $((site_b - (n - 1) * chunk + data_b)) -le "$room" ] && [ "$chunk" -le "$room" ] && break
      n=$((n + 1))
    done
  fi
  split -b "$chunk" -d -a 2 "$stage/pack/site.txz" "$stage/pack/site.txz."
  local i=0 pieces=("$stage"/pack/site.txz.[0-9][0-9])
  for f in "${pieces[@]}"; do mkdir -p "$stage/p$i"; mv "$f" "$stage/p$i/"; i=$((i + 1)); done
  local last=$stage/p$((i - 1))
  mv "$stage/pack/data.tar" "$last/"
  # the manifest: every piece's sha256, so that gpu.sh can name a missing or damaged part before unpacking anything
  (cd "$stage" && sha256sum p*/site.txz.* p*/data.tar) >"$last/stage.txt"
  rm -rf "$stage/pack"
  echo "staged ${#pieces[@]} parts (tree $tree_b bytes, at most $pack_mib MiB per call with it):"
  check
}

check() {  # every call's part + the tree within LIMIT_MIB - MARGIN_MIB, else exit 1 naming each call over it
  local tree_b part_b total allowed over=() p
  tree_b=$(tree_bytes); allowed=$(((limit_mib - margin_mib) * MiB))
  ls -d "$stage"/p[0-9]* >/dev/null 2>&1 || { echo "stage_gpu: no parts in $stage (run: bash bench/stage_gpu.sh)"; exit 2; }
  for p in "$stage"/p[0-9]*; do
    part_b=$(du -sb "$p" | cut -f1); total=$((part_b + tree_b))
    printf '  %-10s %10d bytes (%5.1f MiB) + tree %8d = %5.1f MiB of %d (at most %d: a %d MiB margin)\n' "$p" \
      "$part_b" "$(echo "$part_b / $MiB" | bc -l)" "$tree_b" "$(echo "$total / $MiB" | bc -l)" "$limit_mib" \
      "$((limit_mib - margin_mib))" "$margin_mib"
    [ "$total" -le "$allowed" ] || over+=("$p: $total bytes")
  done
  if [ "${#over[@]}" -gt 0 ]; then
    for p in "${over[@]}"; do
      echo "stage_gpu: CALL TOO LARGE: $p with the tree, over the $((limit_mib - margin_mib)) MiB allowed" \
        "($limit_mib MiB per call less a $margin_mib MiB margin): run bash bench/stage_gpu.sh pack again" >&2
    done
    exit 1
  fi
}

verify() {
  local py=${VERIFY_PYTHON:-}
  [ -n "$py" ] || py=$(ls "$HOME"/.pyenv/versions/3.12*/bin/python3 2>/dev/null | head -1 || command -v python3.12 || true)
  [ -n "$py" ] || { echo "stage_gpu verify: no Python 3.12 here (set VERIFY_PYTHON)"; exit 2; }
  local tmp; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' RETURN
  (cd "$stage" && sha256sum -c --quiet "$(ls -d p[0-9]* | sort -V | tail -n 1)/stage.txt")
  local t0=$SECONDS
  mkdir -p "$tmp/site" "$tmp/data"
  cat "$stage"/p*/site.txz.* | xz -dc -T0 | tar -x -C "$tmp/site"
  tar -x -C "$tmp/data" -f "$(ls "$stage"/p*/data.tar)"
  echo "unpacked in $((SECONDS - t0)) s: site $(du -sh "$tmp/site" | cut -f1), data $(du -sh "$tmp/data" | cut -f1)"
  # what the GPU machine has and the staged site leaves out, for this check only (never carried)
  [ -d "$stage/verify/numpy" ] || "$py" -m pip install -q --no-deps --only-binary=:all: --target "$stage/verify" \
    numpy==2.4.6 typing_extensions==4.15.0 six==1.17.0 packaging==25.0
  # the data set's first clip and the GPU check's pre-built test shards (step 2 reads them: no ffmpeg there)
  PYTHONPATH="$tmp/site:$stage/verify" "$py" - "$tmp/data/cut4" "$tmp/data/testshards/gpu_train_p4_ivf" <<'EOF'
import glob, sys, tarfile
import numpy as np
import nvidia.dali as dali
from nvidia.dali import fn
for folder in sys.argv[1:]:
    tar = sorted(glob.glob(folder + "/*.tar"))[0]
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name.endswith((".ivf", ".0.ivf", ".mp4")))
        clip = t.extractfile(member).read()
    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        data = fn.external_source(source=lambda: [np.frombuffer(clip, dtype=np.uint8)], batch=True)
        return fn.decoders.video(data, device="cpu")
    pipe = decode()
    pipe.build()
    (frames,) = pipe.run()
    print(f"nvidia.dali {dali.__version__} from {dali.__file__}; CPU decode of {tar}:{member.name}: frames "
          f"{frames.as_array().shape}")
EOF
}

case $what in
  download) download ;;
  pack) pack ;;
  compress) compress ;;
  check) check ;;
  verify) verify ;;
  all) download; pack ;;
  *) echo "usage: bash bench/stage_gpu.sh [download|compress|pack|check|verify|all]"; exit 2 ;;
esac
