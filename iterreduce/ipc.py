"""Avro RPC over HTTP between the ApplicationMaster (server) and its workers.

Wire format: exactly the Avro specification's RPC over HTTP (stateless transport).
Each HTTP POST (``Content-Type: avro/binary``) carries one framed message: 4-byte
big-endian length frames, terminated by a zero-length frame.  The message is a
HandshakeRequest followed by a call request (metadata ``map<bytes>``, message name,
parameters); the HTTP response carries a HandshakeResponse followed by the call
response (metadata, error flag, response or error union).  A stock
``avro.ipc.Requestor`` + ``avro.ipc.HTTPTransceiver`` can call :class:`IPCServer`.

The codec is hand-written and compiled from the protocol's schemas: small values are
packed into one ``bytearray``; every ``bytes`` value of 64 KiB or more (the NDArray
payloads) is sent as its own frame straight from the caller's memory
(``socket.sendmsg`` scatter-gather), and received into its own preallocated numpy
buffer with ``recv_into`` (16-byte aligned, so :func:`decode_arrays` can hand out
``np.frombuffer`` views without copying).

Protocol text and version: the "protocol text" put on the wire (``clientProtocol`` /
``serverProtocol``) is the packaged ``protocol.avpr`` in canonical JSON (sorted keys,
no whitespace), *including* the top-level ``"iterreduce.version"`` property; the MD5
of that text is the protocol hash.  A peer whose protocol has another name, another
version, or (for peers that cannot carry the property, such as the stock avro
Python library, whose protocol text drops it) different schemas is refused in the
handshake (``match=NONE`` plus a system error call response, and the reason in the
HandshakeResponse ``meta`` under ``iterreduce.error``).

The job token travels in the call metadata under ``iterreduce-token`` (bytes).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import importlib.resources
import json
import logging
import math
import operator
import re
import socket
import struct
import sys
import threading
import time
from typing import Callable

import avro.ipc
import avro.protocol
import avro.schema
import numpy as np

__all__ = [
    "PROTOCOL_VERSION",
    "TOKEN_KEY",
    "PROTOCOL",
    "PROTOCOL_TEXT",
    "PROTOCOL_HASH",
    "RemoteError",
    "RemoteSystemError",
    "HandshakeError",
    "TransportError",
    "encode_arrays",
    "decode_arrays",
    "IPCServer",
    "IPCClient",
]

log = logging.getLogger("iterreduce.ipc")

PROTOCOL_VERSION: int = 2
TOKEN_KEY = "iterreduce-token"
VERSION_PROPERTY = "iterreduce.version"
ERROR_META_KEY = "iterreduce.error"  # in HandshakeResponse.meta when a peer is refused

_BIG = 64 * 1024  # bytes values at least this long travel as their own frame
_MAX_FRAME = 1 << 30  # we never write frames longer than this
_INITIAL_BUFFER = 8 << 20  # a big frame's buffer starts at most this large and grows with the data
_MAX_HEAD = 64 * 1024  # HTTP request/response head
_MAX_RESPONSE = 1 << 34
_U32 = struct.Struct(">I")
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_ZERO_FRAME = b"\x00\x00\x00\x00"


# ----------------------------------------------------------------------------- errors


class RemoteError(Exception):
    """The protocol's declared IterReduceError: raised by handlers, re-raised in clients."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class RemoteSystemError(RemoteError):
    """An Avro system error (the 'string' branch of the error union), e.g. a handler crash."""

    def __init__(self, message: str, code: str = "SYSTEM"):
        super().__init__(code, message)


class HandshakeError(Exception):
    """The peers do not speak the same protocol (name, version or schemas)."""


class TransportError(ConnectionError):
    """Connection refused/reset/timed out, or a malformed HTTP/Avro response."""


class _Malformed(ValueError):
    """Undecodable Avro data."""


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class _TooSlow(socket.timeout):
    """A request that did not arrive within its deadline (however steadily its bytes came)."""


class _EOF(ConnectionError):
    """The peer closed the connection."""

    def __init__(self, msg: str = "connection closed", clean: bool = False):
        super().__init__(msg)
        self.clean = clean  # closed before any byte of a new request/response


# ----------------------------------------------------------------------------- codec


_SMALL_VARINT = [bytes([i]) for i in range(128)]
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1


