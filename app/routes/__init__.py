"""One router per resource, collected here. Each router carries its full prefix
(`/v1/<resource>`), so route templates are complete for metrics and logs. New resources
(`/v1/datasets`, `/v1/unlearning`) add a module with a `router` and one entry below."""

from __future__ import annotations

from fastapi import APIRouter

from app.routes import adapters, health, jobs, merges

ROUTERS: list[APIRouter] = [adapters.router, merges.router, jobs.router, health.router]
