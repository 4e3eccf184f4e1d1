"""``iterreduce``: a thin command line over :mod:`iterreduce.client`."""

from __future__ import annotations

import logging
import sys

import click

from .job import JobError, load_job


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _load(path: str, algorithm: bool = True):
    """The job file, checked (with ``algorithm``, its classes and params too) or refused."""
    from .appmaster import JobFailed, check_algorithm

    try:
        job = load_job(path)
        if algorithm:
            check_algorithm(job)
    except (JobError, JobFailed) as exc:
        raise click.ClickException(str(exc)) from None
    return job


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


def _skein_client():
    import skein

    try:
        return skein.Client()
    except Exception as exc:  # noqa: BLE001 - skein raises several kinds when no cluster answers
        raise click.ClickException(
            f"cannot start the skein client for YARN: {exc}\nIt needs JAVA_HOME, HADOOP_CONF_DIR and a `yarn` "
            "command on PATH answering `yarn classpath --glob` (tests/hadoop/pseudo-hadoop env prints them "
            "for the test cluster).") from None


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--wait/--no-wait", default=False, help="Follow the application until it ends.")
@click.option("-v", "--verbose", is_flag=True)
def submit(job_file: str, wait: bool, verbose: bool) -> None:
    """Submit JOB_FILE to YARN; print the application id."""
    from .client import Progress, SubmitError, logs_command
    from .client import submit as submit_job
    from .client import wait as wait_app

    job = _load(job_file, algorithm=False)  # check_submission checks the algorithm
    _setup_logging(verbose)
    try:
        from .client import check_submission

        check_submission(job)  # before the skein driver starts: nothing is submitted on a bad job
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    client = _skein_client()
    try:
        app_id = submit_job(job, client, check=False)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(app_id)
    if not wait:
        return
    final, diagnostics = wait_app(app_id, client, progress=Progress())
    if final != "SUCCEEDED":
        raise click.ClickException(f"application {app_id} ended {final}: {diagnostics.strip()}\n"
                                   f"Read its logs with: {logs_command(app_id)}")
    click.echo(f"{app_id} SUCCEEDED: {diagnostics.strip()}")


@main.command()
@click.argument("app_id")
def status(app_id: str) -> None:
    """The state, progress and live superstep of application APP_ID."""
    import json

    from .containers import KV_STATUS

    client = _skein_client()
    r = client.application_report(app_id)
    click.echo(f"{app_id} {r.name}: {r.state} / {r.final_status}, progress {r.progress:.0%}")
    if str(r.state) == "RUNNING":
        try:
            raw = client.connect(app_id, wait=False).kv.get(KV_STATUS)
            if raw:
                st = json.loads(raw)
                click.echo(f"superstep {st['superstep']}{'/' + str(st['total']) if st.get('total') else ''} | "
                           f"{st['phase']} | workers {st['workers_registered']}/{st['workers_expected']} | "
                           f"replacements {st['replacements']} | " +
                           " ".join(f"{k}={v:.4g}" for k, v in st["metrics"].items()))
        except Exception as exc:  # noqa: BLE001
            click.echo(f"(no live view: {exc})")
    if r.diagnostics:
        click.echo(r.diagnostics.strip())


@main.command()
@click.argument("app_id")
def kill(app_id: str) -> None:
    """Kill application APP_ID."""
    _skein_client().kill_application(app_id)
    click.echo(f"{app_id} killed")


@main.command()
@click.argument("app_id")
def logs(app_id: str) -> None:
    """Print the logs of every container of APP_ID that the NodeManagers still hold."""
    from .client import container_logs

    found = container_logs(app_id)
    if not found:
        raise click.ClickException(f"no container logs found for {app_id} (with log aggregation on, try "
                                   f"`yarn logs -applicationId {app_id}`)")
    for cid, name, text in found:
        click.echo(f"===== {cid} {name} =====")
        click.echo(text)


if __name__ == "__main__":
    main()
