"""One RQ worker process: `python -m workers.worker --name NAME`.

It uses RQ's forking `Worker`: each job runs in a fresh child (the work horse), so a job
that crashes or leaks (GPU memory included) takes nothing down with it, and the parent —
which imports torch but never initialises CUDA — stays clean for the next fork.

Abandoned jobs. While a horse runs, the parent renews the job's entry in RQ's
StartedJobRegistry every `job_monitoring_interval_s`. RQ sets that entry to expire
`interval + 60 s` after each renewal; `LorafoldWorker` makes the 60 s our
`abandoned_after_s`. If the whole worker dies (SIGKILL, lost machine) the entry expires,
and the next registry maintenance of any worker on the queue (every
`maintenance_interval_s`, idle or not: see `LorafoldWorker`) finds the job abandoned,
calls our failure callback and re-queues it under its `Retry`; another worker then runs
it again (a new attempt of the same job id). If only the horse dies, the parent sees it
at once and re-queues the job the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import uuid
from collections.abc import Sequence

from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from lorafold.service.context import ServiceContext
from lorafold.service.joblog import configure_worker_logging
from lorafold.service.queues import make_queue, worker_job_types
from lorafold.service.storage_sweep import sweep_storage
from lorafold.service.workdirs import sweep_work_dirs
from lorafold.settings import Settings
from workers import tasks

logger = logging.getLogger(__name__)


class LorafoldWorker(Worker):
    """RQ's forking worker with the abandoned-job deadline taken from our settings, and an
    idle wait bounded by the maintenance interval.

    RQ runs its maintenance (the registry cleanup that re-queues abandoned jobs) only
    between two dequeue attempts, and an idle worker blocks in BLPOP for `worker_ttl - 15`
    seconds (105 s with our 120 s TTL) before it tries again; so an idle worker retried an
    abandoned job up to ~105 s late whatever `maintenance_interval_s` said. Waiting at most
    the maintenance interval per BLPOP makes the interval the bound.
    """

    abandoned_after_s: int = 60

    @property
    def dequeue_timeout(self) -> int:
        return max(1, min(self.worker_ttl - 15, int(self.maintenance_interval)))

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        interval = int(self.job_monitoring_interval)
        if job.timeout and job.timeout > 0:
            interval = int(max(1.0, min(job.timeout - working_time, interval)))
        return interval + self.abandoned_after_s


def build_worker(ctx: ServiceContext, name: str) -> LorafoldWorker:
    settings = ctx.settings
    queues = [make_queue(ctx.redis, settings, job_type)
              for job_type in worker_job_types(settings)]
    worker = LorafoldWorker(
        queues, name=name, connection=ctx.redis, serializer=JSONSerializer,
        job_monitoring_interval=settings.job_monitoring_interval_s,
        maintenance_interval=settings.maintenance_interval_s,
        worker_ttl=settings.worker_ttl_s,
        work_horse_killed_handler=tasks.on_work_horse_killed,
    )
    worker.abandoned_after_s = settings.abandoned_after_s
    return worker


def preload() -> None:
    """Import the heavy modules once in the parent so every forked horse starts warm.

    Importing torch does not initialise CUDA; nothing here may (forked children of a
    process with a CUDA context crash).
    """
    import torch  # noqa: F401

    import lorafold.merge  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.worker")
    parser.add_argument("--name", default="worker", help="prefix of the RQ worker name")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_worker_logging(settings.log_level)
    preload()
    name = f"{args.name}.{socket.gethostname()}.{uuid.uuid4().hex[:8]}"
    ctx = ServiceContext(settings)
    sweep_work_dirs(ctx.spool_dir)  # what attempts killed with a previous worker left
    sweep_storage(ctx)  # what publishes that crashed left in storage
    ctx.prepare_for_fork()  # the parent never touches storage; its horses do
    tasks.configure(ctx, runner=f"worker {name} (pid {os.getpid()})")
    worker = build_worker(ctx, name)
    logger.info("worker %s (pid %d) on %s, device %s", name, os.getpid(),
                ", ".join(q.name for q in worker.queues), settings.worker_device)
    worker.work(logging_level=settings.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
