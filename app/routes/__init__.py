"""One router per resource, collected here. Each router carries its full prefix
(`/v1/<resource>`), so route templates are complete for metrics and logs. A new resource
adds a module with a `router` and one entry below."""

from __future__ import annotations

from fastapi import APIRouter

from app.routes import adapters, datasets, health, jobs, merges, plans, unlearning

ROUTERS: list[APIRouter] = [adapters.router, datasets.router, merges.router, plans.router,
                            unlearning.router, jobs.router, health.router]
