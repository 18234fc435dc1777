"""Test helpers: start the real server in a subprocess, and a raw WebSocket client."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# Ports for the test's own servers: below Linux's ephemeral range (32768 and up), which the
# kernel hands to every outgoing connection, so no client socket can take one between our
# check and the server's bind. Each pytest-xdist worker has a block of its own.
# The walk through the block starts at a random place, so that two test runs at once (a
# developer's and an editor's, say) rarely meet.
PORT_BLOCK = 1000
_worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_start = random.randrange(PORT_BLOCK)
_ports = iter([20000 + PORT_BLOCK * _worker + (_start + i) % PORT_BLOCK for i in range(PORT_BLOCK)])


def free_port() -> int:
    """A port no socket on this machine is bound to, unique within this test run."""
    for port in _ports:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port left in this worker's block of {PORT_BLOCK}")


def run_patched(script: str, *args: str, timeout: float = 30.0, **env: str) -> Any:
    """Run a Python script (one that does gevent's monkey patching first, as a server does:
    pytest's process has none) in a process of its own, from the checkout, and return the JSON
    its last line of output says; a failing script fails the test with its stderr."""
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll predicate until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def two_hosts(request, start_server, engine: str, env: dict[str, str]):
    """The chat on one engine as two servers to connect to: the same one twice ("memory": one
    worker alone), or two hosts on one Redis ("redis") or on a Redis Cluster ("cluster")."""
    if engine == "memory":
        server = start_server("gunicorn", **env)
        return server, server
    redis = request.getfixturevalue("redis_server" if engine == "redis" else "redis_cluster")
    env = {**env, "REDIS_URL": redis.url, "CHAT_REDIS_CLUSTER": "1" if engine == "cluster" else "0"}
    return start_server("gunicorn", **env), start_server("wsgi", **env)


def health(server) -> tuple[int, dict]:
    """GET /healthz: (status, JSON answer), 503 included."""
    try:
        with urllib.request.urlopen(server.url + "/healthz", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def procfile_command() -> list[str]:
    """The Procfile's web command, as a platform runs it."""
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    program, *args = line.removeprefix("web:").split()
    return [str(BIN / program), *args]


# How people start the chat: the Procfile; gevent-websocket's documented stock worker;
# `python wsgi.py`; and the Procfile behind nginx configured as the README says.
SERVER_KINDS = ("gunicorn", "stock", "wsgi", "nginx")


@dataclass
class ServerProcess:
    """The chat server as users run it, in a subprocess: one of SERVER_KINDS."""

    kind: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)
    # For kind "nginx": the proxy in front, on `port`; the server itself listens on another.
    proxy: NginxProcess | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def command(self, port: int) -> list[str]:
        if self.kind in ("gunicorn", "nginx"):
            return procfile_command()
        if self.kind == "stock":
            return [str(BIN / "gunicorn"), "-k", "geventwebsocket.gunicorn.workers.GeventWebSocketWorker", "wsgi:app"]
        return [sys.executable, "wsgi.py", "--addr", f"127.0.0.1:{port}"]

    def start(self, timeout: float = 20.0) -> ServerProcess:
        port = self.port
        if self.kind == "nginx":
            port = self.proxy.upstream_port if self.proxy else free_port()
        env = {**os.environ, "PORT": str(port), "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._answers(port), timeout, 0.05, f"{self.kind} to listen on {port}")
        if self.kind == "nginx" and self.proxy is None:
            self.proxy = NginxProcess(self.port, port, self.log_path.parent / f"nginx-{self.port}").start()
        if self.proxy is not None:
            wait_until(lambda: self._answers(self.port), timeout, 0.05, f"nginx to listen on {self.port}")
        return self

    def _answers(self, port: int) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The processes serving requests: gunicorn's workers, or the wsgi.py process itself."""
        assert self.proc is not None
        if self.kind == "wsgi":
            return [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a platform does; returns the exit code. The proxy in front stays."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop_proxy(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()


def readme_nginx_block() -> str:
    """The nginx configuration the README gives (its first ```nginx block)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```nginx\n") + len("```nginx\n")
    return text[start : text.index("```", start)]


@dataclass
class NginxProcess:
    """Debian's nginx with the README's server block, listening on `port`, proxying to `upstream_port`."""

    port: int
    upstream_port: int
    workdir: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> NginxProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        block = readme_nginx_block()
        assert "listen 80;" in block and "127.0.0.1:8080" in block, "the README's nginx block changed shape"
        block = block.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        block = block.replace("127.0.0.1:8080", f"127.0.0.1:{self.upstream_port}")
        work = self.workdir
        temp_paths = "".join(
            f"    {kind}_temp_path {work}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = work / "nginx.conf"
        conf.write_text(
            f"daemon off;\nmaster_process off;\npid {work}/nginx.pid;\nerror_log {work}/error.log info;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{\n    access_log {work}/access.log;\n{temp_paths}{block}}}\n"
        )
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(work), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


NGINX = "/usr/sbin/nginx"


# Client sockets tests opened, shut at the end of each test before its servers stop: a server
# stopping gracefully waits for open connections, and a test's clients are still open then.
_opened: list[socket.socket] = []


def shut_client_sockets() -> None:
    """Shut every client socket the test opened (shutdown wakes a thread blocked in recv)."""
    while _opened:
        sock = _opened.pop()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def connect(server: ServerProcess, **options) -> websocket.WebSocket:
    """A websocket-client connection to the server's chat, closed when the test ends."""
    ws = websocket.create_connection(server.ws_url, timeout=10, **options)
    _opened.append(ws.sock)
    return ws


def raw_handshake(
    port: int,
    headers: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
    timeout: float = 5.0,
    receive_buffer: int | None = None,
) -> tuple[socket.socket, bytes]:
    """Open a TCP connection, send a WebSocket handshake; return the socket and the response head.

    receive_buffer: the client's SO_RCVBUF, set before connecting (a client that reads slowly).
    """
    sock = socket.socket()
    sock.settimeout(timeout)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    _opened.append(sock)
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
        chunk = sock.recv(1)  # Byte by byte: what follows the head is the first frames.
        if not chunk:
            break
        response += chunk
    return sock, response


def read_body(sock: socket.socket, head: bytes) -> bytes:
    """The body after a response head (a refusal's), by its Content-Length."""
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    body = b""
    while len(body) < length and (chunk := sock.recv(length - len(body))):
        body += chunk
    return body


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


def recv_until_close(ws) -> tuple[list[str], int, str]:
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


def parse_server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server frames: [(opcode, payload)], up to the last whole frame."""
    frames, at = [], 0
    while at + 2 <= len(data):
        opcode, n, start = data[at] & 0x0F, data[at + 1] & 0x7F, at + 2
        if n == 126:
            (n,) = struct.unpack_from("!H", data, start)
            start += 2
        elif n == 127:
            (n,) = struct.unpack_from("!Q", data, start)
            start += 8
        if start + n > len(data):
            break
        frames.append((opcode, data[start : start + n]))
        at = start + n
    return frames


class StreamReader(threading.Thread):
    """Reads a socket as fast as the kernel delivers, into one buffer, until EOF or close().

    A client that never falls behind: parsing waits until the test asks (frames()).
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.received = bytearray()

    def run(self) -> None:
        self.sock.settimeout(None)
        try:
            while chunk := self.sock.recv(1 << 20):
                self.received += chunk
        except OSError:
            pass

    def frames(self) -> list[tuple[int, bytes]]:
        return parse_server_frames(bytes(self.received))

    def close(self) -> None:
        """End the connection (a plain close() would not wake the blocked recv) and the thread."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.join(5)
        self.sock.close()


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
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def ports(self) -> set[int]:
        return {self.port}

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
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


class V2Client:
    """A chat.v2 client for tests: sends commands, and waits for events by type.

    Events the test did not ask for yet stay in `pending`, in order, for later waits and
    for assertions that nothing else came.
    """

    def __init__(
        self, server: ServerProcess, nick: str | None = None, session: str | None = None,
        token: str | None = None, **options,
    ) -> None:
        """nick: say hello with it (open mode); token: say hello with it (token mode)."""
        self.ws = connect(server, subprotocols=["chat.v2"], **options)
        assert self.ws.getsubprotocol() == "chat.v2"
        self.pending: list[dict] = []
        self.welcome: dict | None = None
        if nick is not None:
            self.send(type="hello", nick=nick, session=session or f"session-of-{nick}")
            self.welcome = self.wait("welcome")
        elif token is not None:
            self.send(type="hello", token=token, session=session or f"session-{random.random()}")
            self.welcome = self.wait("welcome")

    def send(self, **command) -> None:
        self.ws.send(json.dumps(command))

    def recv(self) -> dict:
        """The next event off the wire (not from pending)."""
        return json.loads(self.ws.recv())

    def wait(self, kind: str, **fields) -> dict:
        """The first event of this type (and these field values), pending ones first."""
        def matches(event: dict) -> bool:
            return event["type"] == kind and all(event.get(k) == v for k, v in fields.items())

        for index, event in enumerate(self.pending):
            if matches(event):
                return self.pending.pop(index)
        while not matches(event := self.recv()):
            self.pending.append(event)
        return event

    def join(self, room: str, since: dict | None = None) -> dict:
        self.send(type="join", room=room, **({"since": since} if since is not None else {}))
        return self.wait("joined", room=room)

    def say(self, room: str, text: str, ref: str | None = None) -> dict:
        """Say a line and return its ack."""
        self.send(type="say", room=room, text=text, **({"ref": ref} if ref is not None else {}))
        return self.wait("ack", room=room)

    def try_say(self, room: str, text: str, ref: str | None = None) -> dict:
        """Say a line and return what answers it: its ack, or an error."""
        self.send(type="say", room=room, text=text, **({"ref": ref} if ref is not None else {}))
        return self.wait_any(("ack", "error"))

    def messages(self, room: str, count: int) -> list[dict]:
        return [self.wait("message", room=room) for _ in range(count)]

    def wait_any(self, kinds: tuple[str, ...]) -> dict:
        """The first event of any of these types, pending ones first."""
        for index, event in enumerate(self.pending):
            if event["type"] in kinds:
                return self.pending.pop(index)
        while (event := self.recv())["type"] not in kinds:
            self.pending.append(event)
        return event

    def settle(self) -> list[dict]:
        """Everything not yet waited for, up to the answer to a `rooms` asked now (the hub
        answers it after everything caused before it): proves what did not come."""
        self.send(type="rooms")
        self.wait("rooms")
        rest, self.pending = self.pending, []
        return rest

    def close(self) -> None:
        self.ws.close()


def redis_cli(port: int, *args: str) -> str:
    """What redis-cli says to one command on a local port."""
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30).stdout


def cut_subscriptions(ports: set[int]) -> None:
    """Each Redis on these ports drops every subscription connection (CLIENT KILL TYPE pubsub)
    and goes on answering everything else."""
    for port in ports:
        redis_cli(port, "client", "kill", "type", "pubsub")


@dataclass
class RedisClusterProcess:
    """A Redis Cluster of three masters on loopback, from Debian's redis-server and redis-cli."""

    workdir: Path
    nodes: list[RedisProcess] = field(default_factory=list)
    # How long (ms) a node may be silent before the others count it failed (Redis's default,
    # 15 s, unless a test makes one fail over).
    node_timeout: int = 15000

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> set[int]:
        return {node.port for node in self.nodes}

    def start(self) -> RedisClusterProcess:
        for _ in range(3):
            self.nodes.append(self._node())
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        wait_until(self._ok, 20, 0.1, "the cluster to be ok on every node")
        return self

    def _node(self) -> RedisProcess:
        workdir = self.workdir / f"node{len(self.nodes)}"
        workdir.mkdir(parents=True, exist_ok=True)
        # The cluster bus on a port of our choosing too (Redis 7), not port + 10000.
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf"),
                 "--cluster-port", str(free_port()), "--cluster-node-timeout", str(self.node_timeout)]
        return RedisProcess(port=free_port(), workdir=workdir, extra=extra).start()

    def add_replica(self, master: RedisProcess) -> RedisProcess:
        """A new node, replicating master (which it takes over from should master fail)."""
        replica = self._node()
        self.nodes.append(replica)
        master_id = redis_cli(master.port, "cluster", "myid").strip()
        add = ["redis-cli", "--cluster", "add-node", f"127.0.0.1:{replica.port}", f"127.0.0.1:{master.port}",
               "--cluster-slave", "--cluster-master-id", master_id]
        subprocess.run(add, check=True, capture_output=True, timeout=30)
        wait_until(lambda: "master_link_status:up" in redis_cli(replica.port, "info", "replication"), 20, 0.1,
                   "the replica to be in sync")
        return replica

    def move_slot(self, slot: int, source: RedisProcess, target: RedisProcess) -> None:
        """Reshard one slot from master source to master target, as `redis-cli --cluster
        reshard` does: target imports, source migrates its keys, then every node is told."""
        self.start_moving(slot, source, target)
        self.finish_moving(slot, source, target)

    def start_moving(self, slot: int, source: RedisProcess, target: RedisProcess) -> None:
        source_id, target_id = (redis_cli(node.port, "cluster", "myid").strip() for node in (source, target))
        redis_cli(target.port, "cluster", "setslot", str(slot), "importing", source_id)
        redis_cli(source.port, "cluster", "setslot", str(slot), "migrating", target_id)

    def migrate(self, source: RedisProcess, target: RedisProcess, *keys: str) -> None:
        redis_cli(source.port, "migrate", "127.0.0.1", str(target.port), "", "0", "5000", "keys", *keys)

    def finish_moving(self, slot: int, source: RedisProcess, target: RedisProcess) -> None:
        while keys := redis_cli(source.port, "cluster", "getkeysinslot", str(slot), "100").split():
            self.migrate(source, target, *keys)
        target_id = redis_cli(target.port, "cluster", "myid").strip()
        for node in (target, source, *(node for node in self.nodes if node not in (source, target))):
            redis_cli(node.port, "cluster", "setslot", str(slot), "node", target_id)

    def _ok(self) -> bool:
        return all("cluster_state:ok" in redis_cli(node.port, "cluster", "info") for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
