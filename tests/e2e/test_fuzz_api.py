"""Property-based fuzzing of the live OpenAPI (schemathesis) against a real stack: no
request the generator builds from the schema gets a 5xx.

Bounded: MAX_EXAMPLES generated requests per operation, each sent with a valid key and
without one; every response is checked by schemathesis's `not_a_server_error`, and any
failure is reported with the request that caused it. Writes go to tenant-b, which the
other e2e tests do not count on.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.stack import KEYS, Stack

MAX_EXAMPLES = 50
# No 5xx; and every answer is one the schema documents: its status code, content type and
# body (problem+json errors included).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
AUTH = {"Authorization": f"Bearer {KEYS['tenant-b']}"}


@schemathesis.serializer("application/jsonl")
def _jsonl(ctx: Any, value: Any) -> bytes:
    """A data set upload's body: one JSON value per line (whatever the generator made)."""
    values = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(v).encode() + b"\n" for v in values)


def fuzz_operation(operation: Any, sent: list[str]) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        for headers in (AUTH, {}):
            response = case.call(headers=headers, timeout=60)
            sent.append(f"{case.method} {case.path} -> {response.status_code}")
            case.validate_response(response, checks=CHECKS)

    run()


def test_no_generated_request_gets_a_server_error(fs_stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{fs_stack.url}/openapi.json")
    results: list[Any] = list(schema.get_all_operations())
    operations = [result.ok() for result in results]  # .ok() raises on an invalid operation
    assert len(operations) >= 15  # the whole API, not a stub of it
    sent: list[str] = []
    for operation in operations:
        fuzz_operation(operation, sent)
    assert len(sent) >= 2 * len(operations)
    statuses = sorted({line.rsplit(" ", 1)[-1] for line in sent})
    print(f"fuzzed {len(operations)} operations with {len(sent)} requests; statuses {statuses}")
    assert not [line for line in sent if line.endswith(tuple(f"-> 5{d}" for d in "0123456789"))]
