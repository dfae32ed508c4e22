"""POST /v1/adapters {"source": ...}: import by reference from a loopback HTTP origin (on
the allow-list) and from the suite's SeaweedFS, validated exactly like an upload; and the
refusals of the SSRF guard, each with its code, before any byte reaches a disallowed host."""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from lorafold.servers.seaweedfs import SeaweedFS
from lorafold.settings import MIB, Settings
from lorafold.storage.s3 import S3Storage
from tests import adapter_cases
from tests.e2e.stack import assert_problem
from tests.integration.storage.conftest import seaweedfs  # noqa: F401  (the suite's S3 server)
from tests.loopback_http import Origin, Route

LIMIT = 4 * MIB
TIMEOUT_S = 2.0
BUCKET = "import-src"


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin("127.0.0.1")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def elsewhere() -> Iterator[Origin]:
    """A loopback origin NOT on the allow-list: it must never see a request."""
    server = Origin("127.0.0.2")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(settings: Settings, seaweedfs: SeaweedFS) -> Settings:  # noqa: F811
    options = seaweedfs.storage_options()
    return settings.model_copy(update={
        "max_upload_bytes": LIMIT, "import_allowed_hosts": ["127.0.0.1"],
        "import_public_https": False, "import_s3_buckets": [f"{BUCKET}/allowed/"],
        "import_timeout_s": TIMEOUT_S, "s3_endpoint_url": options["endpoint_url"],
        "s3_region": options["region"], "s3_access_key": options["access_key"],
        "s3_secret_key": SecretStr(options["secret_key"])})


def tar_gz(directory: Path, *, folder: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=f"{folder}{path.name}")
    return buffer.getvalue()


