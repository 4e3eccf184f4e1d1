"""iterreduce.ipc: real sockets, real threads, no mocks."""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
import threading
import time
import tracemalloc

import avro.errors
import avro.io
import avro.ipc
import avro.protocol
import avro.schema
import numpy as np
import pytest

from iterreduce import ipc
from iterreduce.ipc import (
    TOKEN_KEY,
    HandshakeError,
    IPCClient,
    IPCServer,
    RemoteError,
    RemoteSystemError,
    TransportError,
    decode_arrays,
    encode_arrays,
)

TOKEN = "s3cr3t-token-value"


def _update(superstep=0, arrays=None, **extra):
    u = {"superstep": superstep, "arrays": encode_arrays(arrays or {}), "num_samples": 7,
         "metrics": {"loss": 0.5}, "meta": "{}"}
    u.update(extra)
    return u


class Handler:
    """A dummy master: records calls; fetch long-polls on a condition."""

    def __init__(self):
        self.calls = []
        self.cond = threading.Condition()
        self.ready = -1
        self.lock = threading.Lock()

    def _record(self, name, kw):
        with self.lock:
            self.calls.append((name, kw))

    def register(self, **kw):
        self._record("register", kw)
        return {"split_index": 2, "num_splits": 4,
                "split": [{"path": "hdfs:///x/part-0.parquet", "row_groups": [1, 3]}],
                "job": '{"name": "j"}', "start_superstep": 5,
                "catch_up": _update(4, {"w": np.arange(6, dtype="<f8").reshape(2, 3)}),
                "heartbeat_interval_ms": 1000}

    def fetch(self, worker_id, superstep, wait_ms):
        self._record("fetch", dict(worker_id=worker_id, superstep=superstep, wait_ms=wait_ms))
        with self.cond:
            ok = self.cond.wait_for(lambda: self.ready >= superstep, timeout=wait_ms / 1000)
        if not ok:
            return {"status": "WAIT"}
        return {"status": "READY", "update": _update(superstep, {"w": np.full(3, superstep, "<f4")})}

    def push(self, worker_id, update):
        self._record("push", dict(worker_id=worker_id, update=update))
        arrays = decode_arrays(update["arrays"])
        total = float(sum(a.astype(np.float64).sum() for a in arrays.values()))
        return {"accepted": True, "message": f"{total:g}"}

    def heartbeat(self, worker_id, superstep, progress, message):
        self._record("heartbeat", dict(worker_id=worker_id, superstep=superstep, progress=progress, message=message))
        if worker_id == "boom":
            raise KeyError("no such worker")
        if worker_id == "reject":
            raise RemoteError("NOT_REGISTERED", "who are you")
        return {"accepted": True, "stop": worker_id == "stop-me"}

    def fail(self, **kw):
        self._record("fail", kw)
        return {"accepted": True}

    def complete(self, worker_id):
        self._record("complete", dict(worker_id=worker_id))
        return {"accepted": False, "message": "not yet"}

    def status(self):
        self._record("status", {})
        return {"state": "RUNNING", "superstep": 5, "phase": "fetch", "workers_registered": 3,
                "workers_expected": 4, "replacements": 1, "metrics": {"loss": 0.25}, "message": "ok"}


@pytest.fixture
def server():
    h = Handler()
    s = IPCServer(h, TOKEN, io_timeout=2.0).start()
    s.handler_obj = h
    yield s
    s.stop()


@pytest.fixture
def client(server):
    c = IPCClient(server.url, TOKEN, timeout=10)
    yield c
    c.close()


def test_protocol_constants():
    assert ipc.PROTOCOL_VERSION == 2
    assert json.loads(ipc.PROTOCOL_TEXT)["iterreduce.version"] == ipc.PROTOCOL_VERSION
    assert isinstance(ipc.PROTOCOL, avro.protocol.Protocol)
    assert set(ipc.PROTOCOL.messages) == {"register", "fetch", "push", "heartbeat", "fail", "complete", "status"}


