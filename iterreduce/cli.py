"""``iterreduce``: a thin command line over :mod:`iterreduce.client`."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import time
from typing import Any

import click

from .containers import ENV_LOG_LEVEL
from .job import JobError, is_uri, load_job


VERBOSE_HELP = ("Debug lines too: each worker update as the master takes it, each checkpoint after the first, "
                "each worker's fetch and push (in the workers' logs; on YARN in the containers' logs), the client's "
                "retries.")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose:  # iterreduce's own debug lines (not every library's), in local workers too
        logging.getLogger("iterreduce").setLevel(logging.DEBUG)
        os.environ[ENV_LOG_LEVEL] = "DEBUG"


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


def _check(job, output: bool = False) -> None:
    """What ``submit`` checks before submitting: the input makes ``workers.count`` splits,
    (with ``output``) the output directory can be made."""
    from .client import SubmitError, check_input, check_output

    try:
        check_input(job)
        if output:
            check_output(job)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="iterreduce")
def main() -> None:
    """Iterative training, IterativeReduce-style, on local processes or Hadoop YARN."""


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
def validate(job_file: str) -> None:
    """Check JOB_FILE without running it: fields, algorithm and its params, the input (splits, columns,
    schemas), the algorithm's own data paths, output, yarn section."""
    from .appmaster import JobFailed, check_algorithm
    from .client import SubmitError, check_input, check_output_place
    from .job import errors_text

    try:
        job = load_job(job_file)
    except JobError as exc:
        later = "" if "cannot read the job file" in str(exc) else \
            "\n(the input and the algorithm are checked once the fields are right)"
        raise click.ClickException(f"{exc}{later}") from None
    errors = []  # the algorithm, the input and the output: each said, not only the first
    splits = []
    params_not_accepted = False  # then not given to the algorithm's input_columns
    for check in (check_algorithm, check_input, check_output_place):
        try:
            splits = (check(job, columns=not params_not_accepted) if check is check_input else check(job)) or splits
        except (JobFailed, SubmitError) as exc:
            errors.extend(getattr(exc, "errors", None) or [str(exc).removeprefix(f"{job.source}: ")])
            params_not_accepted = params_not_accepted or getattr(exc, "params_not_accepted", False)
    if errors:
        raise click.ClickException(errors_text(job.source, errors))
    yarn = ""
    if job.yarn.environment:  # meant for YARN too: what can be checked without the cluster
        from .client import SubmitError, check_yarn_section

        try:
            check_yarn_section(job)
        except SubmitError as exc:
            raise click.ClickException(str(exc)) from None
        yarn = "; its yarn section is OK too (submit checks the cluster)"
        env = job.yarn.environment
        for form, inside in (("venv://", "/bin/activate"), ("python://", "")):
            if env.startswith(form) and not (os.path.exists(env[len(form):] + inside)
                                             or (form == "python://" and shutil.which(env[len(form):]))):
                yarn += (f"; yarn.environment {env}: {env[len(form):] + inside} is not on this machine: it "
                         "must be on every node")
    rows = [sum(p.num_rows for p in s) for s in splits]
    files = len({p.path for s in splits for p in s})
    shares = f"; input: {sum(rows)} rows in {files} file(s), splits of {min(rows)}..{max(rows)} rows" if rows else ""
    click.echo(f"{job_file}: OK ({job.name}: {job.workers.count} workers, algorithm {job.algorithm.master}"
               f"{shares}){yarn}")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of this job.")
@click.option("--workers", type=int, default=None, help="Override workers.count.")
@click.option("--output", default=None,
              help="Override the output path (a relative one is taken from the current directory).")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
def run(job_file: str, resume: bool, workers: int | None, output: str | None, verbose: bool) -> None:
    """Run JOB_FILE here: the master in this process, the workers as local processes."""
    try:
        _run(job_file, resume, workers, output, verbose)
    except KeyboardInterrupt:  # while loading and checking: the job had not started
        click.echo(f"\nError: interrupted before job {job_file} started", err=True)
        sys.exit(128 + signal.SIGINT)