def files_of(tar: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {m.name: archive.extractfile(m).read()  # type: ignore[union-attr]
                for m in archive.getmembers()}


def post_import(api: TestClient, source: str, **fields: Any) -> Any:
    return api.post("/v1/adapters", json={"source": source, **fields},
                    headers=fields.pop("headers", {}))


SHOWN = ("base_model", "r", "alpha", "target_modules", "module_count", "dtype", "size_bytes",
         "sha256", "source", "parents")


def test_http_import_is_stored_as_an_upload_of_the_same_archive(
        api: TestClient, origin: Origin, tmp_path: Path) -> None:
    archive = tar_gz(adapter_cases.good_adapter(tmp_path / "good"), folder="support-v3/")
    origin.routes["/models/support-v3.tar.gz"] = Route(body=archive)
    imported = post_import(api, origin.url("/models/support-v3.tar.gz?sig=secret"),
                           metadata={"team": "support"})
    assert imported.status_code == 201, imported.text
    uploaded = api.post("/v1/adapters", data={"name": "u"},
                        files=[("archive", ("a.tar.gz", archive, "application/octet-stream"))])
    view, reference = imported.json(), uploaded.json()
    assert {k: view[k] for k in SHOWN} == {k: reference[k] for k in SHOWN}
    assert view["source"] == "upload" and view["name"] == "support-v3"
    assert view["metadata"] == {"team": "support"}
    stored = [files_of(api.get(f"/v1/adapters/{v['id']}/download").content)
              for v in (view, reference)]
    assert stored[0] == stored[1] and set(stored[0]) == {"adapter_config.json",
                                                          "adapter_model.safetensors"}
    assert list(api.app.state.context.spool_dir.iterdir()) == []  # type: ignore[attr-defined]


def test_idempotency_key_replays_without_fetching_again(api: TestClient, origin: Origin,
                                                        tmp_path: Path) -> None:
    origin.routes["/a.tar.gz"] = Route(body=tar_gz(adapter_cases.good_adapter(tmp_path / "g")))
    key = {"Idempotency-Key": "import-1"}
    first = api.post("/v1/adapters", json={"source": origin.url("/a.tar.gz")}, headers=key)
    again = api.post("/v1/adapters", json={"source": origin.url("/a.tar.gz")}, headers=key)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"] and origin.hits["/a.tar.gz"] == 1
    other = api.post("/v1/adapters", json={"source": origin.url("/a.tar.gz"), "name": "x"},
                     headers=key)
    assert_problem(other, 409, "idempotency_key_reused")
    assert origin.hits["/a.tar.gz"] == 1 and len(api.get("/v1/adapters").json()["data"]) == 1


def test_redirects_are_followed_only_to_allowed_hosts(api: TestClient, origin: Origin,
                                                      elsewhere: Origin, tmp_path: Path) -> None:
    origin.routes["/final.tar.gz"] = Route(body=tar_gz(adapter_cases.good_adapter(tmp_path)))
    origin.routes["/hop"] = Route(302, headers={"Location": "/final.tar.gz"})
    assert post_import(api, origin.url("/hop")).status_code == 201
    assert origin.hits["/final.tar.gz"] == 1

    elsewhere.routes["/x.tar.gz"] = Route(body=b"never served")
    origin.routes["/away"] = Route(307, headers={"Location": elsewhere.url("/x.tar.gz")})
    body = assert_problem(post_import(api, origin.url("/away")), 422, "source_not_allowed")
    assert "redirect" in body["detail"] and "127.0.0.2" in body["detail"]
    origin.routes["/to-file"] = Route(302, headers={"Location": "file:///etc/passwd"})
    assert_problem(post_import(api, origin.url("/to-file")), 422, "source_scheme_unsupported")
    origin.routes["/loop"] = Route(302, headers={"Location": "/loop"})
    assert_problem(post_import(api, origin.url("/loop")), 422, "source_fetch_failed")
    assert origin.hits["/loop"] == 6  # the first request and five redirects, no more
    assert sum(elsewhere.hits.values()) == 0


def test_hosts_and_addresses_off_the_allow_list_are_never_contacted(
        api: TestClient, elsewhere: Origin) -> None:
    elsewhere.routes["/a.zip"] = Route(body=b"never served")
    for url in (elsewhere.url("/a.zip"),                          # http, not listed
                elsewhere.url("/a.zip").replace("http:", "https:"),  # loopback, not listed
                "https://[::1]:1/a.zip", "https://169.254.169.254/latest/meta-data",
                "https://10.1.2.3/a.zip"):
        body = assert_problem(post_import(api, url), 422, "source_not_allowed")
        assert "import_allowed_hosts" in body["detail"], body
    assert sum(elsewhere.hits.values()) == 0


@pytest.mark.parametrize(("source", "code"), [
    ("ftp://127.0.0.1/a.zip", "source_scheme_unsupported"),
    ("file:///etc/passwd", "source_scheme_unsupported"),
    ("/etc/passwd", "source_scheme_unsupported"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "source_scheme_unsupported"),
    ("https://", "invalid_source"),
    ("https://user:pw@127.0.0.1/a.zip", "invalid_source"),
    ("https://127.0.0.1:99999/a.zip", "invalid_source"),
    ("https://exämple.com/a.zip", "invalid_source"),
    ("hf://just-a-name", "invalid_source"),
    ("hf://org/name@../../etc", "invalid_source"),
    ("hf://org/name@v1.0", "source_hub_disabled"),
    ("s3://other-bucket/a.tar.gz", "source_not_allowed"),
    (f"s3://{BUCKET}/elsewhere/a.tar.gz", "source_not_allowed"),
    (f"s3://{BUCKET}/allowed/../x", "invalid_source"),
])
def test_bad_sources_are_refused_with_their_code(api: TestClient, source: str,
                                                 code: str) -> None:
    assert_problem(post_import(api, source), 422, code)


def test_bad_bodies_are_request_validation_errors(api: TestClient) -> None:
    for body in (b"{", b"[]", b'{"source": 3}', b'{"source": "https://h/a", "extra": 1}',
                 b'{"name": "no source"}'):
        assert_problem(api.post("/v1/adapters", content=body,
                                headers={"Content-Type": "application/json"}),
                       422, "request_validation_failed")
    assert_problem(api.post("/v1/adapters", content=b"{" + b" " * (70 * 1024) + b"}",
                            headers={"Content-Type": "application/json"}),
                   413, "payload_too_large")


def test_size_limit_while_streaming(api: TestClient, origin: Origin) -> None:
    origin.routes["/declared.tar.gz"] = Route(body=bytes(LIMIT + 1))
    body = assert_problem(post_import(api, origin.url("/declared.tar.gz")), 413,
                          "source_too_large")
    assert str(LIMIT) in body["detail"]

    def endless(out: BinaryIO) -> None:  # no Content-Length: counted as it streams
        for _ in range(2 * LIMIT // MIB):
            out.write(bytes(MIB))

    origin.routes["/endless"] = Route(body=endless)
    assert_problem(post_import(api, origin.url("/endless")), 413, "source_too_large")


def test_a_slow_source_times_out(api: TestClient, origin: Origin) -> None:
    def dribble(out: BinaryIO) -> None:
        for _ in range(int(4 * TIMEOUT_S / 0.2)):
            out.write(b"\x1f")
            out.flush()
            time.sleep(0.2)

    origin.routes["/slow"] = Route(body=dribble)
    started = time.monotonic()
    assert_problem(post_import(api, origin.url("/slow")), 422, "source_timeout")
    assert time.monotonic() - started < TIMEOUT_S + 1.5


def test_fetch_failures(api: TestClient, origin: Origin) -> None:
    origin.routes["/gone"] = Route(404, b"not here")
    body = assert_problem(post_import(api, origin.url("/gone")), 422, "source_fetch_failed")
    assert "404" in body["detail"]
    closed = Origin("127.0.0.1")
    closed.stop()  # nothing listens on its port now
    assert_problem(post_import(api, closed.url("/a.zip")), 422, "source_fetch_failed")


CASES = ["nan_values", "pickle_bin", "truncated", "dora", "archive_escape", "missing_config"]


@pytest.mark.parametrize("case", CASES)
def test_refusals_and_codes_are_those_of_an_upload(api: TestClient, origin: Origin,
                                                   tmp_path: Path, case: str) -> None:
    made = getattr(adapter_cases, case)(adapter_cases.good_adapter(tmp_path / "a"))
    archive = made.read_bytes() if made.is_file() else tar_gz(made)
    uploaded = api.post("/v1/adapters", data={"name": case},
                        files=[("archive", ("a.tar.gz", archive, "application/octet-stream"))])
    origin.routes["/case"] = Route(body=archive)
    imported = post_import(api, origin.url("/case"))
    assert uploaded.status_code >= 400, uploaded.text
    assert (imported.status_code, imported.json()["code"]) == \
        (uploaded.status_code, uploaded.json()["code"])
    assert api.get("/v1/adapters").json()["count"] == 0
    origin.routes["/noise"] = Route(body=b"not an archive at all")
    assert_problem(post_import(api, origin.url("/noise")), 422, "invalid_archive")


def test_s3_archive_and_directory(api: TestClient, seaweedfs: SeaweedFS,  # noqa: F811
                                  tmp_path: Path) -> None:
    good = adapter_cases.good_adapter(tmp_path / "good")
    source = S3Storage(BUCKET, create_bucket=True, **seaweedfs.storage_options())
    source.put_bytes("allowed/billing.tar.gz", tar_gz(good))
    for path in good.iterdir():
        source.put_bytes(f"allowed/dir/{path.name}", path.read_bytes())
    archive = post_import(api, f"s3://{BUCKET}/allowed/billing.tar.gz")
    directory = post_import(api, f"s3://{BUCKET}/allowed/dir/", name="from-dir")
    assert archive.status_code == directory.status_code == 201, archive.text + directory.text
    assert archive.json()["name"] == "billing" and directory.json()["name"] == "from-dir"
    assert archive.json()["sha256"] == directory.json()["sha256"]
    body = assert_problem(post_import(api, f"s3://{BUCKET}/allowed/missing.tar.gz"), 422,
                          "source_fetch_failed")
    assert "end the URL with /" in body["detail"]
    assert_problem(post_import(api, f"s3://{BUCKET}/allowed/empty/"), 422,
                   "source_fetch_failed")


def test_untrusted_https_certificate_is_a_fetch_failure(api: TestClient,
                                                        tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = __import__("ssl").create_default_context(
        __import__("ssl").Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    origin = Origin("127.0.0.1", ssl_context=server_context)
    try:
        origin.routes["/a.tar.gz"] = Route(body=tar_gz(adapter_cases.good_adapter(tmp_path)))
        body = assert_problem(post_import(api, origin.url("/a.tar.gz")), 422,
                              "source_fetch_failed")
        assert "CERTIFICATE" in body["detail"].upper()
    finally:
        origin.stop()


def test_nothing_is_left_in_the_spool(api: TestClient, origin: Origin, tmp_path: Path) -> None:
    origin.routes["/ok.tar.gz"] = Route(body=tar_gz(adapter_cases.good_adapter(tmp_path)))
    origin.routes["/big"] = Route(body=bytes(LIMIT + 1), length=False)
    post_import(api, origin.url("/ok.tar.gz"))
    post_import(api, origin.url("/big"))
    spool: Path = api.app.state.context.spool_dir  # type: ignore[attr-defined]
    assert list(spool.iterdir()) == []
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_imports_in_flight_are_bounded_per_api_process(api: TestClient, origin: Origin,
                                                       tmp_path: Path) -> None:
    from lorafold.service import imports

    origin.routes["/a.tar.gz"] = Route(body=tar_gz(adapter_cases.good_adapter(tmp_path)))
    held = 0
    try:
        while imports._import_slots.acquire(blocking=False):  # as if 8 were in flight
            held += 1
        assert held == imports.MAX_CONCURRENT_IMPORTS
        busy = post_import(api, origin.url("/a.tar.gz"))
        assert_problem(busy, 429, "imports_busy")
        assert busy.headers["retry-after"] and origin.hits["/a.tar.gz"] == 0
    finally:
        for _ in range(held):
            imports._import_slots.release()
    assert post_import(api, origin.url("/a.tar.gz")).status_code == 201
