"""Test helpers: start the real server in a subprocess, and a raw WebSocket client."""

from __future__ import annotations

import base64
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll predicate until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class ServerProcess:
    """The chat server as users run it: `gunicorn -c gunicorn.conf.py wsgi:app` or `python wsgi.py`."""

    kind: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        if self.kind == "gunicorn":
            cmd = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]
        else:
            cmd = [sys.executable, "wsgi.py", "--addr", f"127.0.0.1:{self.port}"]
        env = {**os.environ, "PORT": str(self.port), "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._answers, timeout, 0.05, f"{self.kind} to listen on {self.port}")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The processes serving requests: gunicorn's workers, or the wsgi.py process itself."""
        assert self.proc is not None
        if self.kind != "gunicorn":
            return [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a platform does; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def raw_handshake(
    port: int, headers: dict[str, str] | None = None, version: str = "HTTP/1.1", timeout: float = 5.0
) -> tuple[socket.socket, bytes]:
    """Open a TCP connection, send a WebSocket handshake; return the socket and the response head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    fields = {
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **(headers or {}),
    }
    head = f"GET /ws {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    sock.sendall(head.encode() + b"\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            break
        response += chunk
    return sock, response


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """A client frame as a test wants it, rules broken on request."""
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if n < 126:
        header = bytes((first, (0x80 if mask else 0) | n))
    elif n < 0x10000:
        header = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        header = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_server_frame(sock: socket.socket) -> tuple[int, bytes]:
    """Read one (unmasked) server frame: (opcode, payload)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        return data

    first, second = exactly(2)
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", exactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", exactly(8))
    return first & 0x0F, exactly(n)


def recv_until_close(ws) -> tuple[list[str], int, str]:  # type: ignore[no-untyped-def]
    """Read a websocket-client connection up to the server's close frame.

    Returns the text messages before it, and the close frame's code and reason.
    """
    texts = []
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == 0x8:
            return texts, struct.unpack("!H", data[:2])[0], data[2:].decode()
        if opcode == 0x1:
            texts.append(data.decode())


def read_close(sock: socket.socket) -> tuple[int, str]:
    """Read frames until the close frame; return its code and reason."""
    while True:
        opcode, payload = read_server_frame(sock)
        if opcode == 0x8:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


@dataclass
class RedisProcess:
    """A redis-server of the test's own, on a free port, keeping nothing on disk."""

    port: int
    workdir: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, 0.02, f"redis-server on {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(7) == b"+PONG\r\n"
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
