"""iterreduce: IterativeReduce-style iterative training on local processes or Hadoop YARN.

An algorithm is a :class:`Master` and a :class:`Worker` (see :mod:`iterreduce.api`);
``iterreduce run JOB.yaml`` runs it on local processes, ``iterreduce submit JOB.yaml`` on YARN.
"""

from .api import Final, Master, MasterContext, Update, Worker, WorkerContext, average_metrics, weighted_average
from .job import JobError, JobSpec, load_job

__all__ = [
    "Final",
    "JobError",
    "JobSpec",
    "Master",
    "MasterContext",
    "Update",
    "Worker",
    "WorkerContext",
    "average_metrics",
    "load_job",
    "weighted_average",
]
__version__ = "0.1.0"
