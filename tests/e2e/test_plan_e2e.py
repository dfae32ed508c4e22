"""`lorafold client plan --apply` against a live stack: the plan runs on a worker, then one
merge job per group is submitted and succeeds, at the group's rank."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.stack import Stack, client_cli
from tests.unit.merge.test_grouping import family, write_factors


def test_plan_apply_submits_the_group_merges(fs_stack: Stack, tmp_path: Path) -> None:
    f0, f1 = family(0)
    lone, _ = family(1, avoid=[f0, f1])
    ids = []
    for i, factors in enumerate([f0, f1, lone]):
        done = client_cli(fs_stack, "upload", write_factors(tmp_path / f"a{i}", factors), "-q")
        assert done.returncode == 0, done.stderr
        ids.append(done.stdout.strip())
    done = client_cli(fs_stack, "plan", *ids, "--apply", "--timeout", "120")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    plan = printed["plan"]
    assert [sorted(g["members"]) for g in plan["groups"]] == [sorted(ids[:2])]
    assert plan["left_alone"] == [ids[2]]
    (merge_job,) = printed["merge_jobs"]
    waited = client_cli(fs_stack, "wait", merge_job, "--timeout", "120")
    assert waited.returncode == 0, waited.stderr
    with fs_stack.client() as client:
        job = client.get(f"/v1/jobs/{merge_job}").json()
    assert job["status"] == "succeeded"
    assert job["result"]["report"]["output_rank"] == plan["groups"][0]["rank"]
