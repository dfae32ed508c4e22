"""Health, readiness, metrics, OpenAPI, and FastAPI's own errors as problem+json."""

from __future__ import annotations

import httpx

from tests.e2e.stack import Stack, assert_problem


def test_health_and_readiness(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "checks": {"redis": "ok", "storage": "ok"}}


def test_metrics_are_labelled_by_route_template(fs_stack: Stack) -> None:
    with fs_stack.client() as client:
        client.get("/v1/jobs/job_doesnotexist")
        text = client.get("/metrics").text
    assert 'lorafold_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}' \
        in text
    assert "lorafold_http_request_duration_seconds_bucket" in text
    assert 'lorafold_queue_depth{queue="lorafold-merge"}' in text


def test_framework_errors_are_problems(fs_stack: Stack) -> None:
    with fs_stack.client() as client:
        assert_problem(client.get("/v1/nothing-here"), 404, "not_found")
        assert_problem(client.delete("/v1/jobs"), 405, "method_not_allowed")
        bad_json = client.post("/v1/merges", content=b"{not json",
                               headers={"Content-Type": "application/json"})
        assert_problem(bad_json, 422, "request_validation_failed")
        wrong_type = client.post("/v1/merges", json={"adapters": [{"id": "x"}],
                                                     "rank": "high"})
        body = assert_problem(wrong_type, 422, "request_validation_failed")
        assert body["errors"][0]["loc"] == ["body", "rank"]
        assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422,
                       "request_validation_failed")


def test_merge_requests_are_checked_before_queuing(fs_stack: Stack) -> None:
    with fs_stack.client() as client:
        jobs_before = client.get("/v1/jobs").json()["count"]
        cases = [({"method": "nope", "rank": 4}, "unknown_method"),
                 ({"rule": "nope", "rank": 4}, "unknown_rule"),
                 ({"method": "ctm"}, "rank_required"),
                 ({"method": "ctm", "rank": 4, "rule": "ties", "density": 2.0},
                  "invalid_parameter")]
        for extra, code in cases:
            response = client.post("/v1/merges", json={"adapters": [{"id": "ad_x"}], **extra})
            assert_problem(response, 422, code)
        missing = client.post("/v1/merges", json={"adapters": [{"id": "ad_missing"}],
                                                  "rank": 4})
        assert_problem(missing, 404, "adapter_not_found")
        assert client.get("/v1/jobs").json()["count"] == jobs_before
        assert_problem(client.get("/v1/jobs/job_missing"), 404, "job_not_found")


def test_openapi_declares_problems_and_examples(fs_stack: Stack) -> None:
    schema = httpx.get(f"{fs_stack.url}/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/adapters", "/v1/adapters/{adapter_id}", "/v1/adapters/{adapter_id}/download",
                 "/v1/merges", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
                 "/v1/jobs/{job_id}/cancel", "/healthz", "/readyz", "/metrics"):
        assert path in paths
    for path, operations in paths.items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    content = response["content"]
                    assert list(content) == ["application/problem+json"], (path, method)
                    assert content["application/problem+json"]["schema"]["$ref"].endswith(
                        "/Problem")
                    assert "example" in content["application/problem+json"], (path, status)
            if path.startswith("/v1/"):
                assert operation["security"] == [{"bearerAuth": []}], (path, method)
                assert "401" in operation["responses"], (path, method)
    assert "multipart/form-data" in paths["/v1/adapters"]["post"]["requestBody"]["content"]
    components = schema["components"]["schemas"]
    assert "examples" in components["MergeCreate"]
    assert "HTTPValidationError" not in components
