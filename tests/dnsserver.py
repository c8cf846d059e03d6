"""A real authoritative-style DNS server for the tests, on 127.0.0.1 (UDP and TCP, one port).

It serves zone data given as records, answers recursively-shaped responses (CNAMEs followed),
and misbehaves on cue per name: SERVFAIL, silence (timeout), a delay, or truncation over UDP so
the client must retry over TCP. Tests point trustmilter's resolver at ``server.address``.

It must stay cheap under load (the load test sends it tens of queries per message on the same
two cores as the milter): UDP is answered in one thread (a thread only for a delayed answer),
a name's existence is a set lookup, and a reply already built for the same question bytes is
reused with the new query id, unless the name misbehaves.
"""
from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections import defaultdict
from typing import Iterable

from dnslib import CLASS, QTYPE, RCODE, RR, DNSRecord, TXT
from dnslib.dns import DNSError

Behaviour = str  # "servfail" | "timeout" | "truncate" | "refused" | "delay:SECONDS"


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


class TestDNSServer:
    __test__ = False   # not a test class, though its name starts with "Test"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.records: dict[str, list[RR]] = defaultdict(list)
        self.behaviour: dict[str, Behaviour] = {}
        self.typed_behaviour: dict[tuple[str, str], Behaviour] = {}  # (name, TYPE): one type only
        self.default_behaviour: Behaviour | None = None   # applies to every name
        self.queries: list[tuple[str, str, str]] = []     # (name, type, "udp"/"tcp")
        self._lock = threading.Lock()
        self._names: set[str] = set()       # every owner name and each of its parents
        self._replies: dict[tuple[bytes, str], bytes] = {}   # question bytes -> built reply
        self._udp_sock: socket.socket | None = None
        self._udp_thread: threading.Thread | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self.port = 0

    # ----- zone data -------------------------------------------------------------------------
    def add(self, name: str, rtype: str, value: str | Iterable[str | bytes], ttl: int = 300) -> None:
        """Add a record. TXT ``value`` may be one string (split into 255-byte chunks) or a list
        of the character-strings to send. Other types take their zone-file rdata text."""
        key = _norm(name)
        if rtype.upper() in ("TXT", "SPF"):
            if isinstance(value, (str, bytes)):
                data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
                chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
            else:
                chunks = [v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v
                          for v in value]
            rr = RR(key + ".", getattr(QTYPE, rtype.upper()), rdata=TXT(chunks), ttl=ttl)
            with self._lock:
                self.records[key].append(rr)
                self._added(key)
            return
        assert isinstance(value, str)
        # Parse only the rdata as zone text: owner names may hold characters zone syntax cannot
        # (the SPF suites have "macro%percent  space%20url-space.example.com").
        zone = f"owner.invalid. {ttl} IN {rtype.upper()} {value}"
        rrs = [_renamed(rr, key) for rr in RR.fromZone(zone)]
        with self._lock:
            self.records[key].extend(rrs)
            self._added(key)

    def _added(self, key: str) -> None:
        """(Under the lock.) Index the name and its parents; forget built replies."""
        labels = key.split(".")
        for i in range(len(labels)):
            self._names.add(".".join(labels[i:]))
        self._replies.clear()

    def clear(self) -> None:
        with self._lock:
            self.records.clear()
            self._names.clear()
            self._replies.clear()
            self.behaviour.clear()
            self.typed_behaviour.clear()
            self.default_behaviour = None
            self.queries.clear()

    def on(self, name: str, behaviour: Behaviour, rtypes: Iterable[str] | None = None) -> None:
        """Misbehave for ``name``: for every query type, or only for those in ``rtypes`` (the SPF
        suites' TIMEOUT answers the types listed before it and times out the others)."""
        if rtypes is None:
            self.behaviour[_norm(name)] = behaviour
            return
        for rtype in rtypes:
            self.typed_behaviour[(_norm(name), rtype.upper())] = behaviour

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> "TestDNSServer":
        server = self

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    while True:
                        head = self._read(2)
                        if not head:
                            return
                        (length,) = struct.unpack("!H", head)
                        reply = server._answer(self._read(length), "tcp")
                        if reply is None:
                            return
                        self.request.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    return

            def _read(self, n: int) -> bytes:
                buf = b""
                while len(buf) < n:
                    chunk = self.request.recv(n - len(buf))
                    if not chunk:
                        return b""
                    buf += chunk
                return buf

        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socketserver.ThreadingTCPServer((self.host, port), TCPHandler,
                                                  bind_and_activate=False)
            try:
                tcp.allow_reuse_address = True
                tcp.server_bind()
                tcp.server_activate()
            except OSError:   # that port is taken for TCP: both closed, try another
                udp.close()
                tcp.server_close()
                continue
            break
        else:  # pragma: no cover
            raise RuntimeError("no free port for the test DNS server")
        tcp.daemon_threads = True
        self._udp_sock, self._tcp, self.port = udp, tcp, port
        self._udp_thread = threading.Thread(target=self._serve_udp, args=(udp,), daemon=True)
        self._udp_thread.start()
        threading.Thread(target=tcp.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def _serve_udp(self, sock: socket.socket) -> None:
        """Answer datagrams in this thread; a delayed answer waits in a thread of its own."""
        while True:
            try:
                data, client = sock.recvfrom(65535)
            except OSError:
                return   # closed by stop()
            if self._delay_of(data) is not None:
                threading.Thread(target=self._reply_udp, args=(sock, data, client),
                                 daemon=True).start()
            else:
                self._reply_udp(sock, data, client)

    def _reply_udp(self, sock: socket.socket, data: bytes, client: tuple[str, int]) -> None:
        reply = self._answer(data, "udp")
        if reply is not None:
            try:
                sock.sendto(reply, client)
            except OSError:   # stopped while a delayed answer waited: drop it
                pass

    def _delay_of(self, data: bytes) -> float | None:
        question = _question(data)
        if question is None:
            return None
        behaviour = self._behaviour(*question)
        if behaviour and behaviour.startswith("delay:"):
            return float(behaviour.split(":", 1)[1])
        return None

    def _behaviour(self, qname: str, qtype: str) -> Behaviour | None:
        return (self.typed_behaviour.get((qname, qtype.upper()))
                or self.behaviour.get(qname) or self.default_behaviour)

    def stop(self) -> None:
        if self._udp_sock is not None:
            # shutdown() wakes the thread blocked in recvfrom (close alone would not).
            try:
                self._udp_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._udp_sock.close()
            if self._udp_thread is not None:
                self._udp_thread.join(5)
        if self._tcp is not None:
            self._tcp.shutdown()
            self._tcp.server_close()
        self._udp_sock = self._tcp = None
        self._udp_thread = None

    def __enter__(self) -> "TestDNSServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- answering -------------------------------------------------------------------------
    def _answer(self, data: bytes, transport: str) -> bytes | None:
        question = _question(data)
        if question is not None:
            qname, qtype_text = question
            with self._lock:
                self.queries.append((qname, qtype_text, transport))
            behaviour = self._behaviour(qname, qtype_text)
            if behaviour is None:
                built = self._replies.get((data[2:], transport))
                if built is not None:
                    return data[:2] + built[2:]   # the same reply, this query's id
        try:
            request = DNSRecord.parse(data)
        except (DNSError, Exception):  # noqa: BLE001
            return None
        # From the raw labels: str() would escape bytes such as spaces ("\\032"), and the zone
        # is keyed by the plain text names were added with.
        qname = _norm(".".join(label.decode("utf-8", "surrogateescape")
                               for label in request.q.qname.label))
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        if question is None:
            with self._lock:
                self.queries.append((qname, str(qtype), transport))
        behaviour = self._behaviour(qname, str(qtype))
        reply = request.reply()
        reply.header.ra = 1
        if behaviour == "timeout":
            return None
        if behaviour and behaviour.startswith("delay:"):
            time.sleep(float(behaviour.split(":", 1)[1]))
        if behaviour == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        if behaviour == "refused":
            reply.header.rcode = RCODE.REFUSED
            return reply.pack()
        answers, exists = self._resolve(qname, request.q.qtype)
        for rr in answers:
            reply.add_answer(rr)
        if not exists:
            reply.header.rcode = RCODE.NXDOMAIN
        packed = reply.pack()
        if transport == "udp":
            limit = 512
            edns = [ar for ar in request.ar if ar.rtype == QTYPE.OPT]
            if edns:
                limit = max(512, edns[0].rclass)
            if behaviour == "truncate" or len(packed) > limit:
                short = request.reply()
                short.header.tc = 1
                short.header.ra = 1
                packed = short.pack()
        if behaviour is None and question is not None:
            with self._lock:
                if len(self._replies) < 100_000:
                    self._replies[(data[2:], transport)] = packed
        return packed

    def _lookup(self, name: str) -> list[RR]:
        with self._lock:
            if name in self.records:
                return list(self.records[name])
            labels = name.split(".")
            for i in range(1, len(labels)):
                wild = "*." + ".".join(labels[i:])
                if wild in self.records:
                    return [_renamed(rr, name) for rr in self.records[wild]]
        return []

    def _exists(self, name: str) -> bool:
        with self._lock:
            return name in self._names

    def _resolve(self, name: str, qtype: int) -> tuple[list[RR], bool]:
        out: list[RR] = []
        for _ in range(10):  # CNAME chain limit
            rrs = self._lookup(name)
            exists = bool(rrs) or self._exists(name)
            matching = [rr for rr in rrs if rr.rtype == qtype or qtype == QTYPE.ANY]
            if matching:
                return out + matching, True
            cname = [rr for rr in rrs if rr.rtype == QTYPE.CNAME]
            if cname and qtype != QTYPE.CNAME:
                out.append(cname[0])
                name = _norm(str(cname[0].rdata.label))
                continue
            return out, exists or bool(out)
        return out, True


def _question(data: bytes) -> tuple[str, str] | None:
    """(name, type) of a plain one-question query, read straight from the bytes (dnslib's full
    parse is most of the cost of an answer); None for anything unusual (dnslib decides then)."""
    if len(data) < 17 or data[4:6] != b"\x00\x01":
        return None
    labels, pos = [], 12
    while True:
        if pos >= len(data):
            return None
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0:
            return None   # compression in a question: let dnslib read it
        labels.append(data[pos + 1:pos + 1 + length].decode("utf-8", "surrogateescape"))
        pos += 1 + length
    if pos + 4 > len(data):
        return None
    qtype = int.from_bytes(data[pos:pos + 2], "big")
    return _norm(".".join(labels)), str(QTYPE.get(qtype, str(qtype)))


def _renamed(rr: RR, name: str) -> RR:
    return RR(name + ".", rr.rtype, CLASS.IN, rr.ttl, rr.rdata)


__all__ = ["TestDNSServer", "socket"]
