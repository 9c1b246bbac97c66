#!/usr/bin/env bash
# Builds llm-engine, cuda_tests and engine_tests with CUDA HERE (nvcc 13, sm_90a; the CUDA
# runtime linked statically) into <repo>/.device-bin/ (gitignored), with the one runtime
# library the device image may lack beside them (lib/libgomp.so.1). run-on-device.sh then
# skips its build step (BENCH_PREBUILT=.device-bin; carry: [".device-deps", ".device-bin"]),
# which saves the device's time for the tests and benchmarks.
#
#   bash bench/engine/build-device-bin.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=.device-build
DEST=.device-bin
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || { echo "build-device-bin: no nvcc here" >&2; exit 2; }
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="$PATH:/usr/local/cuda/bin"
cmake -S engine -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DENGINE_CUDA=ON >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target llm-engine cuda_tests engine_tests
rm -rf "$DEST"
mkdir -p "$DEST/lib"
cp "$BUILD/llm-engine" "$BUILD/cuda_tests" "$BUILD/engine_tests" "$DEST/"
gomp=$(ldd "$DEST/llm-engine" | awk '/libgomp.so.1/ {print $3}')
[ -n "$gomp" ] && cp -L "$gomp" "$DEST/lib/"
if ldd "$DEST/llm-engine" | grep -q libcudart; then echo "build-device-bin: llm-engine links a shared CUDA runtime" >&2; exit 1; fi
git rev-parse HEAD >"$DEST/COMMIT" 2>/dev/null || true
echo "build-device-bin: $(du -sh "$DEST" | cut -f1) in $DEST ($(cat "$DEST/COMMIT" 2>/dev/null))"
