#!/usr/bin/env bash
# THE one command on the GPU device machine (H100/H200, no network), from the repo root:
#
#   bash bench/engine/run-on-device.sh [check|bench|all|STEP...]      (carry: [".device-deps"])
#
# With BENCH_PREBUILT=.device-bin (bench/engine/build-device-bin.sh, carried too) the engine
# built here is used and the build step skipped.
#
# Two calls, `check` first (the default), then `bench`: together (`all`) they do not fit one
# call's 570 s. Without .device-deps it stops in its first second and says how to fix it.
#
# Unpacks .device-deps/*.deb (made by fetch-device-deps.sh) under /tmp, builds the engine with
# CUDA, then runs, each step logged and time-boxed, going on after a failure:
#   gpu            nvidia-smi facts + measured copy bandwidth and bf16 matmul rate
#   build          cmake -S engine -B /tmp/build-gpu (CUDA on), -j16
#   cuda_tests     the CUDA kernel tests vs the CPU reference (and engine_tests)
#   sanitize       cuda_tests under compute-sanitizer memcheck, ENGINE_CUDA_SYNC=1 (not in a phase)
#   parity_engines CUDA engine vs CPU engine on small random Llama/Qwen3 checkpoints
#   parity_hf      transformers vs the CUDA engine (logits, bf16 and f32)
#   models_real    random bf16 checkpoints of the real Llama-3.1-8B and Qwen3-0.6B shapes
#   decode_qwen3 / decode_llama8b   batch-1 decode tok/s and MBU at context 512 and 4096
#   decode_llama8b_gemv             the same for Llama-3.1-8B with ENGINE_CUDA_GEMV=1 (the decode
#                                   GEMV instead of cuBLAS for products of <= 8 rows): the A/B
#   w2_engine / w2_hf               nano-vllm workload (Qwen3-0.6B): our engine, HF generate
#   w3_engine      1000 ShareGPT-like requests on Llama-3.1-8B (w3_hf only with BENCH_HF_LLAMA=1)
#   summary        $OUT/summary.json (+ $OUT/logs.txt)
# Phases: check = gpu build cuda_tests parity_engines parity_hf;
#         bench = gpu build models_real decode_qwen3 decode_llama8b decode_llama8b_gemv w2_engine w2_hf w3_engine;
#         all = both (too long for one call). The whole run stops starting steps at BENCH_BUDGET_S (570 s)
#         after its start: a step that does not fit is recorded as skipped, a long one is cut
#         (the throughput drivers then report a labelled partial result).
# Results: $OUT/summary.json (all step results merged), $OUT/logs.txt, $OUT/build.log.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
HERE=bench/engine
T0=$(date +%s)
BUDGET_S=${BENCH_BUDGET_S:-570}
DEADLINE=$((T0 + BUDGET_S))
OUT=${OUT:-/tmp/bench-out}
W=${BENCH_WORK:-/tmp/bench-work}
MODELS=${BENCH_MODELS:-/tmp/bench-models}
BUILD=${BENCH_BUILD:-/tmp/build-gpu}
PREFIX=${BENCH_DEPS_PREFIX:-/tmp/device-deps}
DEV=${BENCH_DEVICE:-cuda:0}
GPU_UTIL=${BENCH_GPU_UTIL:-0.9}
JOBS=${BENCH_JOBS:-16}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$W/results" "$W/logs" "$MODELS"
rm -f "$W"/results/*.json "$W/steps.jsonl" "$W"/logs/*.log

log() { echo "[run-on-device +$(($(date +%s) - T0))s] $*"; }
record() { # name status rc seconds [note]
  printf '{"name":"%s","status":"%s","rc":%s,"seconds":%s,"note":"%s"}\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$W/steps.jsonl"
}

# run_step NAME MIN_LEFT_S CAP_S CMD...: runs CMD with a timeout of min(CAP, time left - 10),
# unless less than MIN_LEFT_S is left. STEP_DEADLINE_EPOCH tells the Python drivers when to stop.
run_step() {
  local name=$1 min=$2 cap=$3
  shift 3
  local now left t rc start
  now=$(date +%s)
  left=$((DEADLINE - now))
  if [ "$left" -lt "$min" ]; then
    log "$name: SKIPPED (${left}s left, needs ${min}s)"
    record "$name" skipped_no_time null 0
    return 0
  fi
  t=$((left - 10))
  [ "$t" -gt "$cap" ] && t=$cap
  export STEP_DEADLINE_EPOCH=$((now + t - 15))
  if declare -F "$1" >/dev/null; then set -- bash -c '"$@"' _ "$@"; fi  # timeout runs programs only
  log "$name: start (limit ${t}s)"
  start=$(date +%s)
  timeout -k 10 "$t" "$@" >"$W/logs/$name.log" 2>&1
  rc=$?
  local secs=$(($(date +%s) - start)) status=ok
  [ $rc -ne 0 ] && status=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timed_out
  record "$name" "$status" "$rc" "$secs"
  log "$name: $status (rc=$rc, ${secs}s)"
  tail -n 4 "$W/logs/$name.log" | sed 's/^/    /'
  unset STEP_DEADLINE_EPOCH
  return 0
}

# ------------------------------------------------------------------------------- deps
setup_deps() {
  local debs=("$REPO"/.device-deps/*.deb)
  if [ ! -e "${debs[0]}" ]; then
    if [ "${BENCH_SYSTEM_DEPS:-0}" = 1 ]; then
      log "deps: no .device-deps/*.deb; BENCH_SYSTEM_DEPS=1: using the system's"
      return 0
    fi
    # The device machine has no libzmq/OpenBLAS headers and no network: without the carried
    # .debs the build fails minutes later. Say so now.
    echo "run-on-device: .device-deps/*.deb is missing. Fix: run 'bash bench/engine/fetch-device-deps.sh'" \
      "on the build machine, then call the device run with carry: [\".device-deps\"]" \
      "(or set BENCH_SYSTEM_DEPS=1 where libzmq and OpenBLAS are installed)." >&2
    exit 2
  fi
  rm -rf "$PREFIX"
  mkdir -p "$PREFIX/root" "$PREFIX/lib" "$PREFIX/pkgconfig" "$PREFIX/bin"
  for f in "${debs[@]}"; do
    if command -v dpkg-deb >/dev/null 2>&1; then
      dpkg-deb -x "$f" "$PREFIX/root"
    else
      python3 "$HERE/unpack_deb.py" "$f" "$PREFIX/root"
    fi
  done
  local libdirs=("$PREFIX/root/usr/lib/x86_64-linux-gnu" "$PREFIX/root/lib/x86_64-linux-gnu"
    "$PREFIX/root/usr/lib/x86_64-linux-gnu/openblas-pthread")
  local sys_libs
  sys_libs=$(ldconfig -p 2>/dev/null | awk '{print $1}' | sort -u)
  local d so base
  for d in "${libdirs[@]}"; do
    [ -d "$d" ] || continue
    for so in "$d"/*.so.*; do
      [ -e "$so" ] || continue
      base=$(basename "$so")
      case "$base" in
        libzmq.so.*|libopenblas*|libpkgconf.so.*) ;;                       # always ours
        *) if grep -qx "$base" <<<"$sys_libs"; then continue; fi ;;           # the system has it
      esac
      ln -sf "$so" "$PREFIX/lib/$base"
    done
  done
  ln -sf libzmq.so.5 "$PREFIX/lib/libzmq.so"
  ln -sf libopenblas.so.0 "$PREFIX/lib/libopenblas.so"
  local inc=$PREFIX/root/usr/include
  cat >"$PREFIX/pkgconfig/libzmq.pc" <<EOF
Name: libzmq
Description: 0MQ c++ library (unpacked from .device-deps)
Version: 4.3.4
Libs: -L$PREFIX/lib -lzmq
Cflags: -I$inc
EOF
  cat >"$PREFIX/pkgconfig/openblas.pc" <<EOF
Name: openblas
Description: OpenBLAS (pthread variant, unpacked from .device-deps)
Version: 0.3.21
Libs: -L$PREFIX/lib -lopenblas
Cflags: -I$inc/x86_64-linux-gnu/openblas-pthread
EOF
  if ! command -v pkg-config >/dev/null 2>&1; then
    cat >"$PREFIX/bin/pkg-config" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$PREFIX/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$PREFIX/root/usr/bin/pkgconf" "\$@"
EOF
    chmod +x "$PREFIX/bin/pkg-config"
  fi
  export PATH="$PREFIX/bin:$PATH"
  export PKG_CONFIG_PATH="$PREFIX/pkgconfig" PKG_CONFIG_LIBDIR="$PREFIX/pkgconfig"
  export CMAKE_PREFIX_PATH="$PREFIX/root/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export CPATH="$inc${CPATH:+:$CPATH}"
  export LIBRARY_PATH="$PREFIX/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export ZMQ_LIB="$PREFIX/lib/libzmq.so.5"
  log "deps: ${#debs[@]} .debs unpacked in $PREFIX; libs linked: $(ls "$PREFIX/lib" | tr '\n' ' ')"
}

find_cmake() {
  if command -v cmake >/dev/null 2>&1; then command -v cmake; return; fi
  local c
  c="$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/cmake"
  [ -x "$c" ] && { echo "$c"; return; }
  echo cmake
}

do_build() {
  local cmake gen=()
  cmake=$(find_cmake)
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${gen[1]:-Unix Makefiles}" "$BUILD/CMakeCache.txt"; then
    rm -rf "$BUILD"
  fi
  echo "cmake: $cmake ($("$cmake" --version | head -1)); nvcc: $(command -v nvcc); g++: $(g++ --version | head -1)"
  echo "pkg-config: $(command -v pkg-config)"
  "$cmake" -S engine -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${gen[@]}" -DENGINE_CUDA="${BENCH_CUDA:-ON}" \
    -DPKG_CONFIG_EXECUTABLE="$(command -v pkg-config)" || return 1
  "$cmake" --build "$BUILD" -j"$JOBS"
}

do_tests() {
  local rc=0
  if [ -x "$BUILD/cuda_tests" ]; then
    "$BUILD/cuda_tests" || rc=$?
    # Again with the decode GEMV on (ENGINE_CUDA_GEMV=1), for its end-to-end cases.
    echo "== cuda_tests with ENGINE_CUDA_GEMV=1"
    ENGINE_CUDA_GEMV=1 "$BUILD/cuda_tests" || rc=$?
  else echo "no $BUILD/cuda_tests"; rc=1; fi
  echo "== engine_tests (CPU)"
  OMP_NUM_THREADS=8 "$BUILD/engine_tests" || rc=$?
  return $rc
}

# The kernel tests under compute-sanitizer (memcheck), with every launch synchronised so a
# fault names its kernel.
do_sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$cs" ]; then echo "no compute-sanitizer on this machine"; return 1; fi
  ENGINE_CUDA_SYNC=1 "$cs" --tool memcheck --error-exitcode 3 "$BUILD/cuda_tests"
}

# BENCH_PREBUILT=DIR (made by build-device-bin.sh, carried): its binaries go into $BUILD and
# the build step is skipped, unless they cannot load here (then the step builds as usual).
# DIR/lib (libgomp) goes last on the library path: the system's own copy wins.
use_prebuilt() {
  local dir=${BENCH_PREBUILT:-}
  [ -n "$dir" ] && [ -x "$dir/llm-engine" ] && [ -x "$dir/cuda_tests" ] || return 1
  mkdir -p "$BUILD" && cp "$dir/llm-engine" "$dir/cuda_tests" "$dir/engine_tests" "$BUILD/" || return 1
  if ldd "$BUILD/llm-engine" "$BUILD/cuda_tests" | grep -q "not found" && [ -d "$dir/lib" ]; then
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$(cd "$dir/lib" && pwd)"
  fi
  if ldd "$BUILD/llm-engine" "$BUILD/cuda_tests" | grep "not found"; then return 1; fi
  log "build: prebuilt binaries from $dir (commit $(cat "$dir/COMMIT" 2>/dev/null || echo unknown))"
}

export -f do_build find_cmake do_tests do_sanitize
export BUILD JOBS HERE BENCH_CUDA="${BENCH_CUDA:-ON}"

peak_bw() { python3 -c "import json; print(json.load(open('$W/results/gpu.json')).get('peak_bw_bytes_per_s') or '')" 2>/dev/null; }
copy_bw() { python3 -c "import json; print(json.load(open('$W/results/gpu.json'))['measured']['copy_bw_bytes_per_s'])" 2>/dev/null; }

ENGINE="$BUILD/llm-engine"
EARGS=(--engine-arg=--gpu-memory-utilization="$GPU_UTIL" --engine-arg=--max-num-batched-tokens=8192)

step() {
  case "$1" in
    gpu) run_step gpu 20 60 python3 $HERE/gpuinfo.py --measure --out "$W/results/gpu.json" ;;
    build)
      if use_prebuilt; then record build prebuilt 0 0 "${BENCH_PREBUILT}"; return 0; fi
      run_step build 60 360 do_build; cp "$W/logs/build.log" "$OUT/build.log" 2>/dev/null ;;
    cuda_tests) run_step cuda_tests 20 240 do_tests ;;
    sanitize) run_step sanitize 30 300 do_sanitize ;;
    parity_engines) run_step parity_engines 30 120 python3 $HERE/parity.py engines --engine "$ENGINE" --device "$DEV" \
      --ref-device cpu --models "$MODELS" --gpu-util 0.3 --log "$W/logs/engine-parity.log" --out "$W/results/parity_engines.json" ;;
    parity_hf) run_step parity_hf 30 150 python3 $HERE/parity.py hf --engine "$ENGINE" --device "$DEV" \
      --models "$MODELS" --gpu-util 0.3 --log "$W/logs/engine-parity-hf.log" --out "$W/results/parity_hf.json" ;;
    models_real) run_step models_real 60 240 sh -c "python3 $HERE/models.py real qwen3-0.6b '$MODELS/qwen3-0.6b' && \
      python3 $HERE/models.py real llama-3.1-8b '$MODELS/llama-3.1-8b'" ;;
    decode_qwen3|decode_llama8b|decode_llama8b_gemv)
      local m=qwen3-0.6b on=()
      [ "$1" != decode_qwen3 ] && m=llama-3.1-8b
      [ "$1" = decode_llama8b_gemv ] && on=(ENGINE_CUDA_GEMV=1)
      local bw cbw extra=()
      bw=$(peak_bw); cbw=$(copy_bw)
      [ -n "$bw" ] && extra+=(--peak-bw "$bw")
      [ -n "$cbw" ] && extra+=(--measured-bw "$cbw")
      run_step "$1" 40 150 env "${on[@]}" python3 $HERE/bench_decode.py --engine "$ENGINE" --model "$MODELS/$m" --device "$DEV" \
        --contexts 512,4096 --steps 64 "${extra[@]}" --engine-arg=--gpu-memory-utilization="$GPU_UTIL" \
        --engine-arg=--max-model-len=8192 --log "$W/logs/engine-$1.log" --out "$W/results/$1.json" ;;
    w2_engine) run_step w2_engine 60 200 python3 $HERE/driver.py --engine "$ENGINE" --model "$MODELS/qwen3-0.6b" \
      --device "$DEV" "${EARGS[@]}" --engine-arg=--max-model-len=4096 --workload nano --max-num-batched-tokens 8192 \
      --max-num-seqs 256 --log "$W/logs/engine-w2.log" --out "$W/results/w2_engine.json" ;;
    w2_hf) run_step w2_hf 60 200 python3 $HERE/hf_bench.py --model "$MODELS/qwen3-0.6b" --workload nano \
      --compile "${BENCH_HF_COMPILE:-off}" --out "$W/results/w2_hf.json" ;;
    w3_engine) run_step w3_engine 60 240 python3 $HERE/driver.py --engine "$ENGINE" --model "$MODELS/llama-3.1-8b" \
      --device "$DEV" "${EARGS[@]}" --engine-arg=--max-model-len=4096 --workload sharegpt --num-seqs 1000 \
      --max-num-batched-tokens 8192 --max-num-seqs 256 --log "$W/logs/engine-w3.log" --out "$W/results/w3_engine.json" ;;
    w3_hf) run_step w3_hf 60 200 python3 $HERE/hf_bench.py --model "$MODELS/llama-3.1-8b" --workload sharegpt \
      --num-seqs 1000 --compile "${BENCH_HF_COMPILE:-off}" --out "$W/results/w3_hf.json" ;;
    *) log "unknown step $1"; record "$1" unknown null 0 ;;
  esac
}

# ------------------------------------------------------------------------------- main
CHECK=(gpu build cuda_tests parity_engines parity_hf)
BENCH=(gpu build models_real decode_qwen3 decode_llama8b decode_llama8b_gemv w2_engine w2_hf w3_engine)
[ "${BENCH_HF_LLAMA:-0}" = 1 ] && BENCH+=(w3_hf)
steps=()
# `all` does not fit one call's budget: the default is `check`; `bench` is a second call.
[ $# -eq 0 ] && set -- check
for a in "$@"; do
  case "$a" in
    all) steps+=("${CHECK[@]}" "${BENCH[@]}") ;;
    check) steps+=("${CHECK[@]}") ;;
    bench) steps+=("${BENCH[@]}") ;;
    *) steps+=("$a") ;;
  esac
done
uniq_steps=()
for s in "${steps[@]}"; do
  case " ${uniq_steps[*]} " in *" $s "*) ;; *) uniq_steps+=("$s") ;; esac
done

[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
setup_deps
log "steps: ${uniq_steps[*]} (budget ${BUDGET_S}s)"
for s in "${uniq_steps[@]}"; do step "$s"; done

# meta + summary (always)
commit=$(git rev-parse HEAD 2>/dev/null || echo "${BENCH_COMMIT:-unknown}")
src_sha=$(find engine/src engine/tests engine/CMakeLists.txt -type f 2>/dev/null | sort | xargs cat 2>/dev/null | sha256sum | cut -c1-16)
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
python3 - "$W/meta.json" <<EOF
import json, platform, sys
json.dump(dict(
    date_utc="$(date -u +%FT%TZ)", git_commit="$commit", git_dirty="$(git status --porcelain 2>/dev/null | wc -l | tr -d ' ')",
    engine_source_sha256_16="$src_sha", gpu="$gpu_name", host=platform.node(), python=platform.python_version(),
    command="bash bench/engine/run-on-device.sh $*", steps_requested="${uniq_steps[*]}".split(),
    budget_s=$BUDGET_S, total_s=$(($(date +%s) - T0)), device_arg="$DEV", gpu_memory_utilization=$GPU_UTIL,
), open(sys.argv[1], "w"), indent=1)
EOF
python3 $HERE/summarize.py "$W" "$OUT/summary.json" >"$W/logs/summary.log" 2>&1 || cat "$W/logs/summary.log"
{
  for f in "$W"/logs/*.log; do
    echo "=================== $(basename "$f")"
    if [ "$(stat -c %s "$f")" -gt 200000 ]; then echo "[... head and tail of a long log ...]"; head -c 60000 "$f"; echo; echo "[...]"; tail -c 120000 "$f"; else cat "$f"; fi
  done
} >"$OUT/logs.txt"
log "done: $OUT/summary.json ($(stat -c %s "$OUT/summary.json" 2>/dev/null) bytes), $OUT/logs.txt"
cat "$W/logs/summary.log"