def _run(job_file: str, resume: bool, workers: int | None, output: str | None, verbose: bool) -> None:
    from .client import JobFailed, Progress, run_local
    from .job import JobSpec

    job = _load(job_file)
    if workers is not None or output is not None:
        d = job.to_dict()
        if workers is not None:
            d["workers"]["count"] = workers
        if output is not None:  # relative to where the command runs, as any path on a command line
            d["output"] = output if is_uri(output) else os.path.abspath(output)
            d["checkpoint"]["path"] = job.checkpoint.path  # keep an explicit one, else follow the output
        try:
            job = JobSpec.from_dict(d, source=f"{job_file} (with command-line overrides)")
        except JobError as exc:
            raise click.ClickException(str(exc)) from None
    if resume:
        from .client import SubmitError, check_something_to_resume

        try:
            check_something_to_resume(job)
        except SubmitError as exc:
            raise click.ClickException(str(exc)) from None
    _check(job, output=True)
    _setup_logging(verbose)
    try:
        with _signals_interrupt():
            am = run_local(job, resume=resume, progress=Progress())
    except JobFailed as exc:
        first, _, rest = str(exc).partition("\n")
        raise click.ClickException(f"job {job.name} failed: {first}" +
                                   ("\n(the traceback is in the log above)" if rest.strip() else "")) from None
    except KeyboardInterrupt as exc:
        how = f" by {exc.signal_name}" if isinstance(exc, Interrupted) else ""
        click.echo(f"\nError: job {job.name} interrupted{how}. {_resume_hint(job, job_file, workers, output)}",
                   err=True)
        sys.exit(128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT))
    status = am.status()
    steps = _supersteps(status['superstep'] + 1)
    if status["message"].startswith("had already succeeded"):
        click.echo(f"job {job.name} had already succeeded after {steps}: nothing to resume (run without --resume "
                   f"to run it again); results in {job.output}")
    else:
        n = status.get("replacements", 0)
        replaced = f" and {n} worker replacement{'s' if n > 1 else ''}" if n else ""
        click.echo(f"job {job.name} succeeded after {steps}{replaced}; results in {job.output}")


def _supersteps(n) -> str:
    return f"{n} superstep{'' if n == 1 else 's'}"


def _resume_hint(job, job_file: str, workers: int | None = None, output: str | None = None) -> str:
    """The command that continues (or restarts) this run: with the overrides it was given."""
    import shlex

    from .fs import Checkpoints

    given = ([f"--workers {workers}"] if workers is not None else []) + \
            ([f"--output {shlex.quote(output)}"] if output is not None else [])
    job_file = shlex.join([job_file]) + "".join(f" {g}" for g in given)
    try:
        steps = Checkpoints(job.checkpoint_path).supersteps()
    except Exception:  # noqa: BLE001 - only a hint
        steps = None
    if steps == []:
        why = ("It writes no checkpoints (checkpoint.every is 0)" if job.checkpoint.every == 0
               else "It had written no checkpoint yet")
        return f"{why}: `iterreduce run {job_file}` starts it again from the beginning."
    at = f" (superstep {max(steps)})" if steps else ""
    return f"`iterreduce run --resume {job_file}` continues it from its last checkpoint{at}."


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``kill``, a closed terminal, a scheduler's stop) stops a local run
    as Ctrl-C does: the workers are stopped, and ``--resume`` continues from the last
    checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.signal_name = signum, signal.Signals(signum).name


@contextlib.contextmanager
def _signals_interrupt():
    def handler(signum, _frame):
        for s in saved:  # a second one must not cut the shutdown short
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    # a signal the caller ignores (nohup's SIGHUP) stays ignored; one handled outside Python is left alone
    saved = {s: h for s in (signal.SIGTERM, signal.SIGHUP)
             if (h := signal.getsignal(s)) is not None and h != signal.SIG_IGN}
    for s in saved:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _skein_client(verbose: bool = False):
    import gc

    import skein

    hook, message = sys.unraisablehook, ""
    sys.unraisablehook = lambda _: None  # a half-made skein.Client complains in __del__
    try:
        try:
            if verbose:
                return skein.Client()
            # the driver's (Java) log, skein's and Hadoop's: errors only, unless -v
            quiet = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j-quiet.properties")
            return skein.Client(log_level="ERROR", java_options=[f"-Dlog4j.configuration=file:{quiet}"])
        except Exception as exc:  # noqa: BLE001 - skein raises several kinds when no cluster answers
            message = str(exc)
        gc.collect()
    finally:
        sys.unraisablehook = hook
    raise click.ClickException(
        f"cannot start the skein client for YARN: {message}\nIt needs JAVA_HOME, HADOOP_CONF_DIR and a `yarn` "
        "command on PATH answering `yarn classpath --glob` (tests/hadoop/pseudo-hadoop env prints them "
        "for the test cluster).")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--wait/--no-wait", default=False, help="Follow the application until it ends.")