def test_every_message_round_trip(server, client):
    a = client.call("register", worker_id="w1", container_id="c1", host="h")
    assert a["split_index"] == 2 and a["start_superstep"] == 5
    assert a["split"] == [{"path": "hdfs:///x/part-0.parquet", "offset": 0, "length": -1, "row_groups": [1, 3]}]
    cu = a["catch_up"]
    assert cu["superstep"] == 4 and cu["num_samples"] == 7 and cu["metrics"] == {"loss": 0.5}
    np.testing.assert_array_equal(decode_arrays(cu["arrays"])["w"], np.arange(6.0).reshape(2, 3))
    assert server.handler_obj.calls[-1] == ("register", {"worker_id": "w1", "container_id": "c1", "host": "h",
                                                         "split_hint": -1})
    r = client.call("fetch", worker_id="w1", superstep=0, wait_ms=10)
    assert r == {"status": "WAIT", "update": None, "message": ""}
    server.handler_obj.ready = 3
    r = client.call("fetch", worker_id="w1", superstep=3, wait_ms=10)
    assert r["status"] == "READY"
    np.testing.assert_array_equal(decode_arrays(r["update"]["arrays"])["w"], [3, 3, 3])
    ack = client.call("push", worker_id="w1", update=_update(3, {"g": np.ones(1000, "<f4"), "h": np.ones(2, "<i8")}))
    assert ack == {"accepted": True, "message": "1002", "stop": False}
    assert client.call("heartbeat", worker_id="stop-me", superstep=3, progress=0.5, message="m")["stop"] is True
    hb = server.handler_obj.calls[-1][1]
    assert hb["progress"] == 0.5 and hb["message"] == "m"
    assert client.call("fail", worker_id="w1", superstep=3, error="E", traceback="tb")["accepted"] is True
    assert client.call("complete", worker_id="w1") == {"accepted": False, "message": "not yet", "stop": False}
    st = client.call("status")
    assert st["state"] == "RUNNING" and st["metrics"] == {"loss": 0.25} and st["replacements"] == 1
    assert server.calls == 8 and server.bytes_in > 4000 and server.bytes_out > 0


def test_bad_request_raises_locally(client):
    with pytest.raises(TypeError, match="superstep"):
        client.call("fetch", worker_id="w", superstep="x", wait_ms=1)
    with pytest.raises(TypeError, match="missing field"):
        client.call("fetch", worker_id="w", wait_ms=1)
    with pytest.raises(ValueError):
        client.call("nope")


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<i8", "|u1", "|b1", "<c16", "<i2", ">f4", ">i4"])
def test_arrays_round_trip_dtypes(dtype):
    rng = np.random.default_rng(0)
    a = (rng.random((3, 5)) * 100).astype(dtype)
    recs = encode_arrays({"a": a})
    assert recs[0]["dtype"][0] in "<|"
    out = decode_arrays([dict(r, data=bytes(r["data"])) for r in recs])["a"]
    assert out.shape == (3, 5) and out.dtype == a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else True
    np.testing.assert_array_equal(out, a)


def test_arrays_special_shapes_and_views():
    base = np.arange(24, dtype="<f8").reshape(4, 6)
    arrays = {"scalar": np.array(3.5, "<f4"), "empty": np.zeros((0, 7), "<f4"),
              "strided": base[:, ::2], "fortran": np.asfortranarray(base), "transposed": base.T}
    recs = encode_arrays(arrays)
    contiguous = encode_arrays({"c": base})[0]["data"]
    assert np.shares_memory(np.frombuffer(contiguous, np.uint8), base)  # no copy for contiguous LE input
    out = decode_arrays(recs)
    for k, v in arrays.items():
        assert out[k].shape == v.shape, k
        np.testing.assert_array_equal(out[k], v)
    buf = bytearray(base.tobytes())
    view = decode_arrays([{"name": "v", "dtype": "<f8", "shape": [4, 6], "data": memoryview(buf)}])["v"]
    assert np.shares_memory(view, np.frombuffer(buf, np.uint8))  # frombuffer, no copy


