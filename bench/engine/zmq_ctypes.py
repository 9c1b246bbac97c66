"""A tiny ctypes binding of libzmq (just a DEALER socket), for machines without pyzmq.

Only what the bench driver needs: one DEALER socket, connect, send one frame, receive one
frame (with a timeout). libzmq.so.5 is found through $ZMQ_LIB (a full path), then
ctypes.util.find_library("zmq"), then the plain soname (LD_LIBRARY_PATH applies).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

DEALER = 5
ZMQ_LINGER = 17
ZMQ_RCVTIMEO = 27
ZMQ_SNDTIMEO = 28
EAGAIN = 11
EINTR = 4


class ZmqError(RuntimeError):
    pass


class ZmqTimeout(ZmqError):
    pass


class _Msg(ctypes.Structure):
    # zmq_msg_t is 64 opaque bytes, 8-byte aligned (zmq.h: unsigned char _[64] with alignment).
    _fields_ = [("_", ctypes.c_uint64 * 8)]


def _load() -> ctypes.CDLL:
    candidates = []
    if os.environ.get("ZMQ_LIB"):
        candidates.append(os.environ["ZMQ_LIB"])
    found = ctypes.util.find_library("zmq")
    if found:
        candidates.append(found)
    candidates += ["libzmq.so.5", "libzmq.so"]
    errors = []
    for c in candidates:
        try:
            return ctypes.CDLL(c, use_errno=True)
        except OSError as e:  # try the next one
            errors.append(f"{c}: {e}")
    raise ZmqError("cannot load libzmq: " + "; ".join(errors))


_lib = _load()
_lib.zmq_ctx_new.restype = ctypes.c_void_p
_lib.zmq_ctx_new.argtypes = []
_lib.zmq_ctx_term.restype = ctypes.c_int
_lib.zmq_ctx_term.argtypes = [ctypes.c_void_p]
_lib.zmq_socket.restype = ctypes.c_void_p
_lib.zmq_socket.argtypes = [ctypes.c_void_p, ctypes.c_int]
_lib.zmq_close.restype = ctypes.c_int
_lib.zmq_close.argtypes = [ctypes.c_void_p]
_lib.zmq_setsockopt.restype = ctypes.c_int
_lib.zmq_setsockopt.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_lib.zmq_connect.restype = ctypes.c_int
_lib.zmq_connect.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.zmq_send.restype = ctypes.c_int
_lib.zmq_send.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
_lib.zmq_msg_init.restype = ctypes.c_int
_lib.zmq_msg_init.argtypes = [ctypes.POINTER(_Msg)]
_lib.zmq_msg_recv.restype = ctypes.c_int
_lib.zmq_msg_recv.argtypes = [ctypes.POINTER(_Msg), ctypes.c_void_p, ctypes.c_int]
_lib.zmq_msg_data.restype = ctypes.c_void_p
_lib.zmq_msg_data.argtypes = [ctypes.POINTER(_Msg)]
_lib.zmq_msg_size.restype = ctypes.c_size_t
_lib.zmq_msg_size.argtypes = [ctypes.POINTER(_Msg)]
_lib.zmq_msg_close.restype = ctypes.c_int
_lib.zmq_msg_close.argtypes = [ctypes.POINTER(_Msg)]
_lib.zmq_errno.restype = ctypes.c_int
_lib.zmq_errno.argtypes = []
_lib.zmq_strerror.restype = ctypes.c_char_p
_lib.zmq_strerror.argtypes = [ctypes.c_int]
_lib.zmq_version.restype = None
_lib.zmq_version.argtypes = [ctypes.POINTER(ctypes.c_int)] * 3


def version() -> str:
    a, b, c = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    _lib.zmq_version(ctypes.byref(a), ctypes.byref(b), ctypes.byref(c))
    return f"{a.value}.{b.value}.{c.value}"


def _fail(what: str) -> ZmqError:
    err = _lib.zmq_errno()
    msg = f"{what}: {_lib.zmq_strerror(err).decode()} (errno {err})"
    return ZmqTimeout(msg) if err == EAGAIN else ZmqError(msg)


class Dealer:
    """One DEALER socket connected to `endpoint`. recv() raises ZmqTimeout after timeout_ms."""

    def __init__(self, endpoint: str, timeout_ms: int = 600_000):
        self._ctx = _lib.zmq_ctx_new()
        if not self._ctx:
            raise _fail("zmq_ctx_new")
        self._sock = _lib.zmq_socket(self._ctx, DEALER)
        if not self._sock:
            raise _fail("zmq_socket")
        self._setint(ZMQ_LINGER, 0)
        self._setint(ZMQ_RCVTIMEO, timeout_ms)
        self._setint(ZMQ_SNDTIMEO, timeout_ms)
        if _lib.zmq_connect(self._sock, endpoint.encode()) != 0:
            raise _fail(f"zmq_connect {endpoint}")
        self._msg = _Msg()

    def _setint(self, opt: int, value: int) -> None:
        v = ctypes.c_int(value)
        if _lib.zmq_setsockopt(self._sock, opt, ctypes.byref(v), ctypes.sizeof(v)) != 0:
            raise _fail(f"zmq_setsockopt {opt}")

    def set_timeout(self, timeout_ms: int) -> None:
        self._setint(ZMQ_RCVTIMEO, timeout_ms)

    def send(self, frame: bytes) -> None:
        while True:
            if _lib.zmq_send(self._sock, frame, len(frame), 0) >= 0:
                return
            if _lib.zmq_errno() != EINTR:
                raise _fail("zmq_send")

    def recv(self) -> bytes:
        msg = self._msg
        if _lib.zmq_msg_init(ctypes.byref(msg)) != 0:
            raise _fail("zmq_msg_init")
        try:
            while True:
                n = _lib.zmq_msg_recv(ctypes.byref(msg), self._sock, 0)
                if n >= 0:
                    break
                if _lib.zmq_errno() != EINTR:
                    raise _fail("zmq_msg_recv")
            return ctypes.string_at(_lib.zmq_msg_data(ctypes.byref(msg)), _lib.zmq_msg_size(ctypes.byref(msg)))
        finally:
            _lib.zmq_msg_close(ctypes.byref(msg))

    def close(self) -> None:
        if self._sock:
            _lib.zmq_close(self._sock)
            self._sock = None
        if self._ctx:
            _lib.zmq_ctx_term(self._ctx)
            self._ctx = None

    def __enter__(self) -> "Dealer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
