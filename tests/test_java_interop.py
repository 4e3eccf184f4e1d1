"""Apache Avro's reference implementation (Java) against what iterreduce and dbn write and serve.

Two claims of the README, checked with real processes (a JVM, worker processes, sockets):

* "model.avro ... readable with any Avro library": tests/interop/java's ReadModel reads a
  model that a real ``iterreduce run`` of the DBN wrote, with Avro's DataFileReader and
  GenericDatumReader, checks every array against the SHA-256 in ``dbn.meta`` and runs the
  forward pass of docs/model-format.md; its labels must be dbn's own ``model.predict``.
* "any Avro IPC client can call the master": CallMaster (Avro's GenericRequestor over
  HttpTransceiver, the protocol parsed from iterreduce/protocol.avpr, the job token put in
  the call metadata by an RPCPlugin) calls the AppMaster of a running DBN job: ``status``,
  calls without the token and forged calls, each answered with the protocol's declared
  error, after which the job still writes the very bytes of the model it writes without them.

The Java side is built once per session with Maven (avro and avro-ipc from Maven Central)
into pytest's temporary directory. Without ``java`` or ``mvn`` these tests are skipped,
unless PSEUDO_HADOOP_REQUIRED=1 (CI), where they fail.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

import fastavro
import numpy as np
import pytest
import yaml

import dbn
from dbn.data import read_parquet_dir, write_parquet_shards
from dbn.distributed import DBNWorker
from iterreduce.appmaster import AppMaster
from iterreduce.containers import LocalLauncher
from iterreduce.job import load_job

from .helpers import cli

ROOT = Path(__file__).resolve().parents[1]
JAVA_PROJECT = ROOT / "tests" / "interop" / "java"
PROTOCOL = ROOT / "iterreduce" / "protocol.avpr"

N_PIXELS, CLASSES, LAYERS = 64, 5, [24, 16]
PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 3, 6
GATE_AT = 4  # the superstep at which the gated run holds one worker: pre-training layer 2, epoch 2


# ------------------------------------------------------------------------- the Java side


def _required_or_skip(reason: str) -> None:
    if os.environ.get("PSEUDO_HADOOP_REQUIRED") == "1":
        pytest.fail(f"{reason} (PSEUDO_HADOOP_REQUIRED=1: the Java interop tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def java_classpath(tmp_path_factory) -> str:
    """tests/interop/java built with ``mvn package`` into a temporary directory: the
    classpath of its jar and its dependencies (avro, avro-ipc and theirs)."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        _required_or_skip(f"{' and '.join(missing)} not found on PATH: the Java interop tests need a JDK and Maven")
    build = tmp_path_factory.mktemp("avro-java")
    res = subprocess.run(["mvn", "-q", "-B", f"-Dinterop.build={build}", "package"],
                         cwd=JAVA_PROJECT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"mvn package failed:\n{res.stdout}\n{res.stderr}"
    deps = (build / "classpath.txt").read_text().strip()
    return os.pathsep.join([str(build / "iterreduce-avro-interop-0.jar"), deps])


def java(classpath: str, main: str, *args: object, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["java", "-cp", classpath, f"org.iterreduce.interop.{main}", *map(str, args)],
                          input=stdin, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------- a tiny DBN job


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Labelled 8x8 "images" of CLASSES noisy prototypes, as dbn reads them (Parquet, x and y)."""
    out = tmp_path_factory.mktemp("java-interop-data")
    rng = np.random.default_rng(7)
    prototypes = rng.integers(0, 256, (CLASSES, N_PIXELS)).astype(np.float64)
    for name, rows, shards in (("train", 1200, 4), ("validation", 200, 1), ("test", 200, 1)):
        y = rng.integers(0, CLASSES, rows)
        x = np.clip(prototypes[y] + rng.normal(0, 45, (rows, N_PIXELS)), 0, 255).round().astype(np.uint8)
        write_parquet_shards(x, y, out / name, shards)
    return out


def write_job(tmp: Path, data: Path, name: str, worker: str = "dbn.distributed:DBNWorker", **extra) -> Path:
    spec = {
        "name": "dbn-java-interop", "seed": 5,
        "workers": {"count": 2, "max_restarts": 1},
        "input": {"paths": [str(data / "train")]},
        "output": str(tmp / name),
        "checkpoint": {"every": 0},
        "heartbeat": {"interval": 0.2, "timeout": 20.0, "master_timeout": 5},
        "algorithm": {
            "master": "dbn.distributed:DBNMaster", "worker": worker,
            "params": {
                "layers": LAYERS, "classes": CLASSES, "n_visible": N_PIXELS,
                "train": str(data / "train"), "validation": str(data / "validation"), "test": str(data / "test"),
                "pretrain": {"epochs": PRETRAIN_EPOCHS, "batch_size": 50},
                "finetune": {"where": "master", "epochs": FINETUNE_EPOCHS, "batch_size": 50, "learning_rate": 0.5},
                "extra": extra,
            },
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data) -> Path:
    """The output of ``iterreduce run`` of the tiny DBN job (model.avro, metrics.json)."""
    tmp = tmp_path_factory.mktemp("java-interop-baseline")
    res = cli("run", str(write_job(tmp, data, "out")))
    assert res.returncode == 0, res.stderr
    return tmp / "out"


class GatedDBNWorker(DBNWorker):
    """The DBN worker, but the worker of split ``extra.gate_split`` (0) waits at the start of
    superstep ``extra.gate_at`` until the file ``extra.gate_file`` exists (having written
    ``gate_file.reached``): the job stays at that superstep while a test talks to its master.
    What it computes is the DBN worker's."""

    def compute(self, update, superstep, ctx):
        extra = ctx.params.get("extra") or {}
        if superstep == extra.get("gate_at") and ctx.split_index == extra.get("gate_split", 0):
            gate = Path(extra["gate_file"])
            Path(f"{gate}.reached").touch()
            deadline = time.monotonic() + 120
            while not gate.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gate {gate} was not opened within 120 s")
                time.sleep(0.02)
        return super().compute(update, superstep, ctx)


# ------------------------------------------------------------------------- model.avro


def test_java_avro_reads_model_file_and_predicts_the_same_labels(java_classpath, baseline, data, tmp_path):
    model_path = baseline / "model.avro"
    model = dbn.load(model_path)
    x, y = read_parquet_dir(data / "test")
    x = x[:60]
    inputs = tmp_path / "inputs.u8"
    inputs.write_bytes(np.ascontiguousarray(x, np.uint8).tobytes())

    res = java(java_classpath, "ReadModel", model_path, inputs)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)

    # the file as docs/model-format.md describes it
    assert got["schema"] == "dbn.model.NamedArray" and got["codec"] == "deflate"
    assert [(f["name"], json.loads(f["type"])) for f in got["fields"]] == [
        ("name", "string"), ("dtype", "string"), ("shape", {"type": "array", "items": "long"}), ("data", "bytes")]
    meta = got["meta"]
    assert (meta["format"], meta["version"], meta["kind"]) == ("dbn-model", 1, "classifier")
    assert meta["sizes"] == [N_PIXELS, *LAYERS, CLASSES] == model.sizes
    names = [f"{k}{i}" for i in range(len(LAYERS) + 1) for k in "Wb"]
    assert got["arrays"] == {n: {"dtype": "<f4", "shape": list(model.params[n].shape)} for n in names}
    # Java's SHA-256 of each array's bytes matched dbn.meta, and is that of the array dbn loads
    assert got["sha256_checked"] == {n: hashlib.sha256(model.params[n].tobytes()).hexdigest() for n in names}
    assert got["sync_is_meta_sha256_prefix"] is True

    # the documented forward pass, in Java, gives dbn's labels, probabilities and features
    labels = model.predict(x)
    assert got["labels"] == labels.tolist()
    np.testing.assert_allclose(np.array(got["probabilities"]), model.predict_proba(x), rtol=0, atol=2e-6)
    assert len(got["hidden"]) == len(LAYERS)
    for k, layer in enumerate(got["hidden"], start=1):
        np.testing.assert_allclose(np.array(layer), model.features(x, layer=k), rtol=0, atol=2e-6, err_msg=f"a_{k}")
    # not a trivial agreement: the model tells the classes apart
    assert len(set(got["labels"])) == CLASSES and np.mean(labels != y[:60]) < 0.25


def test_java_avro_refuses_a_model_whose_array_does_not_match_its_sha256(java_classpath, baseline, tmp_path):
    """The check the document asks readers to make (deflate has no checksum) is made, and can fail."""
    with open(baseline / "model.avro", "rb") as f:
        reader = fastavro.reader(f)
        schema, meta_text, records = reader.writer_schema, reader.metadata["dbn.meta"], list(reader)
    w1 = next(r for r in records if r["name"] == "W1")
    good = hashlib.sha256(w1["data"]).hexdigest()
    values = np.frombuffer(w1["data"], "<f4").copy()
    values[7] += 0.5
    w1["data"] = values.tobytes()
    buf = io.BytesIO()
    fastavro.writer(buf, schema, records, codec="deflate", metadata={"dbn.meta": meta_text})
    damaged = tmp_path / "damaged.avro"
    damaged.write_bytes(buf.getvalue())
    inputs = tmp_path / "inputs.u8"
    inputs.write_bytes(bytes(N_PIXELS))

    res = java(java_classpath, "ReadModel", damaged, inputs)
    assert res.returncode == 2, (res.stdout, res.stderr)
    bad = hashlib.sha256(values.tobytes()).hexdigest()
    assert f"array W1: the SHA-256 of its data is {bad}, dbn.meta says {good}" in res.stderr, res.stderr
    with pytest.raises(ValueError, match="array 'W1' .* do not match the checksum"):  # as dbn does
        dbn.load(damaged)


# ------------------------------------------------------------------------- the master over Avro IPC


def _f4(name: str, values: list[float], shape: list[int] | None = None) -> dict:
    """An NDArray record in Avro's JSON encoding (bytes as one character per byte)."""
    data = np.asarray(values, "<f4").tobytes()
    return {"name": name, "dtype": "<f4", "shape": shape or [len(values)], "data": data.decode("latin-1")}


def _update(superstep: int, arrays: list[dict]) -> dict:
    return {"superstep": superstep, "arrays": arrays, "num_samples": 10 ** 6, "metrics": {}, "meta": "{}"}


def test_java_avro_ipc_client_calls_a_running_master_and_forged_calls_are_refused_without_harm(
        java_classpath, data, baseline, tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    job = load_job(write_job(tmp_path, data, "out", worker=f"{__name__}:GatedDBNWorker",
                             gate_at=GATE_AT, gate_split=0, gate_file=str(gate)))
    out = Path(job.output)
    monkeypatch.chdir(ROOT)  # the workers import this module
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    token = secrets.token_urlsafe(32)
    am = AppMaster(job, LocalLauncher(out / "logs"), token=token)
    errors: list[BaseException] = []

    def run():
        try:
            am.run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (Path(f"{gate}.reached").exists() and am.status()["superstep"] == GATE_AT):
            assert thread.is_alive() and time.monotonic() < deadline, f"the job did not reach the gate: {errors}"
            time.sleep(0.05)
        ids = {}
        for log in (out / "logs").glob("local_*.log"):
            for wid, split in re.findall(r"registered as (\S+) for split (\d) of 2", log.read_text()):
                ids[int(split)] = wid
        assert sorted(ids) == [0, 1], ids
        w0, w1 = ids[0], ids[1]  # w0 waits at the gate; w1 has pushed it or will
        status_before = am.status()

        forged = _update(GATE_AT, [_f4("W", [1e6] * 4)])
        calls = [
            ("status", True, {}),
            ("status", False, {}),
            ("status", "not-the-job-token", {}),
            ("push", False, {"worker_id": w0, "update": forged}),
            ("push", True, {"worker_id": "intruder", "update": forged}),
            ("push", True, {"worker_id": w0, "update": _update(GATE_AT + 5, forged["arrays"])}),
            ("push", True, {"worker_id": w1, "update": _update(0, forged["arrays"])}),
            ("push", True, {"worker_id": w0, "update": _update(GATE_AT, [_f4("W", [0.0] * 8, shape=[9])])}),
            ("fetch", True, {"worker_id": w1, "superstep": 0, "wait_ms": 0}),
            ("fail", True, {"worker_id": w0, "superstep": GATE_AT + 2, "error": "RuntimeError: forged",
                            "traceback": "", "fatal": True, "stage": "compute"}),
            ("complete", True, {"worker_id": w0}),
            ("heartbeat", True, {"worker_id": "intruder", "superstep": GATE_AT, "progress": 0.5, "message": "hi"}),
            ("status", True, {}),
        ]
        stdin = token + "\n" + "".join(json.dumps({"message": m, "token": t, "request": r}) + "\n"
                                       for m, t, r in calls)
        res = java(java_classpath, "CallMaster", PROTOCOL, am.server.url, stdin=stdin)
        assert res.returncode == 0, res.stderr
        answers = [json.loads(line) for line in res.stdout.splitlines()]
        assert [a["message"] for a in answers] == [m for m, _, _ in calls], res.stdout
        status_after = am.status()
    finally:
        gate.touch()
        thread.join(120)
    assert not thread.is_alive(), "the job did not end"

    def refused(answer: dict) -> tuple[str, str]:
        assert answer.get("error_type") == "org.iterreduce.ipc.IterReduceError", answer
        return answer["error"]["code"], answer["error"]["message"]

    # status: the job's live state, as the master itself tells it
    assert answers[0]["response"] == status_before == status_after
    assert (status_before["state"], status_before["superstep"]) == ("RUNNING", GATE_AT)
    assert (status_before["workers_registered"], status_before["workers_expected"]) == (2, 2)
    assert status_before["phase"] == f"pretrain layer 2/2 epoch 2/{PRETRAIN_EPOCHS}"
    assert answers[-1]["response"] == status_before  # nothing the forged calls sent changed it
    # without the job token, or with another: refused, whatever the call
    for answer in answers[1:4]:
        assert refused(answer) == ("BAD_TOKEN", "missing or wrong job token")
    code, text = refused(answers[4])
    assert code == "NOT_REGISTERED" and "worker 'intruder' is not registered" in text
    code, text = refused(answers[5])
    assert code == "STALE_SUPERSTEP" and f"superstep {GATE_AT + 5} has not begun, the job is at superstep {GATE_AT}" \
        in text, text
    code, text = refused(answers[6])
    assert code == "STALE_SUPERSTEP" and f"superstep 0 is over, the job is at superstep {GATE_AT}" in text, text
    code, text = refused(answers[7])
    assert code == "BAD_UPDATE" and "malformed update" in text, text
    code, text = refused(answers[8])
    assert code == "STALE_SUPERSTEP" and f"fetch from worker {w1!r}: superstep 0 is over" in text, text
    code, text = refused(answers[9])
    assert code == "STALE_SUPERSTEP" and f"the job is at superstep {GATE_AT}" in text, text
    code, text = refused(answers[10])
    assert code == "REJECTED" and "the job is RUNNING, not done" in text, text
    assert answers[11]["response"] == {"accepted": False, "message": "not registered (or replaced): exit",
                                       "stop": True}

    # and the job went on as if none of it had been sent: the same model, to the byte
    assert not errors, errors
    m = json.loads((out / "metrics.json").read_text())
    assert m["state"] == "SUCCEEDED" and m["replacements"] == 0, m["message"]
    assert m["supersteps"] == 2 * PRETRAIN_EPOCHS + FINETUNE_EPOCHS
    assert (out / "model.avro").read_bytes() == (baseline / "model.avro").read_bytes()