def test_arrays_over_the_wire(server, client):
    server.handler_obj.ready = 10
    big = np.random.default_rng(1).random(300_000).astype("<f4")  # > 64 KiB: own frame
    arrays = {"big": big, "scalar": np.array(2.0, "<f8"), "empty": np.zeros(0, "<f4"),
              "strided": np.arange(20, dtype="<i4")[::3]}
    ack = client.call("push", worker_id="w", update=_update(1, arrays))
    assert ack["accepted"]
    got = decode_arrays(server.handler_obj.calls[-1][1]["update"]["arrays"])
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
    assert got["big"].flags.aligned


def test_decode_arrays_rejects_bad_records():
    good = {"name": "x", "dtype": "<f4", "shape": [2], "data": b"\0" * 8}
    for bad, pat in [(dict(good, dtype="O"), "x"), (dict(good, dtype="|O"), "x"), (dict(good, dtype=">f4"), "x"),
                     (dict(good, dtype="<nope"), "x"), (dict(good, shape=[3]), "x"), (dict(good, shape=[-2]), "x"),
                     (dict(good, data=b"\0" * 7), "x"), (dict(good, dtype="|V8", shape=[1]), "x")]:
        with pytest.raises(ValueError, match=pat):
            decode_arrays([bad])
    with pytest.raises(ValueError):
        encode_arrays({"o": np.array([object()])})


class TokenRequestor(avro.ipc.Requestor):
    """The stock Requestor, with the job token added to the call metadata (nothing else changed)."""

    token = TOKEN.encode()

    def write_call_request(self, message_name, request_datum, encoder):
        avro.ipc.META_WRITER.write({TOKEN_KEY: self.token}, encoder)
        message = self.local_protocol.messages.get(message_name)
        encoder.write_utf8(message.name)
        self.write_request(message.request, request_datum, encoder)


def _stock_protocol():
    import importlib.resources

    raw = importlib.resources.files("iterreduce").joinpath("protocol.avpr").read_text()
    return avro.protocol.parse(raw)


def test_stock_avro_requestor(server):
    host, port = server.address
    proto = _stock_protocol()
    t = avro.ipc.HTTPTransceiver(host, port)
    try:
        req = TokenRequestor(proto, t)
        st = req.request("status", {})
        assert st["state"] == "RUNNING" and st["workers_expected"] == 4
        data = np.linspace(0, 1, 50_000).astype("<f4")
        upd = {"superstep": 2, "arrays": [{"name": "w", "dtype": "<f4", "shape": [50_000], "data": data.tobytes()}],
               "num_samples": 1, "metrics": {}, "meta": "{}"}
        ack = req.request("push", {"worker_id": "stock", "update": upd})
        assert ack["accepted"] is True and float(ack["message"]) == pytest.approx(float(data.sum()), rel=1e-6)
        got = decode_arrays(server.handler_obj.calls[-1][1]["update"]["arrays"])["w"]
        np.testing.assert_array_equal(got, data)
        server.handler_obj.ready = 9
        r = req.request("fetch", {"worker_id": "stock", "superstep": 9, "wait_ms": 5})
        assert r["status"] == "READY" and r["update"]["arrays"][0]["data"] == np.full(3, 9, "<f4").tobytes()
        with pytest.raises(avro.errors.AvroRemoteException) as ei:
            req.request("heartbeat", {"worker_id": "reject", "superstep": 1, "progress": 0.0, "message": ""})
        assert ei.value.args[0]["code"] == "NOT_REGISTERED"
        # stock requestor without the token
    finally:
        t.close()
    t = avro.ipc.HTTPTransceiver(host, port)
    try:
        with pytest.raises(avro.errors.AvroRemoteException) as ei:
            avro.ipc.Requestor(proto, t).request("status", {})
        assert ei.value.args[0]["code"] == "BAD_TOKEN"
    finally:
        t.close()


class _JavaFramingTransceiver(avro.ipc.HTTPTransceiver):
    """Frames a request as Avro's Java HttpTransceiver does: the call's header and its
    parameters in frames of their own, so a message without parameters (status) sends an
    empty frame before the zero-length one that ends it; ``tail`` is sent after that."""

    tail = b""

    def write_framed_message(self, message):
        proto = self.requestor.local_protocol
        params = b""
        if self.params_of is not None:
            buf = io.BytesIO()
            self.requestor.write_request(proto.messages[self.params_of[0]].request, self.params_of[1],
                                         avro.io.BinaryEncoder(buf))
            params = buf.getvalue()
        head = message[:len(message) - len(params)]
        body = struct.pack(">I", len(head)) + head + struct.pack(">I", len(params)) + params + b"\0\0\0\0"
        self.conn.request("POST", self.req_resource, body + self.tail, {"Content-Type": "avro/binary"})


