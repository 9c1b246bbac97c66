#!/usr/bin/env python3
"""`dpkg-deb -x DEB DIR` for machines without dpkg: reads the ar archive and extracts
data.tar.{xz,gz,bz2,zst} (zst only when the zstandard module exists) under DIR."""
import io
import sys
import tarfile


def members(path):
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SystemExit(f"{path}: not an ar archive")
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                return
            name = hdr[:16].decode().strip().rstrip("/")
            size = int(hdr[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            yield name, data


def main(deb, dest):
    for name, data in members(deb):
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            import zstandard  # noqa: only needed for zstd-compressed packages
            data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
            mode = "r:"
        else:
            mode = "r:*"
        with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as t:
            kw = {"filter": "tar"} if hasattr(tarfile, "data_filter") else {}
            t.extractall(dest, **kw)
        return
    raise SystemExit(f"{deb}: no data.tar member")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
