"""``iterreduce``: a thin command line over :mod:`iterreduce.client`."""

from __future__ import annotations

import logging
import sys

import click

from .job import JobError, load_job


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _load(path: str):
    try:
        return load_job(path)
    except JobError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="iterreduce")
def main() -> None:
    """Iterative training, IterativeReduce-style, on local processes or Hadoop YARN."""


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
def validate(job_file: str) -> None:
    """Check JOB_FILE without running it."""
    job = _load(job_file)
    click.echo(f"{job_file}: OK ({job.name}: {job.workers.count} workers, algorithm {job.algorithm.master})")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of this job.")
@click.option("--workers", type=int, default=None, help="Override workers.count.")
@click.option("--output", default=None, help="Override the output path.")
@click.option("-v", "--verbose", is_flag=True)
def run(job_file: str, resume: bool, workers: int | None, output: str | None, verbose: bool) -> None:
    """Run JOB_FILE here: the master in this process, the workers as local processes."""
    from .client import JobFailed, Progress, run_local
    from .job import JobSpec

    job = _load(job_file)
    if workers is not None or output is not None:
        d = job.to_dict()
        if workers is not None:
            d["workers"]["count"] = workers
        if output is not None:
            d["output"] = output
            d["checkpoint"]["path"] = job.checkpoint.path  # keep an explicit one, else follow the output
        try:
            job = JobSpec.from_dict(d, source=f"{job_file} (with command-line overrides)")
        except JobError as exc:
            raise click.ClickException(str(exc)) from None
    _setup_logging(verbose)
    try:
        am = run_local(job, resume=resume, progress=Progress())
    except JobFailed as exc:
        raise click.ClickException(f"job {job.name} failed: {exc}") from None
    status = am.status()
    click.echo(f"job {job.name}: {status['message']} after {status['superstep'] + 1} supersteps; "
               f"results in {job.output}")


if __name__ == "__main__":
    main()