@click.option("--resume", is_flag=True,
              help="Continue from the last checkpoint of this job (left by a killed or failed application).")
@click.option("--skip-resource-check", is_flag=True,
              help="Submit even when the ResourceManager says the queue does not exist or the containers "
                   "cannot all run.")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
def submit(job_file: str, wait: bool, resume: bool, skip_resource_check: bool, verbose: bool) -> None:
    """Submit JOB_FILE to YARN; print the application id."""
    from .client import SubmitError
    from .client import submit as submit_job

    job = _load(job_file, algorithm=False)  # check_submission checks the algorithm
    _setup_logging(verbose)
    try:
        from .client import check_something_to_resume, check_submission

        if resume:  # before check_submission makes the output directory
            check_something_to_resume(job)
        check_submission(job, resources=not skip_resource_check)  # before the skein driver starts
        if resume:
            from .client import check_resume

            what, step = check_resume(job)
            if what == "done":
                click.echo(f"job {job.name} had already succeeded after {_supersteps(step)}: nothing to resume "
                           f"(submit without --resume to run it again); results in {job.output}")
                return
            click.echo(f"resuming from the checkpoint at superstep {step} under {job.checkpoint_path}" if step
                       else f"no checkpoint under {job.checkpoint_path}: the job starts from the beginning", err=True)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    client = _skein_client(verbose)
    try:
        app_id = submit_job(job, client, check=False, resume=resume)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(app_id)
    if wait:
        _follow(app_id, client)


def _follow(app_id: str, client, stream: Any = None) -> None:
    """Follow ``app_id`` to its end (a line per superstep, on ``stream``: standard error when
    not given), then say how it ended; a click error (exit status 1) when it did not succeed."""
    from .client import Progress, logs_command
    from .client import wait as wait_app

    try:
        final, diagnostics = wait_app(app_id, client, progress=Progress(stream, lines=True))
    except KeyboardInterrupt:
        click.echo(f"\nstopped following {app_id}; the application goes on. `iterreduce status -f {app_id}` "
                   f"follows it again, `iterreduce kill {app_id}` ends it.", err=True)
        sys.exit(130)
    if final != "SUCCEEDED":
        hint = ""
        if final == "FAILED" and "iterreduce job" not in diagnostics:  # it failed before iterreduce ran
            from .client import driver_log_tail

            tail = driver_log_tail(app_id)
            hint = f"\n{tail}" if tail else ""
        raise click.ClickException(f"application {app_id} ended {final}: {diagnostics.strip()}{hint}\n"
                                   f"Read its logs with: {logs_command(app_id)}")
    click.echo(f"{app_id} SUCCEEDED: {diagnostics.strip()}")


@main.command()
@click.argument("app_id", metavar="APP_ID|OUTPUT")
@click.option("--follow", "-f", is_flag=True,
              help="Then follow it until it ends, a line per superstep on standard output (`submit --wait` "
                   "writes them on standard error); exit status 1 when it does not succeed.")
