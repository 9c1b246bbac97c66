#!/usr/bin/env bash
# Downloads (here, where apt works) the .deb files the GPU device machine needs to BUILD and
# RUN llm-engine, into <repo>/.device-deps/ (gitignored). The device has nvcc, g++, CMake and
# python3 with torch/transformers/safetensors/msgpack, but no libzmq, msgpack-cxx,
# nlohmann-json, OpenBLAS or (perhaps) pkg-config, and no network. run-on-device.sh unpacks
# these with `dpkg -x` under /tmp (never into /) and only puts on the library path the shared
# libraries the device does not already have.
#
#   bash bench/engine/fetch-device-deps.sh        # then carry: [".device-deps"]
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.device-deps

# Runtime roots; their dependencies are resolved below with apt-cache depends --recurse.
RUNTIME_ROOTS=(libzmq5 libopenblas0-pthread pkgconf-bin)
# Build-time packages taken WITHOUT their dependencies: headers, .pc files, the .so symlinks.
# (libzmq3-dev's own -dev dependencies are only for static linking; libmsgpack-cxx-dev's
# libboost-dev is not needed with MSGPACK_NO_BOOST.)
DEV_NODEPS=(libzmq3-dev libmsgpack-cxx-dev nlohmann-json3-dev libopenblas-pthread-dev)
# Present on any glibc-based CUDA image (Ubuntu 22.04/24.04): never carried.
SKIP=(libc6 libgcc-s1 libstdc++6 gcc-12-base libssl3 libssl3t64 libcrypt1 zlib1g debconf)

if ! apt-cache show libzmq5 >/dev/null 2>&1; then
  apt-get update -qq
fi

deps=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances "${RUNTIME_ROOTS[@]}" | grep -v '^ ' | grep -v '^<' | sort -u)
pkgs=()
for p in $deps "${DEV_NODEPS[@]}"; do
  skip=0
  for s in "${SKIP[@]}"; do [ "$p" = "$s" ] && skip=1; done
  [ $skip = 1 ] || pkgs+=("$p")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.deb
( cd "$DEST" && apt-get download "${pkgs[@]}" 2>&1 | grep -v "couldn't be accessed by user '_apt'" || true )

{
  echo "# .deb files for the device machine, fetched $(date -u +%FT%TZ) on $(. /etc/os-release; echo "$PRETTY_NAME")"
  echo "# name version bytes sha256"
  for f in "$DEST"/*.deb; do
    echo "$(dpkg-deb -f "$f" Package) $(dpkg-deb -f "$f" Version) $(stat -c %s "$f") $(sha256sum "$f" | cut -c1-16)"
  done
} > "$DEST/MANIFEST.txt"
n=$(ls "$DEST"/*.deb | wc -l)
total=$(du -cb "$DEST"/*.deb | tail -1 | cut -f1)
cat "$DEST/MANIFEST.txt"
echo "fetch-device-deps: $n packages, $((total / 1024)) KiB in $DEST"
if [ "$n" -lt "${#pkgs[@]}" ]; then
  echo "fetch-device-deps: expected ${#pkgs[@]} packages" >&2
  exit 1
fi