def test_a_request_framed_as_avro_java_frames_it_is_answered(server):
    host, port = server.address
    proto = _stock_protocol()
    for tail in (b"", b"\0\0\0\0"):  # (a tail of empty frames is taken as the end, as Java's reader takes it)
        t = _JavaFramingTransceiver(host, port)
        t.tail = tail
        try:
            req = t.requestor = TokenRequestor(proto, t)
            t.params_of = ("status", {})
            assert req.request("status", {})["state"] == "RUNNING"  # parameters: an empty frame
            args = {"worker_id": "reject", "superstep": 1, "progress": 0.5, "message": "m"}
            t.params_of = ("heartbeat", args)  # parameters in a frame of their own
            with pytest.raises(avro.errors.AvroRemoteException) as ei:
                req.request("heartbeat", args)
            assert ei.value.args[0]["code"] == "NOT_REGISTERED"
        finally:
            t.close()
    t = _JavaFramingTransceiver(host, port)
    t.tail = b"\0\0\0\1x"  # anything but empty frames after the end is refused
    try:
        t.requestor = TokenRequestor(proto, t)
        t.params_of = ("status", {})
        with pytest.raises(avro.errors.AvroException):
            t.requestor.request("status", {})
    finally:
        t.close()
    _assert_still_serving(server)


def test_bad_token_rejected(server, caplog):
    caplog.set_level(logging.DEBUG, logger="iterreduce.ipc")
    n0 = len(server.handler_obj.calls)
    for tok in ("wrong", TOKEN + "x", TOKEN[:-1]):
        with IPCClient(server.url, tok, timeout=5) as c, pytest.raises(RemoteError) as ei:
            c.call("status")
        assert ei.value.code == "BAD_TOKEN"
        assert TOKEN not in str(ei.value) and TOKEN not in repr(ei.value)
    assert len(server.handler_obj.calls) == n0  # handler never reached
    assert TOKEN not in caplog.text
    with IPCClient(server.url, TOKEN, timeout=5) as c:
        assert TOKEN not in repr(c) and TOKEN not in repr(server)
        assert c.call("status")["state"] == "RUNNING"


def test_a_big_request_without_the_token_is_answered_before_its_body_is_read(server, monkeypatch):
    """Whoever reaches the port without the token cannot make the master buffer a big body."""
    sent = []
    monkeypatch.setattr(ipc, "_sendv", lambda sock, bufs: sent.extend(bytes(b) for b in bufs))
    with IPCClient(server.url, "wrong", timeout=1) as c, pytest.raises(Exception):
        c.call("push", worker_id="w", update=_update(arrays={"w": np.zeros(12 << 20, np.uint8)}))
    monkeypatch.undo()
    head, body = sent[0], b"".join(sent[1:])
    assert b"Content-Length: %d" % len(body) in head
    # the small frames (handshake, metadata) and the header of the 12 MB frame, then silence
    cut, pos = 0, 0
    while True:
        (n,) = struct.unpack(">I", body[pos:pos + 4])
        if n >= 64 * 1024:
            cut = pos + 4 + 1000  # 1000 bytes into the big frame
            break
        pos += 4 + n
    rejected = server.rejected
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body[:cut])
        answer = b""
        while chunk := s.recv(65536):  # the server answers and closes, the rest never sent
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer
    assert b"BAD_TOKEN" in answer and server.rejected == rejected + 1
    assert not any(name == "push" for name, _ in server.handler_obj.calls)
    # a first frame that is big, of garbage (no token in its first MiB): answered (and the
    # connection closed) although 18 of its 20 MiB were never sent, so it was not buffered
    for garbage in (0x00, 0xFF):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            big = 20 << 20
            s.sendall(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (big + 8) + struct.pack(">I", big)
                      + bytes([garbage]) * (2 << 20))
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 "), garbage
    assert b"starts with its handshake and call metadata" in answer  # 0xFF: no handshake at all
    assert not any(name == "push" for name, _ in server.handler_obj.calls)