def _varint(n: int) -> bytes:
    """Zig-zag varint of an Avro long."""
    if n < _LONG_MIN or n > _LONG_MAX:
        raise OverflowError(f"{n} does not fit in an Avro long")
    n = ((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF
    if n < 0x80:
        return _SMALL_VARINT[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _Out:
    """Encoder output: a list of buffers; big bytes values are kept as zero-copy views."""

    __slots__ = ("parts", "buf")

    def __init__(self):
        self.parts: list = []
        self.buf = bytearray()

    def big(self, mv: memoryview) -> None:
        if self.buf:
            self.parts.append(self.buf)
            self.buf = bytearray()
        self.parts.append(mv)

    def finish(self) -> list:
        if self.buf:
            self.parts.append(self.buf)
            self.buf = bytearray()
        parts, self.parts = self.parts, []
        return parts


class _In:
    """Decoder input over a list of memoryview segments (one per received buffer)."""

    __slots__ = ("segs", "si", "mv", "pos", "end")

    def __init__(self, segs):
        self.segs = [s for s in segs if len(s)]
        self.si = 0
        self.mv = self.segs[0] if self.segs else memoryview(b"")
        self.pos = 0
        self.end = len(self.mv)

    def _advance(self) -> None:
        while self.pos >= self.end:
            if self.si + 1 >= len(self.segs):
                raise _Malformed("message truncated")
            self.si += 1
            self.mv = self.segs[self.si]
            self.pos = 0
            self.end = len(self.mv)

    def remaining(self) -> int:
        return self.end - self.pos + sum(len(s) for s in self.segs[self.si + 1 :])

    def byte(self) -> int:
        if self.pos >= self.end:
            self._advance()
        b = self.mv[self.pos]
        self.pos += 1
        return b

    def long(self) -> int:
        b = self.byte()
        n = b & 0x7F
        shift = 7
        while b & 0x80:
            b = self.byte()
            n |= (b & 0x7F) << shift
            shift += 7
            if shift > 70:
                raise _Malformed("varint too long")
        return (n >> 1) ^ -(n & 1)

    def take(self, n: int) -> memoryview:
        """n bytes: a view when they lie in one segment, else gathered (a copy)."""
        if n < 0:
            raise _Malformed(f"negative length {n}")
        if self.pos >= self.end and n:
            self._advance()  # a big value starts its own segment
        pos = self.pos
        if pos + n <= self.end:
            self.pos = pos + n
            return self.mv[pos : pos + n]
        if n > self.remaining():
            raise _Malformed(f"length {n} exceeds the {self.remaining()} bytes left in the message")
        out = bytearray(n)
        got = 0
        while got < n:
            if self.pos >= self.end:
                self._advance()
            k = min(n - got, self.end - self.pos)
            out[got : got + k] = self.mv[self.pos : self.pos + k]
            self.pos += k
            got += k
        return memoryview(out)


_MISSING = object()


class _EncodeError(TypeError):
    def __init__(self, path, msg):
        self.path = path
        self.msg = msg
        super().__init__(msg)

    def __str__(self):
        where = ".".join(str(p) for p in self.path)
        return f"{where}: {self.msg}" if where else self.msg


def _as_bytes_view(datum) -> memoryview:
    if isinstance(datum, np.ndarray):
        if not datum.flags.c_contiguous:
            datum = np.ascontiguousarray(datum)
        return memoryview(datum.reshape(-1).view(np.uint8))
    mv = memoryview(datum)
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format not in ("B", "b", "c"):
        try:
            mv = mv.cast("B")
        except TypeError:
            mv = memoryview(mv.tobytes())
    return mv


def _schema_key(schema) -> str | None:
    return getattr(schema, "fullname", None) if schema.type in ("record", "error", "enum", "fixed") else None


def _compile_encoder(schema, named=None):
    """-> fn(out: _Out, datum)."""
    if named is None:
        named = {}
    t = schema.type
    key = _schema_key(schema)
    if key is not None and key in named:
        return named[key]

    if t == "null":

        def enc(out, d):
            if d is not None:
                raise TypeError(f"expected null, got {type(d).__name__}")

    elif t == "boolean":

        def enc(out, d):
            if d is True or d is False or isinstance(d, (bool, np.bool_)) or d in (0, 1):
                out.buf.append(1 if d else 0)
            else:
                raise TypeError(f"expected boolean, got {type(d).__name__}")

    elif t in ("int", "long"):
        lo, hi = (_INT_MIN, _INT_MAX) if t == "int" else (_LONG_MIN, _LONG_MAX)

        def enc(out, d):
            n = operator.index(d)
            if n < lo or n > hi:
                raise OverflowError(f"{n} does not fit in an Avro {t}")
            out.buf += _varint(n)

    elif t in ("float", "double"):
        packer = (_F32 if t == "float" else _F64).pack

        def enc(out, d):
            if isinstance(d, (str, bytes)) or d is None:
                raise TypeError(f"expected {t}, got {type(d).__name__}")
            out.buf += packer(float(d))

    elif t == "string":

        def enc(out, d):
            if not isinstance(d, str):
                raise TypeError(f"expected string, got {type(d).__name__}")
            b = d.encode("utf-8")
            out.buf += _varint(len(b))
            out.buf += b

    elif t == "bytes":

        def enc(out, d):
            if isinstance(d, str):
                raise TypeError("expected bytes, got str")
            mv = _as_bytes_view(d)
            n = mv.nbytes
            out.buf += _varint(n)
            if n >= _BIG:
                out.big(mv)
            else:
                out.buf += mv

    elif t == "fixed":
        size = schema.size

        def enc(out, d):
            mv = _as_bytes_view(d)
            if mv.nbytes != size:
                raise ValueError(f"expected {size} bytes for fixed {schema.name}, got {mv.nbytes}")
            out.buf += mv

    elif t == "enum":
        index = {s: i for i, s in enumerate(schema.symbols)}

        def enc(out, d):
            i = index.get(d)
            if i is None:
                raise ValueError(f"{d!r} is not a symbol of {schema.name} {list(index)}")
            out.buf += _varint(i)

        named[key] = enc

    elif t == "array":
        item = _compile_encoder(schema.items, named)

        def enc(out, d):
            if isinstance(d, (str, bytes, dict)):
                raise TypeError(f"expected array, got {type(d).__name__}")
            if not isinstance(d, (list, tuple)):
                d = list(d)
            if d:
                out.buf += _varint(len(d))
                for i, x in enumerate(d):
                    try:
                        item(out, x)
                    except _EncodeError as e:
                        e.path.insert(0, i)
                        raise
                    except (TypeError, ValueError, OverflowError, struct.error) as e:
                        raise _EncodeError([i], str(e)) from None
            out.buf.append(0)

    elif t == "map":
        value = _compile_encoder(schema.values, named)

        def enc(out, d):
            if not hasattr(d, "items"):
                raise TypeError(f"expected map (dict), got {type(d).__name__}")
            if d:
                out.buf += _varint(len(d))
                for k, v in d.items():
                    if not isinstance(k, str):
                        raise TypeError(f"map keys must be strings, got {type(k).__name__}")
                    kb = k.encode("utf-8")
                    out.buf += _varint(len(kb))
                    out.buf += kb
                    try:
                        value(out, v)
                    except _EncodeError as e:
                        e.path.insert(0, k)
                        raise
                    except (TypeError, ValueError, OverflowError, struct.error) as e:
                        raise _EncodeError([k], str(e)) from None
            out.buf.append(0)

    elif t in ("union", "error_union"):
        branches = [(_matcher(s), _compile_encoder(s, named), _varint(i)) for i, s in enumerate(schema.schemas)]

        def enc(out, d):
            for match, benc, tag in branches:
                if match(d):
                    out.buf += tag
                    benc(out, d)
                    return
            raise TypeError(f"{type(d).__name__} matches no branch of union {[s.type for s in schema.schemas]}")

    elif t in ("record", "error", "request"):
        fields = []

        def enc(out, d):
            if not hasattr(d, "get"):
                raise TypeError(f"expected record (dict), got {type(d).__name__}")
            for name, fenc, has_default, default in fields:
                v = d.get(name, _MISSING)
                if v is _MISSING:
                    if not has_default:
                        raise _EncodeError([name], "missing field")
                    v = default
                try:
                    fenc(out, v)
                except _EncodeError as e:
                    e.path.insert(0, name)
                    raise
                except (TypeError, ValueError, OverflowError, struct.error) as e:
                    raise _EncodeError([name], str(e)) from None

        if key is not None:
            named[key] = enc  # before the fields: recursive types
        for f in schema.fields:
            fields.append((f.name, _compile_encoder(f.type, named), f.has_default, f.default if f.has_default else None))
    else:
        raise NotImplementedError(f"Avro type {t}")
    if key is not None:
        named[key] = enc
    return enc


def _matcher(schema):
    """Predicate choosing a union branch for a Python datum."""
    t = schema.type
    if t == "null":
        return lambda d: d is None
    if t == "boolean":
        return lambda d: isinstance(d, (bool, np.bool_))
    if t in ("int", "long"):
        return lambda d: isinstance(d, (int, np.integer)) and not isinstance(d, bool)
    if t in ("float", "double"):
        return lambda d: isinstance(d, (int, float, np.integer, np.floating)) and not isinstance(d, bool)
    if t == "string":
        return lambda d: isinstance(d, str)
    if t in ("bytes", "fixed"):
        return lambda d: isinstance(d, (bytes, bytearray, memoryview, np.ndarray))
    if t == "enum":
        symbols = set(schema.symbols)
        return lambda d: isinstance(d, str) and d in symbols
    if t == "array":
        return lambda d: isinstance(d, (list, tuple))
    if t == "map":
        return lambda d: isinstance(d, dict)
    if t in ("record", "error", "request"):
        required = {f.name for f in schema.fields if not f.has_default}
        return lambda d: isinstance(d, dict) and required <= d.keys()
    return lambda d: False


def _compile_decoder(schema, named=None):
    """-> fn(inp: _In) -> datum.  bytes values decode to memoryviews (zero copy)."""
    if named is None:
        named = {}
    t = schema.type
    key = _schema_key(schema)
    if key is not None and key in named:
        return named[key]
    if t == "null":

        def dec(inp):
            return None

    elif t == "boolean":

        def dec(inp):
            b = inp.byte()
            if b > 1:
                raise _Malformed(f"bad boolean byte {b}")
            return b == 1

    elif t in ("int", "long"):

        def dec(inp):
            return inp.long()

    elif t in ("float", "double"):
        unpack = (_F32 if t == "float" else _F64).unpack
        size = 4 if t == "float" else 8

        def dec(inp):
            return unpack(inp.take(size))[0]

    elif t == "string":

        def dec(inp):
            return str(inp.take(inp.long()), "utf-8")

    elif t == "bytes":

        def dec(inp):
            return inp.take(inp.long())

    elif t == "fixed":
        size = schema.size

        def dec(inp):
            return bytes(inp.take(size))

    elif t == "enum":
        symbols = list(schema.symbols)

        def dec(inp):
            i = inp.long()
            if not 0 <= i < len(symbols):
                raise _Malformed(f"enum index {i} out of range for {schema.name}")
            return symbols[i]

    elif t == "array":
        item = _compile_decoder(schema.items, named)

        def dec(inp):
            out = []
            while True:
                n = inp.long()
                if n == 0:
                    return out
                if n < 0:
                    n = -n
                    inp.long()  # block size in bytes
                if n > inp.remaining():
                    raise _Malformed(f"array block of {n} items exceeds the message")
                for _ in range(n):
                    out.append(item(inp))

    elif t == "map":
        value = _compile_decoder(schema.values, named)

        def dec(inp):
            out = {}
            while True:
                n = inp.long()
                if n == 0:
                    return out
                if n < 0:
                    n = -n
                    inp.long()
                if n > inp.remaining():
                    raise _Malformed(f"map block of {n} entries exceeds the message")
                for _ in range(n):
                    k = str(inp.take(inp.long()), "utf-8")
                    out[k] = value(inp)

    elif t in ("union", "error_union"):
        branches = [_compile_decoder(s, named) for s in schema.schemas]

        def dec(inp):
            i = inp.long()
            if not 0 <= i < len(branches):
                raise _Malformed(f"union index {i} out of range")
            return branches[i](inp)

    elif t in ("record", "error", "request"):
        fields = []

        def dec(inp):
            return {name: fdec(inp) for name, fdec in fields}

        if key is not None:
            named[key] = dec
        for f in schema.fields:
            fields.append((f.name, _compile_decoder(f.type, named)))
    else:
        raise NotImplementedError(f"Avro type {t}")
    if key is not None:
        named[key] = dec
    return dec


def _decode(fn, inp):
    try:
        return fn(inp)
    except _Malformed:
        raise
    except (IndexError, ValueError, struct.error, OverflowError, MemoryError) as e:
        raise _Malformed(f"{type(e).__name__}: {e}") from None


def _encode(fn, out, datum):
    try:
        fn(out, datum)
    except _EncodeError:
        raise
    except (TypeError, ValueError, OverflowError, struct.error) as e:
        raise _EncodeError([], str(e)) from None


_HS_REQ_ENC = _compile_encoder(avro.ipc.HANDSHAKE_REQUEST_SCHEMA)
_HS_REQ_DEC = _compile_decoder(avro.ipc.HANDSHAKE_REQUEST_SCHEMA)
_HS_RESP_ENC = _compile_encoder(avro.ipc.HANDSHAKE_RESPONSE_SCHEMA)
_HS_RESP_DEC = _compile_decoder(avro.ipc.HANDSHAKE_RESPONSE_SCHEMA)
_META_ENC = _compile_encoder(avro.ipc.META_SCHEMA)
_META_DEC = _compile_decoder(avro.ipc.META_SCHEMA)
_STRING_ENC = _compile_encoder(avro.schema.parse('"string"'))
_STRING_DEC = _compile_decoder(avro.schema.parse('"string"'))


# ----------------------------------------------------------------------------- protocol


def _strip_docs(obj):
    if isinstance(obj, dict):
        return {k: _strip_docs(v) for k, v in obj.items() if k != "doc"}
    if isinstance(obj, list):
        return [_strip_docs(v) for v in obj]
    return obj


class _ProtocolInfo:
    """A protocol text as seen in a handshake: name, iterreduce version, wire shape."""

    def __init__(self, text: str):
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("protocol text is not a JSON object")
        self.text = text
        self.name = obj.get("protocol")
        self.version = obj.get(VERSION_PROPERTY)
        self.protocol = avro.protocol.parse(text)
        # the schemas as they travel: avro's normal form, docs and custom properties dropped
        self.shape = json.dumps(_strip_docs(json.loads(str(self.protocol))), sort_keys=True)

    def describe(self) -> str:
        return f"{self.name} v{self.version}" if self.version is not None else f"{self.name} (unversioned)"


def _mismatch(client: _ProtocolInfo, server: _ProtocolInfo) -> str | None:
    """None when client and server speak the same protocol, else the reason."""
    if client.name != server.name or (
        client.version is not None and server.version is not None and client.version != server.version
    ):
        cv = f"v{client.version}" if client.version is not None else "(unversioned)"
        sv = f"v{server.version}" if server.version is not None else "(unversioned)"
        sname = "" if client.name == server.name else f"{server.name} "
        return f"protocol version mismatch: client speaks {client.name} {cv}, master speaks {sname}{sv}"
    if client.shape != server.shape:
        if client.version is None or server.version is None:
            return (
                f"protocol mismatch: client speaks {client.describe()} whose schemas differ from "
                f"the master's {server.describe()}"
            )
        return f"protocol mismatch: client and master both claim {server.describe()} but their schemas differ"
    return None


def _load_protocol_text() -> str:
    raw = importlib.resources.files("iterreduce").joinpath("protocol.avpr").read_text("utf-8")
    return json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))


PROTOCOL_TEXT: str = _load_protocol_text()
PROTOCOL_HASH: bytes = hashlib.md5(PROTOCOL_TEXT.encode("utf-8")).digest()
_LOCAL = _ProtocolInfo(PROTOCOL_TEXT)
PROTOCOL = _LOCAL.protocol
if _LOCAL.version != PROTOCOL_VERSION:
    raise ImportError(
        f"iterreduce/protocol.avpr has {VERSION_PROPERTY}={_LOCAL.version!r} "
        f"but iterreduce.ipc.PROTOCOL_VERSION is {PROTOCOL_VERSION}"
    )


class _Message:
    __slots__ = ("name", "fields", "req_enc", "req_dec", "resp_enc", "resp_dec", "err_enc", "err_dec")

    def __init__(self, m):
        self.name = m.name
        self.fields = [f.name for f in m.request.fields]
        self.req_enc = _compile_encoder(m.request)
        self.req_dec = _compile_decoder(m.request)
        self.resp_enc = _compile_encoder(m.response)
        self.resp_dec = _compile_decoder(m.response)
        self.err_enc = _compile_encoder(m.errors)
        self.err_dec = _compile_decoder(m.errors)


def _compile_messages(protocol) -> dict:
    return {name: _Message(m) for name, m in (protocol.messages or {}).items()}


_MESSAGES = _compile_messages(PROTOCOL)


# ----------------------------------------------------------------------------- arrays

_ARRAY_KINDS = set("biufcmMSU")


def _check_dtype(name, dt: np.dtype, ds=None) -> None:
    if dt.hasobject or dt.kind not in _ARRAY_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise ValueError(f"array {name!r}: unsupported dtype {ds if ds is not None else dt.str!r}")


def encode_arrays(arrays: dict) -> list:
    """{name: array} -> NDArray records (little-endian, C order; data is a zero-copy view when possible)."""
    records = []
    for name, a in arrays.items():
        arr = np.asarray(a)
        dt = arr.dtype
        _check_dtype(name, dt)
        if dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big"):
            dt = dt.newbyteorder("<")
            arr = arr.astype(dt)
        shape = [int(s) for s in arr.shape]
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        data = memoryview(arr.reshape(-1).view(np.uint8))
        records.append({"name": str(name), "dtype": dt.str, "shape": shape, "data": data})
    return records


def decode_arrays(records: list) -> dict:
    """NDArray records -> {name: array}: np.frombuffer views of the received bytes (no copy,
    except for payloads that arrived misaligned for their dtype, e.g. from foreign senders)."""
    out = {}
    for rec in records:
        name = rec["name"]
        ds = rec["dtype"]
        if not isinstance(ds, str) or ds[:1] not in ("<", "|"):
            raise ValueError(f"array {name!r}: dtype {ds!r} is not an explicit little-endian numpy dtype")
        try:
            dt = np.dtype(ds)
        except (TypeError, ValueError):
            raise ValueError(f"array {name!r}: invalid dtype {ds!r}") from None
        _check_dtype(name, dt, ds)
        shape = [operator.index(s) for s in rec["shape"]]
        if any(s < 0 for s in shape):
            raise ValueError(f"array {name!r}: negative dimension in shape {shape}")
        count = math.prod(shape)
        nbytes = count * dt.itemsize
        mv = _as_bytes_view(rec["data"])
        if mv.nbytes != nbytes:
            raise ValueError(
                f"array {name!r}: {mv.nbytes} bytes of data for shape {shape} and dtype {ds} "
                f"({nbytes} expected)"
            )
        if name in out:
            raise ValueError(f"array {name!r}: appears twice")
        arr = np.frombuffer(mv, dtype=dt, count=count)
        if not arr.flags.aligned:
            arr = arr.copy()
        out[name] = arr.reshape(shape)
    return out


# ----------------------------------------------------------------------------- HTTP plumbing


class _Conn:
    """A socket with a small read-ahead buffer (HTTP heads, frame headers)."""

    __slots__ = ("sock", "rbuf", "pool", "deadline", "io_timeout")

    def __init__(self, sock: socket.socket, io_timeout: float | None = None):
        self.sock = sock
        self.rbuf = bytearray()
        self.pool: list = []  # big-frame buffers, reused once nothing refers to them any more
        # the server's: reads wait at most io_timeout for a byte, and end by the deadline (monotonic)
        self.deadline: float | None = None
        self.io_timeout = io_timeout

    def _wait(self) -> None:
        """Before a read: its timeout, the shorter of ``io_timeout`` and what the deadline leaves."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _TooSlow("the request did not arrive in the time it is given")
            self.sock.settimeout(min(self.io_timeout, left) if self.io_timeout else left)

    def _fill(self) -> None:
        self._wait()
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _EOF("connection closed mid-message")
        self.rbuf += chunk

    def read_head(self, limit: int = _MAX_HEAD) -> bytes:
        """Bytes up to and including the blank line; _EOF(clean=True) if closed before any byte."""
        start = 0
        while True:
            i = self.rbuf.find(b"\r\n\r\n", start)
            if i >= 0 and i + 4 > limit:
                raise _BadRequest(431, "Request Header Fields Too Large", "HTTP head too large")
            if i >= 0:
                head = bytes(self.rbuf[: i + 4])
                del self.rbuf[: i + 4]
                return head
            if len(self.rbuf) > limit:
                raise _BadRequest(431, "Request Header Fields Too Large", "HTTP head too large")
            start = max(0, len(self.rbuf) - 3)
            self._wait()
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _EOF("connection closed", clean=not self.rbuf)
            self.rbuf += chunk

    def read_exact(self, n: int) -> bytes:
        while len(self.rbuf) < n:
            self._fill()
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    def read_some_into(self, mv: memoryview) -> int:
        if self.rbuf:
            k = min(len(mv), len(self.rbuf))
            mv[:k] = self.rbuf[:k]
            del self.rbuf[:k]
            return k
        self._wait()
        k = self.sock.recv_into(mv)
        if k == 0:
            raise _EOF("connection closed mid-frame")
        return k

    def discard(self, n: int) -> None:
        """Skip n body bytes (bounded scratch buffer)."""
        scratch = memoryview(bytearray(min(n, 65536)))
        while n > 0:
            n -= self.read_some_into(scratch[: min(n, len(scratch))])


_POOL_SIZE = 4
_POOL_MAX_BYTES = 256 << 20


def _pooled(conn: _Conn, n: int):
    """A pooled buffer of at least n bytes that no array, view or segment refers to any more."""
    best = None
    for buf in conn.pool:
        # references: the pool list, `buf`, getrefcount's argument -- nothing else
        if buf.nbytes >= n and sys.getrefcount(buf) == 3 and (best is None or buf.nbytes < best.nbytes):
            best = buf
    return best


def _read_big_frame(conn: _Conn, n: int, head: bytes = b"") -> memoryview:
    """n payload bytes (the first of them already read: ``head``) into an aligned numpy
    buffer: a free one from the connection's pool (no page faults), else a fresh one that
    grows with the data received (never more than 4x what actually arrived, whatever length
    was claimed)."""
    arr = _pooled(conn, n)
    if arr is not None:
        view = memoryview(arr)[:n]
        view[:len(head)] = head
        got = len(head)
        while got < n:
            got += conn.read_some_into(view[got:])
        return view
    cap = min(n, max(_INITIAL_BUFFER, len(head)))
    arr = np.empty(cap, dtype=np.uint8)
    view = memoryview(arr)
    view[:len(head)] = head
    got = len(head)
    while got < n:
        if got == cap:
            cap = min(n, cap * 4)
            bigger = np.empty(cap, dtype=np.uint8)
            bigger[:got] = arr[:got]
            arr = bigger
            view = memoryview(arr)
        got += conn.read_some_into(view[got:cap])
    if n <= _POOL_MAX_BYTES:
        if len(conn.pool) >= _POOL_SIZE:
            conn.pool.pop(0)
        conn.pool.append(arr)
    return view


class _BadFrame(ValueError):
    pass


class _Unauthorized(Exception):
    """A request whose first bytes carry no valid job token: the rest is not read."""

    def __init__(self, prefix: bytes):
        super().__init__("missing or wrong job token")
        self.prefix = prefix


_GATE_BYTES = 1 << 20  # at most this much of a request is read before its token is checked


def _read_frames(conn: _Conn, length: int, gate: Callable[[bytes], bool | None] | None = None) -> list:
    """Read an Avro framed message that fills exactly `length` body bytes -> memoryview segments.

    ``gate(prefix)`` (the server's token check) sees the request's first bytes, before a big
    frame is read (with up to ``_GATE_BYTES`` of that frame) or once the small frames pass
    ``_GATE_BYTES``; unless it says True (the token is there) :class:`_Unauthorized` is raised
    before any more of the body is read, so a caller without the token cannot make the server
    buffer a big body. (The handshake and the call metadata come first in every request.)"""
    left = length
    segs = []
    small = bytearray()

    def check(extra: bytes = b"", verdict: bool | None = None) -> None:
        """Ask the gate (once) about the small frames plus ``extra``, unless ``verdict`` is
        already its answer for them; anything but True ends the request."""
        nonlocal gate
        prefix = bytes(small) + extra
        if verdict is None:
            verdict = gate(prefix)
        gate = None
        if verdict is not True:  # False: no or a wrong token; None: no handshake and metadata first
            raise _Unauthorized(prefix)

    while True:
        if left < 4:
            raise _BadFrame(f"body ends inside a frame header ({left} bytes left)")
        (n,) = _U32.unpack(conn.read_exact(4))
        left -= 4
        if n == 0:
            break
        if n > left:
            raise _BadFrame(f"frame of {n} bytes exceeds the {left} bytes left in the body")
        left -= n
        if n < _BIG:
            small += conn.read_exact(n)
            if gate is not None and len(small) > _GATE_BYTES:
                check()
        else:
            head = b""
            if gate is not None:
                # the small frames alone may settle it (then no byte of the big frame is needed);
                # else the handshake is in this frame (a big call metadata, say)
                verdict = gate(bytes(small)) if small else None
                if verdict is not None:
                    check(verdict=verdict)
                else:
                    head = conn.read_exact(min(n, _GATE_BYTES))
                    check(head)
            if small:
                segs.append(memoryview(small))
                small = bytearray()
            segs.append(_read_big_frame(conn, n, head))
    # Avro's Java Requestor sends a message's parameters as a frame of their own, so a message
    # without parameters (status) ends with two zero-length frames: further empty frames are
    # taken, as Java's and Python's readers take them; any other bytes there are refused
    while left >= 4 and conn.read_exact(4) == b"\0\0\0\0":
        left -= 4
    if left:
        raise _BadFrame(f"{left} bytes after the final (zero-length) frame")
    if small:
        segs.append(memoryview(small))
    return segs


def _frame(parts: list) -> tuple[list, int]:
    """Avro framing of a message given as buffers -> (iovecs, total length)."""
    iov = []
    total = 0
    for p in parts:
        mv = p if isinstance(p, memoryview) else memoryview(p)
        n = mv.nbytes
        off = 0
        while off < n:
            k = min(n - off, _MAX_FRAME)
            iov.append(_U32.pack(k))
            iov.append(mv[off : off + k] if (off or k != n) else mv)
            total += 4 + k
            off += k
    iov.append(_ZERO_FRAME)
    return iov, total + 4


def _sendv(sock: socket.socket, bufs: list) -> None:
    """sendmsg scatter-gather of all buffers (handles partial sends)."""
    bufs = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
    bufs = [b for b in bufs if b.nbytes]
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i : i + 512])
        while sent > 0:
            n = bufs[i].nbytes
            if sent >= n:
                sent -= n
                i += 1
            else:
                bufs[i] = bufs[i][sent:]
                sent = 0


def _parse_head(head: bytes):
    """-> (first line parts, {lower-case header: value})."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise _BadRequest(400, "Bad Request", "undecodable HTTP head") from None
    lines = text.split("\r\n")
    first = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        k, sep, v = line.partition(":")
        if not sep:
            raise _BadRequest(400, "Bad Request", "malformed HTTP header line")
        headers[k.strip().lower()] = v.strip()
    return first, headers


def _http_response(status: int, reason: str, body: bytes = b"", close: bool = True, ctype: str = "text/plain"):
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode("latin-1") + body


# ----------------------------------------------------------------------------- server


MAX_MESSAGE_BYTES = 1 << 30
"""The largest request body the master takes (a worker's update with its arrays)."""


class IPCServer:
    """Serves the IterReduce protocol to workers: one thread per HTTP/1.1 keep-alive connection.

    What a peer without the job token can make it hold is bounded: at most ``max_connections``
    connections that have not yet shown the token (more are answered 503 and closed), each of
    which must send the first byte of its first request within ``io_timeout`` of connecting,
    and its HTTP head and the start of its request (handshake, call metadata: up to 1 MiB)
    within ``io_timeout`` of that byte. Once a connection has shown the token (it is one of
    this job's workers) it is not counted, and its reads only have to keep coming (each
    within ``io_timeout``: a big update through a congested link takes what it takes); a
    keep-alive connection may idle ``idle_timeout`` between requests."""

    def __init__(
        self,
        handler,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        max_request_bytes: int = MAX_MESSAGE_BYTES,
        io_timeout: float = 60.0,
        max_connections: int = 1024,
    ):
        if not token:
            raise ValueError("an IPCServer needs a non-empty token")
        self._handler = handler
        self._token = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        self._host = host
        self._port = port
        self.max_request_bytes = int(max_request_bytes)
        self.io_timeout = float(io_timeout)
        self.idle_timeout = max(600.0, self.io_timeout)  # keep-alive connection waiting for a request
        self.max_connections = int(max_connections)
        self.turned_away = 0  # connections refused for max_connections
        self._turned_away_logged = 0.0
        self._lsock: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set = set()
        self._untrusted: set = set()  # connections that have not shown the token yet
        self._lock = threading.Lock()
        # client protocol hash -> None (accepted) or the refusal reason
        self._verdicts: collections.OrderedDict = collections.OrderedDict()
        self._verdicts[PROTOCOL_HASH] = None
        self._verdicts[PROTOCOL.md5] = None  # our protocol as the stock avro library hashes it
        self._pinned = 2
        self.bytes_in = 0
        self.bytes_out = 0
        self.calls = 0
        self.rejected = 0

    def __repr__(self) -> str:
        return f"IPCServer({self.url if self._lsock else 'not started'})"

    # -- lifecycle

    def start(self) -> "IPCServer":
        if self._lsock is not None:
            return self
        lsock = socket.create_server((self._host, self._port), backlog=128, reuse_port=False)
        lsock.settimeout(0.25)
        self._lsock = lsock
        self._accept_thread = threading.Thread(target=self._accept_loop, name="iterreduce-ipc-accept", daemon=True)
        self._accept_thread.start()
        log.info("IPC server listening on %s", self.url)
        return self

    @property
    def address(self) -> tuple:
        if self._lsock is None:
            raise RuntimeError("IPCServer not started")
        host, port = self._lsock.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    def stop(self) -> None:
        self._stopping.set()
        lsock, self._lsock = self._lsock, None
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        if lsock is not None:
            lsock.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _accept_loop(self) -> None:
        lsock = self._lsock
        while not self._stopping.is_set():
            try:
                sock, peer = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                log.exception("accept failed")
                continue
            with self._lock:
                full = len(self._untrusted) >= self.max_connections
                if not full:
                    self._conns.add(sock)
                    self._untrusted.add(sock)
            if full:
                self._turn_away(sock, peer)
                continue
            t = threading.Thread(
                target=self._serve_conn, args=(sock, peer), name=f"iterreduce-ipc-{peer[1]}", daemon=True
            )
            t.start()

    def _turn_away(self, sock: socket.socket, peer) -> None:
        """A connection beyond ``max_connections``: a 503, closed at once (logged once per 10 s)."""
        self.turned_away += 1
        now = time.monotonic()
        if now - self._turned_away_logged >= 10.0:
            self._turned_away_logged = now
            log.warning("turned away a connection from %s:%s: %d connections that have not shown the job token "
                        "are open, the most this master serves (%d turned away so far)", peer[0], peer[1],
                        self.max_connections, self.turned_away)
        try:
            sock.settimeout(0.5)
            sock.sendall(_http_response(503, "Service Unavailable", b"too many connections\n"))
        except OSError:
            pass
        finally:
            sock.close()

    def _count(self, nin: int, nout: int, calls: int = 0) -> None:
        with self._lock:
            self.bytes_in += nin
            self.bytes_out += nout
            self.calls += calls

    # -- one connection

    def _drain(self, sock: socket.socket, max_bytes: int = 256 << 20, max_seconds: float = 10.0) -> None:
        """After answering a request whose body was not read: stop sending, then read and drop
        what the client still sends (at most ``max_bytes`` / ``max_seconds``), so that it can
        finish sending and read the answer instead of meeting a reset."""
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline, left, scratch = time.monotonic() + max_seconds, max_bytes, bytearray(1 << 16)
            while left > 0 and time.monotonic() < deadline:
                sock.settimeout(max(0.05, min(self.io_timeout, deadline - time.monotonic())))
                k = sock.recv_into(scratch)
                if k == 0:
                    return
                left -= k
        except OSError:
            pass

    def _reject(self, sock, peer, status, reason, detail) -> None:
        with self._lock:
            self.rejected += 1
        log.warning("rejected request from %s:%s: %s %s", peer[0], peer[1], status, detail)
        try:
            sock.sendall(_http_response(status, reason, (detail + "\n").encode("utf-8", "replace")))
        except OSError:
            pass

    def _serve_conn(self, sock: socket.socket, peer) -> None:
        conn = _Conn(sock, self.io_timeout)
        served = 0
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._stopping.is_set():
                # a new connection's first request must begin soon; a keep-alive one may idle
                sock.settimeout(self.idle_timeout if served else self.io_timeout)
                try:
                    if not conn.rbuf:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        conn.rbuf += chunk
                    if sock in self._untrusted:  # its head and its request's start must come soon
                        conn.deadline = time.monotonic() + self.io_timeout
                    head = conn.read_head()
                except _EOF:
                    return
                except _BadRequest as e:
                    self._reject(sock, peer, e.status, e.reason, e.detail)
                    return
                try:
                    first, headers = _parse_head(head)
                    if len(first) != 3 or not first[2].startswith("HTTP/1."):
                        raise _BadRequest(400, "Bad Request", "not an HTTP/1.x request")
                    if first[0] != "POST":
                        raise _BadRequest(405, "Method Not Allowed", f"method {first[0]!r} not allowed, use POST")
                    if "transfer-encoding" in headers:
                        raise _BadRequest(411, "Length Required", "chunked bodies are not supported")
                    cl = headers.get("content-length")
                    if cl is None:
                        raise _BadRequest(411, "Length Required", "Content-Length required")
                    if not re.fullmatch(r"[0-9]{1,19}", cl):  # ASCII digits (str.isdigit takes '²')
                        raise _BadRequest(400, "Bad Request", f"bad Content-Length {cl[:40]!r}")
                    length = int(cl)
                    if length > self.max_request_bytes:
                        raise _BadRequest(
                            413, "Content Too Large", f"body of {length} bytes exceeds {self.max_request_bytes}"
                        )
                    try:
                        segs = _read_frames(conn, length, gate=lambda prefix: self._gate(conn, sock, prefix))
                    except _BadFrame as e:
                        raise _BadRequest(400, "Bad Request", f"bad framing: {e}") from None
                except _BadRequest as e:
                    self._reject(sock, peer, e.status, e.reason, e.detail)
                    self._drain(sock)  # the body was not read (all of it): let the client read the answer
                    return
                except _Unauthorized as e:  # answer from the head of it (BAD_TOKEN); never buffer the rest
                    try:
                        iov, total = _frame(self._respond([memoryview(e.prefix)], peer))
                    except _BadRequest as bad:
                        self._reject(sock, peer, bad.status, bad.reason,
                                     f"{bad.detail} (a request starts with its handshake and call metadata)")
                        self._drain(sock)
                        return
                    _sendv(sock, [f"HTTP/1.1 200 OK\r\nContent-Type: avro/binary\r\nContent-Length: {total}\r\n"
                                  "Connection: close\r\n\r\n".encode("latin-1")] + iov)
                    self._drain(sock)
                    return
                conn.deadline = None
                sock.settimeout(self.io_timeout)
                if sock in self._untrusted and segs and self._token_in(bytes(segs[0][:_GATE_BYTES])):
                    self._trust(sock)  # a small request, whose token the gate did not need to see
                served += 1
                keep_alive = headers.get("connection", "").lower() != "close" and first[2] != "HTTP/1.0"
                try:
                    parts = self._respond(segs, peer)
                except _BadRequest as e:
                    self._reject(sock, peer, e.status, e.reason, e.detail)
                    return
                del segs
                iov, total = _frame(parts)
                head_out = (
                    f"HTTP/1.1 200 OK\r\nContent-Type: avro/binary\r\nContent-Length: {total}\r\n"
                    + ("" if keep_alive else "Connection: close\r\n")
                    + "\r\n"
                ).encode("latin-1")
                self._count(len(head) + length, 0, 1)
                _sendv(sock, [head_out] + iov)
                self._count(0, len(head_out) + total)
                if not keep_alive:
                    return
        except _EOF as e:
            log.warning("connection from %s:%s closed mid-request: %s", peer[0], peer[1], e)
        except socket.timeout as e:  # a read that waited io_timeout, or met the request's deadline
            if isinstance(e, _TooSlow) or (conn.deadline is not None and time.monotonic() >= conn.deadline - 0.01):
                log.warning("connection from %s:%s closed: the request did not arrive in the time it is given "
                            "(%.0f s for the head and the request's start, then a second per MiB)",
                            peer[0], peer[1], self.io_timeout)
            else:
                log.warning("connection from %s:%s timed out after %.1fs of silence", peer[0], peer[1],
                            self.io_timeout)
        except OSError as e:
            if not self._stopping.is_set():  # a peer that died resets its connections: its loss is logged elsewhere
                level = logging.DEBUG if isinstance(e, (ConnectionResetError, BrokenPipeError)) else logging.INFO
                log.log(level, "connection from %s:%s failed: %s", peer[0], peer[1], e)
        except Exception:
            log.exception("unexpected error serving %s:%s", peer[0], peer[1])
        finally:
            with self._lock:
                self._conns.discard(sock)
                self._untrusted.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    # -- Avro

    def _judge(self, client_hash: bytes, client_protocol: str) -> str | None:
        """Verdict on a client protocol text (cached by hash when the hash is honest)."""
        try:
            info = _ProtocolInfo(client_protocol)
            verdict = _mismatch(info, _LOCAL)
        except Exception as e:
            verdict = f"protocol mismatch: cannot parse the client's protocol: {type(e).__name__}: {e}"
        if hashlib.md5(client_protocol.encode("utf-8")).digest() == client_hash:
            with self._lock:
                self._verdicts[client_hash] = verdict
                while len(self._verdicts) > 64 + self._pinned:
                    # keep our own two hashes (first in order) pinned
                    items = iter(self._verdicts)
                    for _ in range(self._pinned):
                        next(items)
                    del self._verdicts[next(items)]
        return verdict

    def _gate(self, conn: _Conn, sock: socket.socket, prefix: bytes) -> bool | None:
        """:meth:`_token_in`; once the token has passed, the rest of the body has no deadline
        (each read still waits at most ``io_timeout``) and the connection is trusted."""
        verdict = self._token_in(prefix)
        if verdict is True:
            conn.deadline = None
            self._trust(sock)
        return verdict

    def _trust(self, sock: socket.socket) -> None:
        with self._lock:
            self._untrusted.discard(sock)

    def _token_in(self, prefix: bytes) -> bool | None:
        """Whether the request starting with ``prefix`` carries the job token (None: the
        handshake and call metadata are not all there yet)."""
        inp = _In([memoryview(prefix)])
        try:
            _decode(_HS_REQ_DEC, inp)
            meta = _decode(_META_DEC, inp)
        except _Malformed:
            return None
        token = meta.get(TOKEN_KEY)
        return token is not None and hmac.compare_digest(bytes(token), self._token)

    def _respond(self, segs, peer) -> list:
        inp = _In(segs)
        try:
            hs = _decode(_HS_REQ_DEC, inp)
        except _Malformed as e:
            raise _BadRequest(400, "Bad Request", f"malformed Avro handshake: {e}") from None
        client_hash = hs["clientHash"]
        server_hash = hs["serverHash"]
        client_protocol = hs["clientProtocol"]
        out = _Out()
        with self._lock:
            known = client_hash in self._verdicts
            verdict = self._verdicts.get(client_hash)
        if client_protocol is not None and (not known or verdict is not None):
            verdict = self._judge(client_hash, client_protocol)
            known = True
        if not known:
            # the spec's "unknown client": tell it who we are; it resends with its protocol
            _HS_RESP_ENC(out, {"match": "NONE", "serverProtocol": PROTOCOL_TEXT, "serverHash": PROTOCOL_HASH, "meta": None})
            return out.finish()
        if verdict is not None:
            log.warning("refused client %s:%s: %s", peer[0], peer[1], verdict)
            with self._lock:
                self.rejected += 1
            _HS_RESP_ENC(
                out,
                {
                    "match": "NONE",
                    "serverProtocol": PROTOCOL_TEXT,
                    "serverHash": PROTOCOL_HASH,
                    "meta": {ERROR_META_KEY: verdict.encode("utf-8")},
                },
            )
            _META_ENC(out, {})
            out.buf.append(1)
            out.buf += _varint(0)  # error union branch 0: the system error string
            _STRING_ENC(out, verdict)
            return out.finish()
        if server_hash == PROTOCOL_HASH:
            _HS_RESP_ENC(out, {"match": "BOTH", "serverProtocol": None, "serverHash": None, "meta": None})
        else:
            _HS_RESP_ENC(
                out, {"match": "CLIENT", "serverProtocol": PROTOCOL_TEXT, "serverHash": PROTOCOL_HASH, "meta": None}
            )
        head = out.finish()
        return head + self._call(inp, peer)

    def _system_error(self, text: str) -> list:
        out = _Out()
        _META_ENC(out, {})
        out.buf.append(1)
        out.buf += _varint(0)
        _STRING_ENC(out, text)
        return out.finish()

    def _declared_error(self, msg: _Message, code: str, text: str) -> list:
        out = _Out()
        _META_ENC(out, {})
        out.buf.append(1)
        msg.err_enc(out, {"code": code, "message": text})
        return out.finish()

    def _call(self, inp: _In, peer) -> list:
        try:
            meta = _decode(_META_DEC, inp)
            name = _decode(_STRING_DEC, inp)
        except _Malformed as e:
            log.warning("malformed call request from %s:%s: %s", peer[0], peer[1], e)
            return self._system_error(f"malformed call request: {e}")
        msg = _MESSAGES.get(name)
        if msg is None:
            log.warning("unknown message %r from %s:%s", name[:100], peer[0], peer[1])
            return self._system_error(f"unknown message: {name[:100]!r}")
        token = meta.get(TOKEN_KEY)
        if token is None or not hmac.compare_digest(bytes(token), self._token):
            with self._lock:
                self.rejected += 1
            log.warning(
                "rejected %s call from %s:%s: %s job token", name, peer[0], peer[1], "missing" if token is None else "wrong"
            )
            return self._declared_error(msg, "BAD_TOKEN", "missing or wrong job token")
        try:
            request = _decode(msg.req_dec, inp)
        except _Malformed as e:
            log.warning("malformed %s request from %s:%s: %s", name, peer[0], peer[1], e)
            return self._declared_error(msg, "BAD_REQUEST", f"malformed {name} request: {e}")
        fn = getattr(self._handler, name, None)
        if fn is None:
            return self._system_error(f"message {name!r} is not implemented by this server")
        try:
            response = fn(**request)
        except RemoteError as e:
            if isinstance(e, RemoteSystemError):
                return self._system_error(e.message)
            return self._declared_error(msg, str(e.code), str(e.message))
        except Exception as e:
            log.exception("handler for %s failed", name)
            return self._system_error(f"{type(e).__name__}: {e}")
        out = _Out()
        _META_ENC(out, {})
        out.buf.append(0)
        try:
            _encode(msg.resp_enc, out, response)
        except _EncodeError as e:
            log.error("handler for %s returned a response that does not match the schema: %s", name, e)
            return self._system_error(f"bad {name} response from the server: {e}")
        return out.finish()


# ----------------------------------------------------------------------------- client


class IPCClient:
    """One persistent keep-alive connection to an IPCServer; thread-safe (calls are serialized)."""

    def __init__(self, url: str, token: str, timeout: float = 60.0, protocol_text: str | None = None):
        from urllib.parse import urlsplit

        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise ValueError(f"expected an http://host:port/ URL, got {url!r}")
        self.url = url
        self._host = u.hostname
        self._port = u.port
        self._path = u.path or "/"
        self._token = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        self.timeout = float(timeout)
        self._sock: socket.socket | None = None
        self._conn: _Conn | None = None
        self._lock = threading.Lock()
        if protocol_text is None:  # testing hook: speak another protocol text
            self._local = _LOCAL
            self._text, self._hash = PROTOCOL_TEXT, PROTOCOL_HASH
            self._messages = _MESSAGES
        else:
            self._local = _ProtocolInfo(protocol_text)
            self._text = protocol_text
            self._hash = hashlib.md5(protocol_text.encode("utf-8")).digest()
            self._messages = _compile_messages(self._local.protocol)
        self._server_hash = self._hash
        self._send_protocol = False
        self._host_header = f"Host: {self._host}:{self._port}\r\n".encode("latin-1")

    def __repr__(self) -> str:
        return f"IPCClient({self.url!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._conn = None

    def _connect(self) -> None:
        try:
            sock = socket.create_connection((self._host, self._port), timeout=self.timeout)
        except socket.timeout:
            raise TransportError(f"timed out connecting to {self.url}") from None
        except OSError as e:
            raise TransportError(f"cannot connect to {self.url}: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._conn = _Conn(sock)

    # -- one HTTP exchange

    def _exchange(self, parts: list) -> list:
        iov, total = _frame(parts)
        head = (
            b"POST " + self._path.encode("latin-1") + b" HTTP/1.1\r\n" + self._host_header
            + b"Content-Type: avro/binary\r\nContent-Length: " + str(total).encode() + b"\r\n\r\n"
        )
        for attempt in (0, 1):
            reused = self._sock is not None
            if not reused:
                self._connect()
            try:
                _sendv(self._sock, [head] + iov)
                return self._read_response()
            except (_EOF, ConnectionResetError, BrokenPipeError) as e:
                self._disconnect()
                clean = getattr(e, "clean", True) if isinstance(e, _EOF) else True
                if reused and attempt == 0 and clean:
                    log.debug("keep-alive connection to %s broken (%s); reconnecting", self.url, e)
                    continue
                raise TransportError(f"connection to {self.url} lost: {e}") from None
            except socket.timeout:
                self._disconnect()
                raise TransportError(f"no answer from {self.url} within {self.timeout}s") from None
            except TransportError:
                self._disconnect()
                raise
            except OSError as e:
                self._disconnect()
                raise TransportError(f"connection to {self.url} failed: {e}") from None
            except BaseException:
                self._disconnect()  # e.g. KeyboardInterrupt mid-exchange: the connection is out of step
                raise
        raise AssertionError("unreachable")

    def _read_response(self) -> list:
        conn = self._conn
        try:
            head = conn.read_head()
        except _BadRequest:
            raise TransportError(f"malformed HTTP response from {self.url}: head too large") from None
        try:
            first, headers = _parse_head(head)
        except _BadRequest as e:
            raise TransportError(f"malformed HTTP response from {self.url}: {e.detail}") from None
        if len(first) < 2 or not first[0].startswith("HTTP/1.") or not first[1].isdigit():
            raise TransportError(f"malformed HTTP response from {self.url}")
        status = int(first[1])
        cl = headers.get("content-length")
        if cl is None or not cl.isdigit():
            raise TransportError(f"HTTP response from {self.url} without a valid Content-Length")
        length = int(cl)
        close = headers.get("connection", "").lower() == "close"
        if status != 200:
            body = conn.read_exact(min(length, 4096)) if length else b""
            self._disconnect()
            detail = body.decode("utf-8", "replace").strip()
            text = f"{self.url} answered HTTP {status} {first[2] if len(first) > 2 else ''}: {detail}"
            if 400 <= status < 500:  # the request itself is refused (too large, say): sending it again will not help
                raise RemoteSystemError(text, code=f"HTTP_{status}")
            raise TransportError(text)
        if length > _MAX_RESPONSE:
            raise TransportError(f"response of {length} bytes from {self.url} is too large")
        try:
            segs = _read_frames(conn, length)
        except _BadFrame as e:
            raise TransportError(f"malformed Avro framing from {self.url}: {e}") from None
        if close:
            self._disconnect()
        return segs

    # -- Avro call

    def call(self, message: str, /, **request):
        msg = self._messages.get(message)
        if msg is None:
            raise ValueError(f"unknown message {message!r}; the protocol has {sorted(self._messages)}")
        body = _Out()
        _META_ENC(body, {TOKEN_KEY: self._token})
        _STRING_ENC(body, message)
        try:
            _encode(msg.req_enc, body, request)
        except _EncodeError as e:
            raise TypeError(f"bad {message} request: {e}") from None
        call_parts = body.finish()
        with self._lock:
            for _ in range(3):
                hs = _Out()
                _HS_REQ_ENC(
                    hs,
                    {
                        "clientHash": self._hash,
                        "clientProtocol": self._text if self._send_protocol else None,
                        "serverHash": self._server_hash,
                        "meta": None,
                    },
                )
                segs = self._exchange(hs.finish() + call_parts)
                inp = _In(segs)
                try:
                    resp = _decode(_HS_RESP_DEC, inp)
                except _Malformed as e:
                    self._disconnect()
                    raise TransportError(f"malformed handshake response from {self.url}: {e}") from None
                match = resp["match"]
                if match != "BOTH":
                    self._check_server(resp)
                if match == "NONE":
                    if self._send_protocol:
                        raise HandshakeError(f"{self.url} refused our protocol ({self._local.describe()})")
                    self._send_protocol = True
                    continue
                self._send_protocol = False
                return self._read_call_response(msg, inp)
        raise HandshakeError(f"no handshake agreement with {self.url}")

    def _check_server(self, resp) -> None:
        meta = resp.get("meta") or {}
        if ERROR_META_KEY in meta:
            raise HandshakeError(str(meta[ERROR_META_KEY], "utf-8", "replace"))
        text = resp.get("serverProtocol")
        if text is None:
            raise HandshakeError(f"{self.url} sent match={resp['match']} without its protocol")
        try:
            server = _ProtocolInfo(text)
        except Exception as e:
            raise HandshakeError(f"cannot parse the protocol of {self.url}: {e}") from None
        reason = _mismatch(self._local, server)
        if reason is not None:
            raise HandshakeError(reason)
        if resp.get("serverHash") is not None:
            self._server_hash = bytes(resp["serverHash"])

    def _read_call_response(self, msg: _Message, inp: _In):
        try:
            _decode(_META_DEC, inp)
            is_error = inp.byte()
            if is_error > 1:
                raise _Malformed("bad error flag")
            if not is_error:
                return _decode(msg.resp_dec, inp)
            err = _decode(msg.err_dec, inp)
        except _Malformed as e:
            self._disconnect()
            raise TransportError(f"malformed {msg.name} response from {self.url}: {e}") from None
        if isinstance(err, str):
            raise RemoteSystemError(err)
        raise RemoteError(err.get("code", "UNKNOWN"), err.get("message", ""))
