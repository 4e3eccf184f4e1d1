"""iterreduce: IterativeReduce-style iterative training on local processes or Hadoop YARN.

An algorithm is a :class:`Master` and a :class:`Worker` (see :mod:`iterreduce.api`);
``iterreduce run JOB.yaml`` runs it on local processes, ``iterreduce submit JOB.yaml`` on YARN.
"""

from .api import Final, Master, MasterContext, Update, Worker, WorkerContext, average_metrics, weighted_average
from .job import JobError, JobSpec, closest_match, load_job

__all__ = [
    "Final",
    "JobError",
    "JobSpec",
    "Master",
    "MasterContext",
    "RecordError",
    "Update",
    "Worker",
    "WorkerContext",
    "average_metrics",
    "closest_match",
    "load_job",
    "weighted_average",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # RecordError lives with the readers in iterreduce.fs; imported on first use, so that
    # ``import iterreduce`` does not import pyarrow
    if name == "RecordError":
        from .fs import RecordError

        return RecordError
    raise AttributeError(f"module 'iterreduce' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"RecordError"})
