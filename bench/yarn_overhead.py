"""Time from start to the first superstep, and per-superstep overhead, on YARN against the
local runtime, for the same job (a tiny linear regression: the compute is negligible).

Needs the environment of a running cluster (tests/hadoop/pseudo-hadoop start > env.sh; . env.sh).
Prints the figures side by side; asserts nothing.

    python bench/yarn_overhead.py [--supersteps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.algos import write_dataset  # noqa: E402


def job_spec(name, input_uri, output, supersteps, yarn=None):
    spec = {
        "name": name, "seed": 1, "workers": {"count": 2, "memory": 256}, "master": {"memory": 256},
        "input": {"paths": [input_uri]}, "output": output, "checkpoint": {"every": 0},
        "heartbeat": {"interval": 0.5, "timeout": 30},
        "algorithm": {"master": "tests.algos:LinRegMaster", "worker": "tests.algos:LinRegWorker",
                      "params": {"supersteps": supersteps}},
    }
    if yarn:
        spec["yarn"] = yarn
    return spec


def summarize(history, t_first):
    steps = [h["seconds"] for h in history[1:]]  # superstep 0 includes the workers' start
    return {"first_superstep_s": t_first, "mean_superstep_s": sum(steps) / len(steps),
            "min_superstep_s": min(steps), "supersteps": len(history)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--supersteps", type=int, default=20)
    args = ap.parse_args()
    webhdfs = os.environ.get("PSEUDO_HADOOP_WEBHDFS", "webhdfs://127.0.0.1:9870")
    user = os.environ.get("PSEUDO_HADOOP_USER", "root")
    tmp = Path(tempfile.mkdtemp(prefix="yarn-overhead-"))
    data = write_dataset(tmp / "data", rows=2000, files=2)

    # local
    spec = job_spec("overhead-local", str(data), str(tmp / "local"), args.supersteps)
    (tmp / "local.yaml").write_text(yaml.safe_dump(spec))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "iterreduce.cli", "run", str(tmp / "local.yaml")], cwd=ROOT,
                            stderr=subprocess.DEVNULL)
    first = None
    while proc.poll() is None:
        if first is None and (tmp / "local" / "metrics.jsonl").exists():
            first = time.monotonic() - t0
        time.sleep(0.02)
    local_total = time.monotonic() - t0
    local = summarize(json.loads((tmp / "local" / "metrics.json").read_text())["history"], first)

    # YARN
    host, port = webhdfs.split("://")[1].split(":")
    fs = fsspec.filesystem("webhdfs", host=host, port=int(port), user=user)
    base = f"/user/{user}/overhead-{uuid.uuid4().hex[:6]}"
    fs.mkdirs(base + "/data", exist_ok=True)
    for f in sorted(data.glob("*.parquet")):
        fs.put_file(str(f), f"{base}/data/{f.name}")
    yarn = {"environment": f"python://{sys.executable}", "files": [str(ROOT / "tests")],
            "env": {"HADOOP_USER_NAME": user}}
    spec = job_spec("overhead-yarn", f"{webhdfs}{base}/data", f"{webhdfs}{base}/out", args.supersteps, yarn)
    (tmp / "yarn.yaml").write_text(yaml.safe_dump(spec))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "iterreduce.cli", "submit", "--wait", str(tmp / "yarn.yaml")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = None
    while proc.poll() is None:
        if first is None and fs.exists(f"{base}/out/metrics.jsonl"):
            first = time.monotonic() - t0
        time.sleep(0.2)
    yarn_total = time.monotonic() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        sys.exit(f"the YARN run failed: {out}")
    with fs.open(f"{base}/out/metrics.json", "rb") as f:
        yarn_res = summarize(json.loads(f.read())["history"], first)
    fs.rm(base, recursive=True)

    print(f"{'':32s} {'local':>10s} {'YARN':>10s}")
    print(f"{'start to first superstep (s)':32s} {local['first_superstep_s']:10.2f} {yarn_res['first_superstep_s']:10.2f}")
    print(f"{'mean superstep, no compute (ms)':32s} {1000 * local['mean_superstep_s']:10.1f} "
          f"{1000 * yarn_res['mean_superstep_s']:10.1f}")
    print(f"{'min superstep (ms)':32s} {1000 * local['min_superstep_s']:10.1f} {1000 * yarn_res['min_superstep_s']:10.1f}")
    print(f"{'whole job, wall (s)':32s} {local_total:10.2f} {yarn_total:10.2f}")
    print(f"({args.supersteps} supersteps, 2 workers; YARN first superstep counted from `iterreduce submit`, "
          "first-superstep times are when metrics.jsonl appears, polled)")


if __name__ == "__main__":
    main()
