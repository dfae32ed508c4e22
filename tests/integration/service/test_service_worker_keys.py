"""Only the API needs API keys (issue 10): a worker process starts and serves its queues
under production settings without any, while the API refuses to start without one."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from redis import Redis
from rq import Worker

from app.main import create_app
from lorafold.servers.process import ManagedProcess
from lorafold.settings import Settings
from tests.integration.service.test_service_idle_retry import REPO


def test_a_worker_starts_without_api_keys_in_production(settings: Settings,
                                                        tmp_path: Path) -> None:
    env = {"LORAFOLD_ENVIRONMENT": "production", "LORAFOLD_REDIS_URL": settings.redis_url,
           "LORAFOLD_STORAGE_URL": settings.storage_url,
           "LORAFOLD_SPOOL_DIR": str(tmp_path / "spool"), "PYTHONPATH": str(REPO)}
    log = tmp_path / "worker.log"
    worker = ManagedProcess(name="keyless worker", argv=[sys.executable, "-m",
                                                         "workers.worker", "--name", "keyless"],
                            env=env, cwd=REPO, log_path=log).start()
    try:
        deadline = time.monotonic() + 120
        while not any(w.name.startswith("keyless.")
                      for w in Worker.all(connection=Redis.from_url(settings.redis_url))):
            assert worker.alive(), log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        worker.stop()


def test_the_api_refuses_to_start_without_keys_in_production(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs at least one API key"):
        create_app(Settings(environment="production", storage_url=str(tmp_path / "s")))