def test_a_request_the_server_refuses_over_http_is_a_remote_error_not_a_lost_master():
    h = Handler()
    # a body far larger than the socket buffers: the server answers at once, then drains it
    s = IPCServer(h, TOKEN, io_timeout=2.0, max_request_bytes=100_000).start()
    try:
        for size in (150_000, 24 << 20):
            with IPCClient(s.url, TOKEN, timeout=5) as c, pytest.raises(RemoteError) as err:
                c.call("push", worker_id="w", update=_update(arrays={"w": np.zeros(size, np.uint8)}))
            assert err.value.code == "HTTP_413" and not isinstance(err.value, TransportError)
            assert "exceeds 100000" in str(err.value)
    finally:
        s.stop()
    s = IPCServer(h, TOKEN, io_timeout=2.0).start()
    try:  # the token gate: answered from the request's head, the rest drained
        with IPCClient(s.url, "wrong", timeout=5) as c, pytest.raises(RemoteError) as err:
            c.call("push", worker_id="w", update=_update(arrays={"w": np.zeros(24 << 20, np.uint8)}))
        assert err.value.code == "BAD_TOKEN"
    finally:
        s.stop()


def _modified_protocol(version=None, extra_field=False):
    obj = json.loads(ipc.PROTOCOL_TEXT)
    if version is not None:
        obj["iterreduce.version"] = version
    if extra_field:
        for t in obj["types"]:
            if t["name"] == "Ack":
                t["fields"].append({"name": "extra", "type": "int"})
    return json.dumps(obj)


def test_version_mismatch(server):
    c = IPCClient(server.url, TOKEN, timeout=5, protocol_text=_modified_protocol(version=3))
    with pytest.raises(HandshakeError, match=r"client speaks IterReduce v3, master speaks v2"):
        c.call("status")
    # the server refuses such a client too (when the client insists on sending its protocol)
    c._send_protocol = True
    with pytest.raises(HandshakeError, match="v3.*v2"):
        c.call("status")
    c.close()
    # same version, other schemas
    c = IPCClient(server.url, TOKEN, timeout=5, protocol_text=_modified_protocol(extra_field=True))
    with pytest.raises(HandshakeError, match="schemas differ"):
        c.call("status")
    c.close()
    # whitespace/doc-only differences are fine
    obj = json.loads(ipc.PROTOCOL_TEXT)
    obj["doc"] = "another doc"
    c = IPCClient(server.url, TOKEN, timeout=5, protocol_text=json.dumps(obj, indent=2))
    assert c.call("status")["state"] == "RUNNING"
    c.close()


def test_version_mismatch_stock_requestor(server):
    host, port = server.address
    proto = avro.protocol.parse(_modified_protocol(version=2, extra_field=True))
    t = avro.ipc.HTTPTransceiver(host, port)
    try:
        with pytest.raises(avro.errors.AvroException):
            TokenRequestor(proto, t).request("status", {})
    finally:
        t.close()


def test_handler_exception_is_system_error(server, client):
    with pytest.raises(RemoteSystemError, match="KeyError") as ei:
        client.call("heartbeat", worker_id="boom", superstep=0, progress=0.0, message="")
    assert isinstance(ei.value, RemoteError)
    with pytest.raises(RemoteError) as ei:
        client.call("heartbeat", worker_id="reject", superstep=0, progress=0.0, message="")
    assert (ei.value.code, ei.value.message) == ("NOT_REGISTERED", "who are you")
    assert client.call("status")["state"] == "RUNNING"


def test_concurrent_long_polls(server):
    h = server.handler_obj
    results = {}

    def worker(i):
        with IPCClient(server.url, TOKEN, timeout=10) as c:
            results[i] = c.call("fetch", worker_id=f"w{i}", superstep=1, wait_ms=5000)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 5
    while sum(1 for n, _ in list(h.calls) if n == "fetch") < 6 and time.time() < deadline:
        time.sleep(0.01)
    # all six are blocked in the handler at once; the server still answers others
    with IPCClient(server.url, TOKEN, timeout=5) as c:
        assert c.call("status")["state"] == "RUNNING"
    with h.cond:
        h.ready = 1
        h.cond.notify_all()
    for t in threads:
        t.join(10)
    assert len(results) == 6 and all(r["status"] == "READY" for r in results.values())