def status(app_id: str, follow: bool) -> None:
    """The state, progress and live superstep of application APP_ID, or of the run that writes
    to the output directory OUTPUT (a local run's, or a YARN application's). Exit status 0
    when it can tell the state, whatever that is; with -f, 1 when the job does not succeed."""
    if not re.match(r"^application_\d+_\d+$", app_id):
        app_id = _output_status(app_id, follow)
        if app_id is None:
            return
    import json

    from .client import live_metrics_text, status_text, with_deadline
    from .containers import KV_STATUS

    client = _skein_client()
    r = _report(client, app_id)
    head = f"{app_id} {r.name}: {r.state} / {r.final_status}"
    if str(r.state) != "RUNNING":  # YARN's 100 % of an application it killed says nothing
        click.echo(head)
    else:
        st, unseen = None, None
        try:
            raw = with_deadline(lambda: client.connect(app_id, wait=False).kv.get(KV_STATUS), 10.0)
            st = json.loads(raw) if raw else None
        except Exception as exc:  # noqa: BLE001
            unseen = exc
        # the progress of the supersteps done, as the live view says it (YARN's figure lags behind)
        done = st["superstep"] / st["total"] if isinstance(st, dict) and st.get("total") else r.progress
        click.echo(f"{head}, progress {min(done, 1.0):.0%}")
        if isinstance(st, dict):
            click.echo(f"{status_text(st)} | {st['phase']} | "
                       f"workers {st['workers_registered']}/{st['workers_expected']} | "
                       f"replacements {st['replacements']} | " + live_metrics_text(st, None))
            if st.get("message"):
                click.echo(st["message"])
        elif unseen is not None:
            click.echo(f"(no live view: {unseen})")
    if follow and str(r.state) not in ("FINISHED", "FAILED", "KILLED"):
        _follow(app_id, client, sys.stdout)  # what status says, all on one stream (submit's id is alone there)
        return
    if r.diagnostics:
        click.echo(r.diagnostics.strip())
    if str(r.final_status) == "FAILED" and "iterreduce job" not in (r.diagnostics or ""):
        from .client import driver_log_tail  # it failed before iterreduce ran: the driver's log says why

        tail = driver_log_tail(app_id)
        if tail:
            click.echo(tail)
    if follow and str(r.final_status) != "SUCCEEDED":  # it had ended: followed to an end it did not succeed
        sys.exit(1)


@main.command()
@click.argument("app_id")
@click.option("--now", is_flag=True,
              help="Kill it through the ResourceManager at once: no final metrics.json is written.")
