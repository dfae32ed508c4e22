"""An idle worker retries an abandoned job within the maintenance interval (issue 10).

RQ runs the registry cleanup that finds abandoned jobs only between two blocking
dequeues, and an idle worker's BLPOP used to last `worker_ttl - 15` s (105 s here), so
the retry came up to ~105 s late. A real worker process, idle, must retry the job of a
worker that died within `maintenance_interval_s` (plus the time to fork and record).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rq import Worker
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from lorafold.jobs import JobType
from lorafold.servers.process import ManagedProcess
from lorafold.service.context import ServiceContext
from lorafold.service.queues import enqueue
from lorafold.settings import Settings
from tests.integration.service.test_service_abandoned import start_like_a_worker
from workers.worker import build_worker

REPO = Path(__file__).resolve().parents[3]
MAINTENANCE_S = 2
SLACK_S = 15  # fork a work horse, run the (failing) attempt, write its record
ABANDONED_AFTER_S = 25  # the dead worker's deadline: after the idle one has started


def test_the_dequeue_wait_is_bounded_by_the_maintenance_interval(ctx: ServiceContext) -> None:
    worker = build_worker(ctx, f"bound-{time.monotonic_ns()}")
    assert worker.dequeue_timeout <= ctx.settings.maintenance_interval_s < 105


def test_an_idle_worker_retries_an_abandoned_job_promptly(settings: Settings,
                                                          ctx: ServiceContext,
                                                          tmp_path: Path) -> None:
    record = ctx.jobs.create(tenant="tenant-a", type=JobType.MERGE, params={})
    enqueue(redis=ctx.redis, settings=ctx.settings, job_type=JobType.MERGE, job_id=record.id)
    dead = build_worker(ctx, f"dead-{time.monotonic_ns()}")
    dead.abandoned_after_s = ABANDONED_AFTER_S
    dead.register_birth()
    _, execution = start_like_a_worker(dead, dead.queues[0])  # ... then it dies silently
    ctx.jobs.mark_running(record.id)
    registry = StartedJobRegistry(dead.queues[0].name, connection=ctx.redis,
                                  serializer=JSONSerializer)
    abandoned_at = ctx.redis.zscore(registry.key, execution.composite_key)
    assert abandoned_at is not None

    env = {"LORAFOLD_ENVIRONMENT": "test", "LORAFOLD_REDIS_URL": settings.redis_url,
           "LORAFOLD_STORAGE_URL": settings.storage_url,
           "LORAFOLD_SPOOL_DIR": str(tmp_path / "spool-idle"),
           "LORAFOLD_JOB_MONITORING_INTERVAL_S": "1", "LORAFOLD_ABANDONED_AFTER_S": "3",
           "LORAFOLD_MAINTENANCE_INTERVAL_S": str(MAINTENANCE_S),
           "LORAFOLD_WORKER_TTL_S": "120", "PYTHONPATH": str(REPO)}
    idle = ManagedProcess(name="idle worker", argv=[sys.executable, "-m", "workers.worker",
                                                    "--name", "idle"],
                          env=env, cwd=REPO, log_path=tmp_path / "idle.log").start()
    try:
        while not any(w.name.startswith("idle.") and w.get_state() == "idle"
                      for w in Worker.all(connection=ctx.redis)):
            assert idle.alive(), (tmp_path / "idle.log").read_text()
            time.sleep(0.2)
        # It did its start-up maintenance before the job was abandoned: now it waits.
        assert time.time() < abandoned_at - MAINTENANCE_S, "the worker took too long to start"
        while ctx.jobs.get(record.id).attempts < 2:
            waited = time.time() - abandoned_at
            assert waited < MAINTENANCE_S + SLACK_S, \
                f"no retry {waited:.1f}s after the job was abandoned"
            time.sleep(0.2)
    finally:
        idle.stop()
