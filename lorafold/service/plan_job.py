"""The body of a plan job, as run by a worker: fetch the inputs, plan, report.

The result is the plan (lorafold.merge.grouping's `GroupPlan.to_dict()`, with the inputs
labelled by their adapter ids); it is computed from the factors and publishes nothing.
To carry it out, submit each group as a merge (`POST /v1/merges` with the group's members
and rank; `lorafold client plan --apply` does it).
"""

from __future__ import annotations

import contextlib
from typing import Any

from lorafold.jobs import JobRecord
from lorafold.merge.grouping import plan_groups
from lorafold.service.attempts import JobWork, run_attempt
from lorafold.service.context import ServiceContext
from lorafold.service.joblog import JobLogger

PLAN_STAGES = {"fetch": (0.0, 0.3), "plan": (0.3, 1.0)}


def run_plan_job(*, ctx: ServiceContext, job_id: str, device: str | None = None,
                 runner: str | None = None) -> JobRecord | None:
    """Run one attempt of plan job `job_id`; returns its final record (None if superseded)."""
    return run_attempt(ctx, job_id, _plan, device=device, stages=PLAN_STAGES, runner=runner)


def _plan(job: JobWork, log: JobLogger) -> dict[str, Any]:
    options = dict(job.params["options"])
    with contextlib.ExitStack() as stack:
        adapters = job.open_inputs(stack)
        job.progress("plan", 0.0)
        job.checkpoint()
        plan = plan_groups(adapters, rank=options["rank"], energy=options["min_energy"],
                           max_rank=options["max_rank"], max_groups=options["max_groups"],
                           min_similarity=options["min_similarity"], force=options["force"])
    log.info("planned %d inputs into %d group(s)", len(adapters), len(plan.groups))
    return {"plan": plan.to_dict(), "options": options}
