"""Every adapter the core library refuses is refused over HTTP with the same code, and
nothing of it is stored or listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adapter_cases import CASES
from tests.e2e.stack import Stack, assert_problem, upload_path


def _stored_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} \
        if root.exists() else set()


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_upload_leaves_nothing(fs_stack: Stack, case: str, tmp_path: Path) -> None:
    build, code = CASES[case]
    source = build(tmp_path / "bad")
    assert fs_stack.storage_root is not None
    before = _stored_files(fs_stack.storage_root)
    with fs_stack.client() as client:
        listed = client.get("/v1/adapters").json()["count"]
        response = upload_path(client, source, f"bad-{case}")
        body = assert_problem(response, 422, code)
        assert body["detail"]
        assert client.get("/v1/adapters").json()["count"] == listed
    assert _stored_files(fs_stack.storage_root) == before
    assert not list((fs_stack.root / "spool").glob("upload-*"))
