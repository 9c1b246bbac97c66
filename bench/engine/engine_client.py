"""Start/stop an `llm-engine` process and talk to it (engine/PROTOCOL.md, msgpack over ZeroMQ).

    with EngineProcess(binary, model_dir, device="cuda:0", args=[...], log_path=...) as eng:
        c = eng.client()
        info = c.request("info")
        reply = c.request("step", seqs=[...], release=[...])

Uses the `msgpack` package when it is installed, else the pure-Python subset in
msgpack_lite.py (same wire format). `CODEC` names which one is in use.
"""
from __future__ import annotations

import itertools
import os
import select
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from zmq_ctypes import Dealer, ZmqTimeout  # noqa: E402

try:
    import msgpack as _msgpack

    def packb(obj) -> bytes:
        return _msgpack.packb(obj, use_bin_type=True)

    def unpackb(data: bytes):
        return _msgpack.unpackb(data, raw=False, strict_map_key=False)

    CODEC = f"msgpack {getattr(_msgpack, 'version', '?')}"
except ImportError:  # the device image has msgpack; this machine's python may not
    from msgpack_lite import packb, unpackb  # noqa: F401

    CODEC = "msgpack_lite (pure Python)"


class EngineError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


_endpoint_counter = itertools.count()


def fresh_endpoint() -> str:
    return f"ipc:///tmp/bench-engine-{os.getpid()}-{next(_endpoint_counter)}.sock"


class Client:
    """One DEALER connection; request() sends one frame and waits for its reply."""

    def __init__(self, endpoint: str, timeout_ms: int = 600_000):
        self.sock = Dealer(endpoint, timeout_ms)
        self._req = itertools.count(1)
        self.last_encode_s = 0.0
        self.last_decode_s = 0.0

    def request(self, type_: str, **body):
        req_id = next(self._req)
        msg = {"v": 1, "type": type_, "req_id": req_id}
        msg.update(body)
        t0 = time.perf_counter()
        frame = packb(msg)
        t1 = time.perf_counter()
        self.sock.send(frame)
        raw = self.sock.recv()
        t2 = time.perf_counter()
        reply = unpackb(raw)
        t3 = time.perf_counter()
        self.last_encode_s = t1 - t0
        self.last_decode_s = t3 - t2
        if not isinstance(reply, dict) or reply.get("req_id") != req_id:
            raise EngineError("bad_reply", f"reply does not match req_id {req_id}: {str(reply)[:200]}")
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise EngineError(str(err.get("code")), str(err.get("message")))
        return reply

    def close(self) -> None:
        self.sock.close()


class EngineProcess:
    """Runs `binary --model DIR --device DEV --endpoint E [args]`, waits for READY on stdout."""

    def __init__(self, binary: str, model_dir: str, device: str = "cpu", args=(), log_path=None,
                 ready_timeout_s: float = 600.0, env=None):
        self.endpoint = fresh_endpoint()
        self.cmd = [binary, "--model", model_dir, "--device", device, "--endpoint", self.endpoint, *map(str, args)]
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        if log_path:
            self._log.write(("\n$ " + " ".join(self.cmd) + "\n").encode())
            self._log.flush()
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a timeout's SIGTERM still stops the engine
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        t0 = time.time()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self._wait_ready(ready_timeout_s)
        self.startup_s = time.time() - t0
        self._clients = []

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.time() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                if b"READY" in buf:
                    return
            elif self.proc.poll() is not None:
                break
        rc = self.proc.poll()
        self.stop()
        raise RuntimeError(f"engine did not become READY (rc={rc}, stdout={buf[-500:]!r}); see {self.log_path}")

    def client(self, timeout_ms: int = 600_000) -> Client:
        c = Client(self.endpoint, timeout_ms)
        self._clients.append(c)
        return c

    def stop(self) -> int:
        for c in getattr(self, "_clients", []):
            try:
                c.close()
            except Exception:
                pass
        self._clients = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log_path and self._log is not subprocess.DEVNULL:
            self._log.close()
            self._log = subprocess.DEVNULL
        return self.proc.returncode

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["Client", "EngineProcess", "EngineError", "ZmqTimeout", "packb", "unpackb", "CODEC", "fresh_endpoint"]
