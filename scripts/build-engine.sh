#!/usr/bin/env bash
# Configures and builds the native engine into engine/build (Release). Fails loudly.
# Binary: engine/build/llm-engine; tests: ctest --test-dir engine/build --output-on-failure
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S engine -B engine/build -DCMAKE_BUILD_TYPE=Release --log-level=WARNING >/dev/null
cmake --build engine/build -j"${ENGINE_BUILD_JOBS:-2}"
echo "build-engine: engine/build/llm-engine"
