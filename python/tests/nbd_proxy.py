"""A fault-injecting NBD proxy for the tests: a loopback TCP listener that forwards every
connection to a real NBD server, passes the handshake through untouched and, in the
transmission phase, applies one fault to the server's replies from the ``after``-th reply
on (counted over all of the proxy's connections, 1-based).

The proxy parses both directions just enough to know where the handshake ends and where
each reply starts. It relies on structured replies being negotiated (qimg asks for them and
qemu-nbd grants them), so simple replies never carry data; a connection where they are not
negotiated is recorded in ``errors`` and the test using the proxy must fail.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import threading
from dataclasses import dataclass, field

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_EXPORT_NAME = 1
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
REP_ACK = 1
CMD_WRITE = 1
CHUNK_OFFSET_DATA = 1

#: How long ``close`` waits for each proxy thread.
JOIN_TIMEOUT_S = 10


class Fault(enum.Enum):
    """What happens to the server's replies from the chosen one on."""

    NONE = "none"
    #: The connection is closed instead of forwarding the reply.
    DROP = "drop"
    #: The reply is held back for ``delay_s`` seconds (the connection stays open).
    DELAY = "delay"
    #: The reply header and half of its payload are sent, then the connection is closed.
    TRUNCATE = "truncate"
    #: The reply's magic number is replaced by one no NBD reply has.
    BAD_MAGIC = "bad-magic"
    #: The reply names a request the client never sent.
    WRONG_COOKIE = "wrong-cookie"
    #: The data bytes of every read data chunk are XORed with ``xor`` (the header is intact).
    CORRUPT_DATA = "corrupt-data"


class ProtocolError(Exception):
    """The traffic through the proxy is not what the proxy understands."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


@dataclass
class FaultyNbdProxy:
    """Listens on 127.0.0.1:``port`` and forwards to ``upstream`` (host, port)."""

    upstream: tuple[str, int]
    fault: Fault
    after: int = 1
    delay_s: float = 3.0
    xor: int = 0xFF
    #: Transmission-phase replies seen so far, over all connections.
    replies: int = 0
    #: Replies the fault was applied to (a test checks the fault really happened).
    faulted: int = 0
    connections: int = 0
    errors: list[str] = field(default_factory=list)
    _listener: socket.socket = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sockets: list[socket.socket] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._spawn(self._accept_loop, "nbd-proxy-accept")

    @property
    def port(self) -> int:
        port: int = self._listener.getsockname()[1]
        return port

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def close(self) -> None:
        """Closes the listener and every connection, and waits for every thread."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        while True:
            with self._lock:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads:
                break
            for thread in threads:
                thread.join(JOIN_TIMEOUT_S)
                if thread.is_alive():
                    raise RuntimeError(f"proxy thread {thread.name} does not end")

    def __enter__(self) -> FaultyNbdProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connections -------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError as exc:
                self.errors.append(f"upstream connect: {exc}")
                client.close()
                continue
            server.settimeout(None)
            self._track(server)
            with self._lock:
                self.connections += 1
            pair = _Pair(client, server)
            self._spawn(self._client_to_server, "nbd-proxy-c2s", pair)
            self._spawn(self._server_to_client, "nbd-proxy-s2c", pair)

    def _client_to_server(self, pair: _Pair) -> None:
        """Forwards the client's options and requests unchanged."""
        c, s = pair.client, pair.server
        try:
            s.sendall(_recv_exact(c, 4))  # client flags
            while True:
                head = _recv_exact(c, 16)
                if head[:8] != IHAVEOPT:
                    raise ProtocolError(f"bad option magic {head[:8]!r}")
                option, length = struct.unpack(">II", head[8:])
                s.sendall(head + _recv_exact(c, length))
                if option in (OPT_GO, OPT_EXPORT_NAME):
                    break
            while True:
                head = _recv_exact(c, 28)
                magic, _flags, kind, _cookie, _offset, length = struct.unpack(">IHHQQI", head)
                if magic != REQUEST_MAGIC:
                    raise ProtocolError(f"bad request magic {magic:#x}")
                s.sendall(head + (_recv_exact(c, length) if kind == CMD_WRITE else b""))
        except (EOFError, OSError):
            pass
        except ProtocolError as exc:
            self.errors.append(f"client: {exc}")
        pair.close()

    def _server_to_client(self, pair: _Pair) -> None:
        c, s = pair.client, pair.server
        try:
            greeting = _recv_exact(s, 18)
            if greeting[:16] != NBDMAGIC + IHAVEOPT:
                raise ProtocolError("not a fixed newstyle NBD server")
            c.sendall(greeting)
            structured = False
            while True:
                head = _recv_exact(s, 20)
                magic, option, kind, length = struct.unpack(">QIII", head)
                if magic != OPT_REPLY_MAGIC:
                    raise ProtocolError(f"bad option reply magic {magic:#x}")
                c.sendall(head + _recv_exact(s, length))
                if option == OPT_STRUCTURED_REPLY and kind == REP_ACK:
                    structured = True
                if option == OPT_GO and kind == REP_ACK:
                    break
            if not structured:
                raise ProtocolError("structured replies were not negotiated")
            while True:
                self._relay_reply(pair)
        except (EOFError, OSError):
            pass
        except ProtocolError as exc:
            self.errors.append(f"server: {exc}")
        pair.close()

    def _relay_reply(self, pair: _Pair) -> None:
        c, s = pair.client, pair.server
        magic = struct.unpack(">I", _recv_exact(s, 4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            head = struct.pack(">I", magic) + _recv_exact(s, 12)
            payload = b""
            kind = 0
        elif magic == STRUCTURED_REPLY_MAGIC:
            rest = _recv_exact(s, 16)
            _flags, kind, _cookie, length = struct.unpack(">HHQI", rest)
            head = struct.pack(">I", magic) + rest
            payload = _recv_exact(s, length)
        else:
            raise ProtocolError(f"bad reply magic {magic:#x}")
        with self._lock:
            self.replies += 1
            active = self.fault is not Fault.NONE and self.replies >= self.after
            if active and self.fault is Fault.CORRUPT_DATA and kind != CHUNK_OFFSET_DATA:
                active = False
            if active:
                self.faulted += 1
        if not active:
            c.sendall(head + payload)
            return
        if self.fault is Fault.DROP:
            raise EOFError
        if self.fault is Fault.DELAY:
            # Interrupted by close(), so a test never waits for the whole delay twice.
            self._stop.wait(self.delay_s)
            c.sendall(head + payload)
        elif self.fault is Fault.TRUNCATE:
            c.sendall(head + payload[: len(payload) // 2])
            raise EOFError
        elif self.fault is Fault.BAD_MAGIC:
            c.sendall(b"\xde\xad\xbe\xef" + head[4:] + payload)
        elif self.fault is Fault.WRONG_COOKIE:
            # Both reply kinds carry the cookie at bytes 8..16.
            cookie = struct.unpack(">Q", head[8:16])[0]
            bad = struct.pack(">Q", cookie ^ 0x5A5A_0000_0000_0000)
            c.sendall(head[:8] + bad + head[16:] + payload)
        elif self.fault is Fault.CORRUPT_DATA:
            data = bytes(b ^ self.xor for b in payload[8:])
            c.sendall(head + payload[:8] + data)


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