@click.option("--grace", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the ApplicationMaster to stop the job before killing it.")
def kill(app_id: str, now: bool, grace: float) -> None:
    """Stop application APP_ID: its master stops the workers, writes metrics.json (FAILED,
    saying so) and ends the application KILLED; the checkpoints stay, and `iterreduce
    submit --resume` continues from the last. Killed through the ResourceManager when the
    master does not answer (or with --now)."""
    _known(app_id)
    client = _skein_client()
    r = _report(client, app_id)
    if str(r.state) in ("FINISHED", "FAILED", "KILLED"):
        raise click.ClickException(f"{app_id} has already ended: {r.state} / {r.final_status}")
    if not now and str(r.state) == "RUNNING":
        stopped = _ask_to_stop(client, app_id, grace, r.name)
        if stopped is not None:
            click.echo(f"{app_id} stopped: {stopped}")
            return
    client.kill_application(app_id)
    click.echo(f"{app_id} killed; its checkpoints stay: `iterreduce submit JOB_FILE --resume` continues from the last")


def _output_status(uri: str, follow: bool) -> str | None:
    """``status`` of the run that writes (or wrote) to the output directory ``uri``; the
    application id when that is a YARN application, for ``status`` to go on with."""
    from .appmaster import superstep_line
    from .client import run_in
    from .fs import InputError

    try:
        run = run_in(uri)
    except InputError as exc:
        raise click.ClickException(f"{exc}; `iterreduce status` takes that, or a YARN application id "
                                   "(application_<cluster>_<number>)") from None
    owner = run["owner"] or {}
    if owner.get("application"):
        click.echo(f"{uri} is the output of application {owner['application']} (job {owner.get('job')})")
        return owner["application"]
    seen = len(run["records"])
    if owner and run["alive"]:
        click.echo(f"{uri}: job {owner.get('job')}: RUNNING (local run, process {owner.get('pid')} on "
                   f"{owner.get('host')})")
        if run["records"]:
            click.echo(superstep_line(run["records"][-1]))
        while follow:
            time.sleep(1.0)
            run = run_in(uri)
            for record in run["records"][seen:]:
                click.echo(f"{time.strftime('%H:%M:%S')} {superstep_line(record)}")
            seen = len(run["records"])
            if not (run["owner"] and run["alive"]):
                break
        if not follow:
            return None
    elif owner and run["alive"] is None:
        text = (f"{uri}: job {owner.get('job')}: a local run on {owner.get('host')} (process {owner.get('pid')}) "
                "writes here; `iterreduce status` there says whether it lives")
        if follow:  # it cannot be followed from here
            raise click.ClickException(text + ", and follows it")
        click.echo(text)
        return None
    final = run["final"]
    if final is None:
        step = f" after superstep {run['records'][-1].get('superstep')}" if run["records"] else ""
        text = (f"{uri}: the run{step} ended without a result (its process was killed?); `iterreduce run "
                "--resume JOB_FILE` continues it from its last checkpoint, if it wrote one")
        if follow:
            raise click.ClickException(text)
        click.echo(text)
        return None
    text = (f"{uri}: job {final.get('job')}: {final.get('state')} after {_supersteps(final.get('supersteps'))}"
            + (f": {final['message']}" if final.get("message") and final.get("state") != "SUCCEEDED" else ""))
    if final.get("state") != "SUCCEEDED" and follow:
        raise click.ClickException(text)
    click.echo(text)
    return None


def _ask_to_stop(client, app_id: str, grace: float, name: str) -> str | None:
    """Ask the ApplicationMaster of ``app_id`` to stop its job (KV_STOP), wait up to ``grace`` s
    until it says it has (its live status FAILED: metrics.json written), then end the
    application (else skein would start its next attempt, which only ends it). Returns the
    master's message, or None when it did not take the request or did not stop in time."""
    import json

    from .client import kill_application, with_deadline
    from .containers import KV_STATUS, KV_STOP

    try:
        app = with_deadline(lambda: client.connect(app_id, wait=False), 10.0)
        with_deadline(lambda: app.kv.__setitem__(KV_STOP, f"iterreduce kill by {_user()}".encode()), 10.0)
    except Exception as exc:  # noqa: BLE001 - not an iterreduce master, or it does not answer
        click.echo(f"the ApplicationMaster did not take the stop request ({exc}): killing {app_id}", err=True)
        return None
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.25)
        try:
            raw = with_deadline(lambda: app.kv.get(KV_STATUS), 10.0)
            st = json.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 - the master is going: the ResourceManager says how it ended
            r = _report(client, app_id)
            if str(r.state) in ("FINISHED", "FAILED", "KILLED"):
                return f"{r.state} / {r.final_status}: {(r.diagnostics or '').strip()}"
            continue
        if st.get("state") == "FAILED":  # stopped (or failed just now): no next attempt
            # ended here, with the master's reason (YARN would give "killed by user")
            with contextlib.suppress(Exception):
                kill_application(client, app_id, f"iterreduce job {name} stopped: {st.get('message', '')}")
            return f"{st.get('message', '')}"
        # SUCCEEDED: it ended before it saw the request, and unregisters by itself
    click.echo(f"{app_id} did not say it had stopped within {grace:g} s: killing it through the ResourceManager "
               "(its metrics.json may or may not say why)", err=True)
    return None


def _user() -> str:
    from .client import login_name

    return login_name("an unknown user")


def _known(app_id: str) -> None:
    if not re.match(r"^application_\d+_\d+$", app_id):
        raise click.ClickException(f"{app_id!r} is not a YARN application id (application_<cluster>_<number>)")


def _report(client, app_id: str):
    try:
        return client.application_report(app_id)
    except ValueError as exc:  # skein: "Unknown ApplicationId ..."
        raise click.ClickException(f"{app_id}: {exc}; `yarn application -list -appStates ALL` lists the "
                                   "applications the ResourceManager knows") from None


@main.command()
@click.argument("app_id")
def logs(app_id: str) -> None:
    """Print the logs of every container of APP_ID that the NodeManagers still hold."""
    from .client import container_logs

    _known(app_id)
    try:
        found = container_logs(app_id)
    except OSError as exc:  # urllib's URLError: no ResourceManager there
        if getattr(exc, "code", None) == 404:
            raise click.ClickException(f"the ResourceManager does not know {app_id}") from None
        raise click.ClickException(f"cannot read the logs of {app_id} from the ResourceManager: {exc}\n"
                                   "Is HADOOP_CONF_DIR set to the cluster's configuration?") from None
    if not found:
        raise click.ClickException(f"no container logs found for {app_id} (with log aggregation on, try "
                                   f"`yarn logs -applicationId {app_id}`)")
    for cid, name, text in found:
        click.echo(f"===== {cid} {name} =====")
        click.echo(text)


if __name__ == "__main__":
    main()
