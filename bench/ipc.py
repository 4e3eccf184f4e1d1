"""Benchmark of iterreduce.ipc on loopback: superstep exchange with 1, 2 and 4 workers.

Each superstep every worker fetches the master's update (the model) and pushes its own
(same size); the master is a barrier (fetch blocks until the superstep's update is ready;
after all pushes the next update becomes available; no compute).  Workers are separate
processes.  Three transports move the same bytes in the same run:

  ours   iterreduce.ipc.IPCClient -> iterreduce.ipc.IPCServer
  stock  avro.ipc.Requestor + HTTPTransceiver -> avro.ipc.Responder over http.server
  raw    a plain loopback TCP socket copy (sendall / recv_into), the ceiling

Prints a table; never asserts timings.  Usage: python bench/ipc.py [--floats N] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import http.server
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

TOKEN = "bench-token"
WAIT_MS = 120_000


# ----------------------------------------------------------------------------- master side


class Barrier:
    """The tiny master: fetch(s) blocks until superstep s is ready; the last push of s makes s+1 ready."""

    def __init__(self, n_workers: int, records):
        self.n = n_workers
        self.records = records
        self.cond = threading.Condition()
        self.ready = 0
        self.pushed = collections.Counter()
        self.times = {0: time.perf_counter()}

    def wait_ready(self, superstep: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.ready >= superstep, timeout=timeout)

    def arrived(self, superstep: int) -> None:
        with self.cond:
            self.pushed[superstep] += 1
            if self.pushed[superstep] == self.n:
                self.ready = superstep + 1
                self.times[superstep + 1] = time.perf_counter()
                self.cond.notify_all()

    # protocol messages
    def fetch(self, worker_id, superstep, wait_ms):
        if not self.wait_ready(superstep, wait_ms / 1000):
            return {"status": "WAIT", "update": None, "message": ""}
        return {"status": "READY", "message": "",
                "update": {"superstep": superstep, "arrays": self.records, "num_samples": 0, "metrics": {}, "meta": "{}"}}

    def push(self, worker_id, update):
        if self.decode is not None:
            self.decode(update["arrays"])  # views, no copy: what a real master would do first
        self.arrived(update["superstep"])
        return {"accepted": True, "message": "", "stop": False}

    decode = None

    def step_time(self, steps: int) -> float:
        """Mean superstep time, leaving out superstep 0 (process start-up, connection set-up)."""
        return (self.times[steps] - self.times[1]) / (steps - 1)


def serve_ours(barrier):
    from iterreduce import ipc

    barrier.records = ipc.encode_arrays(barrier.records)
    barrier.decode = ipc.decode_arrays
    server = ipc.IPCServer(barrier, TOKEN).start()
    return server.url, server.stop


def serve_stock(barrier):
    import avro.ipc

    from iterreduce.ipc import PROTOCOL

    barrier.records = [{"name": k, "dtype": v.dtype.str, "shape": list(v.shape), "data": v.tobytes()}
                       for k, v in barrier.records.items()]

    class Responder(avro.ipc.Responder):
        def invoke(self, message, request):
            return getattr(barrier, message.name)(**request)

    responder = Responder(PROTOCOL)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            call_request = avro.ipc.FramedReader(self.rfile).read_framed_message()
            call_response = responder.respond(call_request)
            writer = avro.ipc.FramedWriter(io.BytesIO())
            writer.write_framed_message(call_response)
            body = writer.writer.getvalue()
            self.send_response(200)
            self.send_header("Content-Type", "avro/binary")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]

    def stop():
        httpd.shutdown()
        httpd.server_close()

    return f"http://{host}:{port}/", stop


def _recv_exact_into(sock, view):
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("closed")
        got += k


def serve_raw(barrier):
    model = np.concatenate([v.reshape(-1).view(np.uint8) for v in barrier.records.values()])
    nbytes = model.nbytes
    lsock = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def conn_loop(sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(bytearray(nbytes))
        hdr = memoryview(bytearray(8))
        try:
            while True:
                _recv_exact_into(sock, hdr)  # "fetch superstep s"
                (s,) = struct.unpack("<q", hdr)
                barrier.wait_ready(s, WAIT_MS / 1000)
                sock.sendall(memoryview(model))
                _recv_exact_into(sock, buf)  # "push"
                barrier.arrived(s)
        except (ConnectionError, OSError):
            pass
        finally:
            sock.close()

    def accept_loop():
        while not stopping.is_set():
            try:
                sock, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=conn_loop, args=(sock,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    host, port = lsock.getsockname()[:2]

    def stop():
        stopping.set()
        try:
            lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        lsock.close()

    return f"tcp://{host}:{port}", stop


SERVERS = {"ours": serve_ours, "stock": serve_stock, "raw": serve_raw}


# ----------------------------------------------------------------------------- worker side


def worker_main(kind: str, url: str, wid: str, steps: int, floats: int) -> None:
    own = np.random.default_rng(int(wid[1:])).random(floats, dtype=np.float32)
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    port = int(port)
    if kind == "ours":
        from iterreduce import ipc

        client = ipc.IPCClient(url, TOKEN, timeout=WAIT_MS / 1000 + 30)
        records = ipc.encode_arrays({"w": own})
        for s in range(steps):
            r = client.call("fetch", worker_id=wid, superstep=s, wait_ms=WAIT_MS)
            model = ipc.decode_arrays(r["update"]["arrays"])["w"]
            assert model.shape == own.shape
            client.call("push", worker_id=wid, update={"superstep": s, "arrays": records})
        client.close()
    elif kind == "stock":
        import avro.ipc

        from iterreduce.ipc import PROTOCOL

        transceiver = avro.ipc.HTTPTransceiver(host, port)
        requestor = avro.ipc.Requestor(PROTOCOL, transceiver)
        records = [{"name": "w", "dtype": own.dtype.str, "shape": list(own.shape), "data": own.tobytes()}]
        for s in range(steps):
            r = requestor.request("fetch", {"worker_id": wid, "superstep": s, "wait_ms": WAIT_MS})
            rec = r["update"]["arrays"][0]
            model = np.frombuffer(rec["data"], dtype=rec["dtype"]).reshape(rec["shape"])
            assert model.shape == own.shape
            upd = {"superstep": s, "arrays": records, "num_samples": 0, "metrics": {}, "meta": "{}"}
            requestor.request("push", {"worker_id": wid, "update": upd})
        transceiver.close()
    elif kind == "raw":
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(bytearray(own.nbytes))
        mine = memoryview(own).cast("B")
        for s in range(steps):
            sock.sendall(struct.pack("<q", s))
            _recv_exact_into(sock, buf)
            sock.sendall(mine)
        sock.close()
    else:
        raise SystemExit(f"unknown kind {kind}")


# ----------------------------------------------------------------------------- driver


def run(kind: str, n_workers: int, steps: int, floats: int) -> float:
    """-> mean superstep time in seconds."""
    model = np.random.default_rng(99).random(floats, dtype=np.float32)
    barrier = Barrier(n_workers, {"w": model})
    url, stop = SERVERS[kind](barrier)
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind, url, f"w{i}", str(steps),
                          str(floats)], cwd=ROOT)
        for i in range(n_workers)
    ]
    try:
        for p in procs:
            if p.wait(timeout=300) != 0:
                raise RuntimeError(f"{kind} worker failed with exit code {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stop()
    return barrier.step_time(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--floats", type=int, default=1_660_000, help="model size in float32 (default 1.66 M = 6.64 MB)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--steps", type=int, default=12, help="supersteps for ours and raw (stock gets fewer)")
    ap.add_argument("--stock-steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="fewer supersteps")
    ap.add_argument("--worker", nargs=5, metavar=("KIND", "URL", "ID", "STEPS", "FLOATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, url, wid, steps, floats = args.worker
        worker_main(kind, url, wid, int(steps), int(floats))
        return
    if args.quick:
        args.steps, args.stock_steps = 6, 3
    nbytes = args.floats * 4
    print(f"iterreduce.ipc loopback bench: model {args.floats:,} float32 = {nbytes / 1e6:.2f} MB, "
          f"{os.cpu_count()} CPUs; per superstep each worker fetches and pushes one model")
    print("aggregate exchange = workers x 2 x model bytes / superstep time\n")
    hdr = (f"{'workers':>7} | {'ours MB/s':>9} {'step ms':>8} | {'stock MB/s':>10} {'step ms':>8} | "
           f"{'raw MB/s':>8} {'step ms':>8} | {'ours/stock':>10} {'ours/raw':>8}")
    print(hdr)
    print("-" * len(hdr))
    results = []
    for n in [int(x) for x in args.workers.split(",")]:
        t = {}
        t["ours"] = run("ours", n, args.steps, args.floats)
        t["stock"] = run("stock", n, args.stock_steps, args.floats)
        t["raw"] = run("raw", n, args.steps, args.floats)
        rate = {k: n * 2 * nbytes / v / 1e6 for k, v in t.items()}
        results.append((n, rate))
        print(f"{n:>7} | {rate['ours']:>9.0f} {t['ours'] * 1e3:>8.1f} | {rate['stock']:>10.0f} "
              f"{t['stock'] * 1e3:>8.1f} | {rate['raw']:>8.0f} {t['raw'] * 1e3:>8.1f} | "
              f"{rate['ours'] / rate['stock']:>9.1f}x {rate['ours'] / rate['raw']:>7.2f}x", flush=True)
    # superstep overhead: 4 workers, tiny update, no compute
    tiny = 16
    ov_ours = run("ours", 4, max(args.steps * 3, 20), tiny)
    ov_stock = run("stock", 4, max(args.steps * 3, 20), tiny)
    print(f"\nsuperstep overhead, 4 workers, {tiny}-float update, no compute: ours {ov_ours * 1e3:.1f} ms, "
          f"stock {ov_stock * 1e3:.1f} ms (target < 50 ms)")
    print("\ntargets: ours/stock >= 4x, ours/raw >= 0.5x, overhead < 50 ms")
    for n, rate in results:
        r1, r2 = rate["ours"] / rate["stock"], rate["ours"] / rate["raw"]
        print(f"  {n} worker(s): ours/stock {r1:.1f}x [{'met' if r1 >= 4 else 'MISSED'}], "
              f"ours/raw {r2:.2f}x [{'met' if r2 >= 0.5 else 'MISSED'}]")
    print(f"  overhead {ov_ours * 1e3:.1f} ms [{'met' if ov_ours < 0.05 else 'MISSED'}]")


if __name__ == "__main__":
    main()
