#!/usr/bin/env python3
"""MNIST with a Deep Belief Network on iterreduce, in one command.

    python examples/mnist_dbn.py prepare --data DIR --out data/mnist   # IDX -> Parquet shards
    python examples/mnist_dbn.py run [--job examples/dbn.yaml]          # train locally
    python examples/mnist_dbn.py [--data DIR] [--job ...]               # both

``--data`` is a directory holding the four MNIST IDX files (gzipped or not); without it
they are downloaded from the public mirrors into ``~/.cache/iterreduce/mnist``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # let `python examples/mnist_dbn.py` import the examples package
    sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = Path.home() / ".cache" / "iterreduce" / "mnist"


def prepare_data(data: str | None, out: str, shards: int, verify: bool = True) -> dict:
    from dbn.data import ChecksumError, IDXError, download_mnist, prepare_mnist

    try:
        src = Path(data) if data else download_mnist(DEFAULT_CACHE)
        meta = prepare_mnist(src, out, num_shards=shards, verify=verify)
    except ChecksumError as exc:
        raise click.ClickException(f"{exc} (another dataset in MNIST's format and file names, Fashion-MNIST "
                                   "say? `prepare --no-verify` reads it without the check)") from None
    except (OSError, IDXError, RuntimeError, ValueError) as exc:  # each names the file
        raise click.ClickException(str(exc)) from None
    for name, s in meta["splits"].items():
        click.echo(f"{out}/{name}: {s['rows']} rows in {len(s['files'])} file(s)")
    return meta


@click.group(invoke_without_command=True)
@click.option("--data", default=None, help="Directory with the MNIST IDX files (default: download).")
@click.option("--out", default=str(ROOT / "data" / "mnist"), show_default=True, help="Parquet output directory.")
@click.option("--job", "job_file", default=str(ROOT / "examples" / "dbn.yaml"), show_default=True)
@click.option("--shards", default=8, show_default=True)
@click.pass_context
def main(ctx: click.Context, data: str | None, out: str, job_file: str, shards: int) -> None:
    """Prepare MNIST and train the DBN (without a sub-command: both)."""
    given = [f"--{name.replace('_file', '')}" for name in ("data", "out", "job_file", "shards")
             if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    if ctx.invoked_subcommand is not None:
        if given:
            raise click.UsageError(f"{', '.join(given)} before the sub-command: put options after it "
                                   f"(mnist_dbn.py {ctx.invoked_subcommand} {given[0]} ...)")
        return
    if "--out" in given and "--job" not in given:
        raise click.UsageError("--out with training needs --job: the example job files read data/mnist next to "
                               "examples/; give a job file whose paths read DIR (or run `mnist_dbn.py prepare "
                               "--out DIR`, then point a job file's paths at DIR)")
    if not (Path(out) / "meta.json").exists() or data:
        prepare_data(data, out, shards)
    ctx.invoke(run, job_file=job_file)


@main.command()
@click.option("--data", default=None, help="Directory with the MNIST IDX files (default: download).")
@click.option("--out", default=str(ROOT / "data" / "mnist"), show_default=True)
@click.option("--shards", default=8, show_default=True, help="Parquet files for the training split.")
@click.option("--no-verify", is_flag=True,
              help="Do not check the files against MNIST's checksums: another dataset in MNIST's format and "
                   "file names (Fashion-MNIST, say).")
def prepare(data: str | None, out: str, shards: int, no_verify: bool) -> None:
    """Convert MNIST IDX files into Parquet shards (train/, validation/, test/)."""
    prepare_data(data, out, shards, verify=not no_verify)


@main.command()
@click.option("--job", "job_file", default=str(ROOT / "examples" / "dbn.yaml"), show_default=True)
@click.option("--resume", is_flag=True)
def run(job_file: str, resume: bool = False) -> None:
    """Train on local worker processes and print the test error."""
    from iterreduce.client import JobFailed, Progress, SubmitError, check_something_to_resume, run_local
    from iterreduce.fs import Output
    from iterreduce.job import JobError, load_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        job = load_job(job_file)
        if resume:
            check_something_to_resume(job)  # a mistyped output would start from scratch
        run_local(job, resume=resume, progress=Progress())
    except (JobError, SubmitError) as exc:  # every error of the job file; nothing to resume
        raise click.ClickException(str(exc)) from None
    except JobFailed as exc:  # the first line; a traceback stays in the log above
        raise click.ClickException(str(exc).partition("\n")[0]) from None
    summary = json.loads(Output(job.output).read_bytes("metrics.json"))
    final = summary.get("final") or {}
    click.echo(json.dumps({"job": job.name, "message": summary["message"], **final.get("metrics", {})}, indent=2))


if __name__ == "__main__":
    main()
