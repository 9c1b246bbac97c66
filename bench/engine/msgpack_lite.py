"""Pure-Python msgpack subset, used only where `import msgpack` fails (engine_client.py).

Encodes None, bool, int (-2^63 … 2^64-1), float (as float64), str, bytes/bytearray/memoryview
(bin), list/tuple (array) and dict (map). Decodes every msgpack format except ext types
(`ext` raises ValueError). Strings decode as str, bin as bytes; the same as
`msgpack.packb(obj, use_bin_type=True)` / `msgpack.unpackb(b, raw=False)`.
"""
from __future__ import annotations

import struct

_pack_d = struct.Struct(">Bd").pack
_unpack_f = struct.Struct(">f").unpack_from
_unpack_d = struct.Struct(">d").unpack_from


def packb(obj) -> bytes:
    out = bytearray()
    _pack(obj, out)
    return bytes(out)


def _pack(o, out: bytearray) -> None:
    if o is None:
        out.append(0xC0)
    elif o is True:
        out.append(0xC3)
    elif o is False:
        out.append(0xC2)
    elif isinstance(o, int):
        if 0 <= o < 0x80:
            out.append(o)
        elif -32 <= o < 0:
            out.append(o & 0xFF)
        elif o >= 0:
            if o <= 0xFF:
                out += struct.pack(">BB", 0xCC, o)
            elif o <= 0xFFFF:
                out += struct.pack(">BH", 0xCD, o)
            elif o <= 0xFFFFFFFF:
                out += struct.pack(">BI", 0xCE, o)
            elif o <= 0xFFFFFFFFFFFFFFFF:
                out += struct.pack(">BQ", 0xCF, o)
            else:
                raise ValueError("int too large for msgpack")
        else:
            if o >= -0x80:
                out += struct.pack(">Bb", 0xD0, o)
            elif o >= -0x8000:
                out += struct.pack(">Bh", 0xD1, o)
            elif o >= -0x80000000:
                out += struct.pack(">Bi", 0xD2, o)
            elif o >= -0x8000000000000000:
                out += struct.pack(">Bq", 0xD3, o)
            else:
                raise ValueError("int too small for msgpack")
    elif isinstance(o, float):
        out += _pack_d(0xCB, o)
    elif isinstance(o, str):
        b = o.encode("utf-8")
        n = len(b)
        if n < 32:
            out.append(0xA0 | n)
        elif n <= 0xFF:
            out += struct.pack(">BB", 0xD9, n)
        elif n <= 0xFFFF:
            out += struct.pack(">BH", 0xDA, n)
        else:
            out += struct.pack(">BI", 0xDB, n)
        out += b
    elif isinstance(o, (bytes, bytearray, memoryview)):
        b = bytes(o)
        n = len(b)
        if n <= 0xFF:
            out += struct.pack(">BB", 0xC4, n)
        elif n <= 0xFFFF:
            out += struct.pack(">BH", 0xC5, n)
        else:
            out += struct.pack(">BI", 0xC6, n)
        out += b
    elif isinstance(o, (list, tuple)):
        n = len(o)
        if n < 16:
            out.append(0x90 | n)
        elif n <= 0xFFFF:
            out += struct.pack(">BH", 0xDC, n)
        else:
            out += struct.pack(">BI", 0xDD, n)
        for x in o:
            _pack(x, out)
    elif isinstance(o, dict):
        n = len(o)
        if n < 16:
            out.append(0x80 | n)
        elif n <= 0xFFFF:
            out += struct.pack(">BH", 0xDE, n)
        else:
            out += struct.pack(">BI", 0xDF, n)
        for k, v in o.items():
            _pack(k, out)
            _pack(v, out)
    else:
        raise TypeError(f"cannot msgpack-encode {type(o).__name__}")


def unpackb(data: bytes):
    buf = memoryview(bytes(data))
    obj, pos = _unpack(buf, 0)
    if pos != len(buf):
        raise ValueError(f"extra bytes after msgpack object ({len(buf) - pos})")
    return obj


_FIXED = {  # code: (struct format, size)
    0xCC: (">B", 1), 0xCD: (">H", 2), 0xCE: (">I", 4), 0xCF: (">Q", 8),
    0xD0: (">b", 1), 0xD1: (">h", 2), 0xD2: (">i", 4), 0xD3: (">q", 8),
}


def _unpack(b: memoryview, p: int):
    c = b[p]
    p += 1
    if c < 0x80:
        return c, p
    if c >= 0xE0:
        return c - 0x100, p
    if 0x80 <= c <= 0x8F:
        return _map(b, p, c & 0x0F)
    if 0x90 <= c <= 0x9F:
        return _arr(b, p, c & 0x0F)
    if 0xA0 <= c <= 0xBF:
        n = c & 0x1F
        return bytes(b[p:p + n]).decode("utf-8"), p + n
    if c == 0xC0:
        return None, p
    if c == 0xC2:
        return False, p
    if c == 0xC3:
        return True, p
    if c in _FIXED:
        fmt, n = _FIXED[c]
        return struct.unpack_from(fmt, b, p)[0], p + n
    if c == 0xCA:
        return _unpack_f(b, p)[0], p + 4
    if c == 0xCB:
        return _unpack_d(b, p)[0], p + 8
    if c in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
        w = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[c]
        n = int.from_bytes(b[p:p + w], "big")
        p += w
        raw = bytes(b[p:p + n])
        if len(raw) != n:
            raise ValueError("truncated msgpack")
        return (raw.decode("utf-8") if c >= 0xD9 else raw), p + n
    if c in (0xDC, 0xDD):
        w = 2 if c == 0xDC else 4
        return _arr(b, p + w, int.from_bytes(b[p:p + w], "big"))
    if c in (0xDE, 0xDF):
        w = 2 if c == 0xDE else 4
        return _map(b, p + w, int.from_bytes(b[p:p + w], "big"))
    raise ValueError(f"unsupported msgpack type byte 0x{c:02x}")


def _arr(b: memoryview, p: int, n: int):
    out = []
    for _ in range(n):
        v, p = _unpack(b, p)
        out.append(v)
    return out, p


def _map(b: memoryview, p: int, n: int):
    out = {}
    for _ in range(n):
        k, p = _unpack(b, p)
        v, p = _unpack(b, p)
        out[k] = v
    return out, p