def test_shared_client_threads(server, client):
    server.handler_obj.ready = 100
    errors = []

    def run():
        try:
            for s in range(5):
                r = client.call("fetch", worker_id="x", superstep=s, wait_ms=1)
                assert decode_arrays(r["update"]["arrays"])["w"][0] == s
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=run) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert not errors


# ---------------------------------------------------------------------------- robustness


def _raw(server, data: bytes, read=True, timeout=5.0) -> bytes:
    s = socket.create_connection(server.address, timeout=timeout)
    try:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def _post(body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: avro/binary\r\nContent-Length: %d\r\n\r\n" % n + body


def _assert_still_serving(server):
    with IPCClient(server.url, TOKEN, timeout=5) as c:
        assert c.call("status")["state"] == "RUNNING"


def test_non_post_and_garbage(server):
    assert _raw(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert _raw(server, b"\x00\xff garbage \r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw(server, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 411")
    garbage = bytes(range(256)) * 4
    assert _raw(server, _post(struct.pack(">I", len(garbage)) + garbage + b"\0\0\0\0")).startswith(b"HTTP/1.1 ")
    assert _raw(server, _post(b"\x07\x01")).startswith(b"HTTP/1.1 400")
    _assert_still_serving(server)


def test_oversized_content_length(server):
    t0 = time.time()
    resp = _raw(server, _post(b"", length=server.max_request_bytes + 1))
    assert resp.startswith(b"HTTP/1.1 413") and time.time() - t0 < 2
    _assert_still_serving(server)


def test_oversized_frame_bounded_memory(server):
    tracemalloc.start()
    try:
        # frame claims 2**31-1 bytes in a 1 MB body
        t0 = time.time()
        resp = _raw(server, _post(struct.pack(">I", 2**31 - 1) + b"0123456789", length=1 << 20), read=False)
        # frame claims more than the body holds: refused at once
        resp = _raw(server, _post(struct.pack(">I", 2**31 - 1) + b"0123456789"))
        assert resp.startswith(b"HTTP/1.1 400") and time.time() - t0 < 2
        # a frame that fits a large Content-Length, then the client goes away
        s = socket.create_connection(server.address)
        s.sendall(_post(struct.pack(">I", (1 << 29)) + b"x" * 10, length=(1 << 29) + 8))
        time.sleep(0.2)
        s.close()
        _assert_still_serving(server)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak  # nowhere near the 512 MiB / 2 GiB claimed


def test_truncated_body_times_out(server):
    # claims 100 bytes, sends 10 and stays silent: the server gives up after io_timeout (2 s)
    s = socket.create_connection(server.address, timeout=10)
    try:
        t0 = time.time()
        s.sendall(_post(struct.pack(">I", 90) + b"0123456789", length=100))
        _assert_still_serving(server)  # meanwhile others are served
        assert s.recv(100) == b""  # closed by the server
        assert 1.5 < time.time() - t0 < 8
    finally:
        s.close()
    # connection closed mid-frame
    _raw(server, _post(struct.pack(">I", 90) + b"0123", length=100), read=False)
    _assert_still_serving(server)


def test_a_slow_loris_and_silent_connections_are_cut_off_and_odd_lengths_refused(server, caplog):
    # one byte at a time, each well within io_timeout (2 s): the head must still come within it
    s = socket.create_connection(server.address, timeout=10)
    try:
        t0 = time.time()
        for b in _post(b"x" * 100):
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            if time.time() - t0 > 8:
                break
            time.sleep(0.3)
        assert s.recv(100) == b"" and time.time() - t0 < 6  # closed by the server
    finally:
        s.close()
    assert "the request did not arrive in the time it is given" in caplog.text
    # a connection that never sends a byte is closed after io_timeout, not the keep-alive idle time
    s = socket.create_connection(server.address, timeout=10)
    try:
        t0 = time.time()
        assert s.recv(100) == b"" and 1.5 < time.time() - t0 < 6
    finally:
        s.close()
    for length in ("\u00b2", "9" * 5000):  # '²' passes str.isdigit; 5000 digits pass int() no more
        head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()
        assert _raw(server, head).startswith(b"HTTP/1.1 400"), length[:5]
    assert "unexpected error" not in caplog.text
    assert _raw(server, b"POST / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
    _assert_still_serving(server)


def test_connections_beyond_the_limit_are_turned_away_and_the_server_goes_on(caplog):
    h = Handler()
    server = IPCServer(h, TOKEN, io_timeout=5.0, max_connections=3).start()
    held = []
    worker = IPCClient(server.url, TOKEN, timeout=5)
    try:
        assert worker.call("status")["state"] == "RUNNING"  # it has shown the token: not counted
        for _ in range(3):
            held.append(socket.create_connection(server.address, timeout=5))
        time.sleep(0.2)
        extra = _raw(server, _post(b"x"))
        assert extra.startswith(b"HTTP/1.1 503"), extra[:40]
        assert server.turned_away == 1, server.turned_away  # the three held ones were taken
        assert "3 connections that have not shown the job token are open" in caplog.text
        assert worker.call("status")["state"] == "RUNNING"  # the worker's connection is served on
        for c in held:
            c.close()
        deadline = time.time() + 5
        while True:  # once they are closed, new ones are served
            try:
                _assert_still_serving(server)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        for c in held:
            c.close()
        worker.close()
        server.stop()


def test_transport_errors():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(TransportError):
        IPCClient(f"http://127.0.0.1:{port}/", TOKEN, timeout=2).call("status")
    # a server that never answers
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        c = IPCClient(f"http://127.0.0.1:{silent.getsockname()[1]}/", TOKEN, timeout=0.5)
        with pytest.raises(TransportError, match="within"):
            c.call("status")
    finally:
        silent.close()


def test_reconnect_after_server_closed_keepalive():
    h = Handler()
    server = IPCServer(h, TOKEN).start()
    server.idle_timeout = 0.2
    try:
        with IPCClient(server.url, TOKEN, timeout=5) as c:
            assert c.call("status")["state"] == "RUNNING"
            time.sleep(0.6)  # the server drops the idle keep-alive connection
            assert c.call("status")["state"] == "RUNNING"
    finally:
        server.stop()


def test_big_value_decodes_without_copy():
    big = np.arange(100_000, dtype=np.uint8)
    out = ipc._Out()
    ipc._compile_encoder(avro.schema.parse('"bytes"'))(out, big)
    parts = out.finish()
    assert len(parts) == 2 and np.shares_memory(np.frombuffer(parts[1], np.uint8), big)  # sent from our memory
    seg = np.array(parts[1], dtype=np.uint8)  # as received: its own buffer
    inp = ipc._In([memoryview(bytes(parts[0])), memoryview(seg)])
    got = ipc._compile_decoder(avro.schema.parse('"bytes"'))(inp)
    assert np.shares_memory(np.frombuffer(got, np.uint8), seg)


def test_received_buffers_not_reused_while_referenced(server, client):
    """Big receive buffers are recycled per connection, but never while an array still uses them."""
    h = server.handler_obj
    h.ready = 100
    kept = []
    for s in range(8):
        data = np.full(100_000, s, "<f4")
        client.call("push", worker_id="w", update=_update(s, {"g": data}))
        kept.append(decode_arrays(h.calls[-1][1]["update"]["arrays"])["g"])
        h.calls.clear()
        if s % 2:
            kept[-1] = kept[-1].copy()  # release some buffers: they get reused
    for s, a in enumerate(kept):
        assert (a == s).all(), s
    got = []
    for s in range(6):
        big = {"w": np.full(200_000, s, "<f8")}
        h.fetch = lambda worker_id, superstep, wait_ms, big=big: {"status": "READY", "update": _update(superstep, big)}
        got.append(decode_arrays(client.call("fetch", worker_id="w", superstep=s, wait_ms=1)["update"]["arrays"])["w"])
    for s, a in enumerate(got):
        assert (a == s).all(), s
