"""A small typed Python client for the lorafold REST API (httpx).

    with LorafoldClient("http://127.0.0.1:8000", api_key) as client:
        a = client.upload(Path("adapters/support"))          # a dir, .zip or .tar.gz
        b = client.upload(Path("billing.zip"), name="billing")
        job = client.merge([a["id"], b["id"]], method="ctm", rule="ties", rank=16)
        job = client.wait(job["id"], on_progress=print)
        client.download(job["result"]["adapter_id"], Path("merged"), extract=True)
        client.download(job["result"]["adapter_id"], Path("merged.zip"), archive_format="zip")
        c = client.import_adapter("s3://models/support-v3.tar.gz", name="support")

        forget = client.upload_dataset(Path("tenant-42.jsonl"))
        job = client.unlearn("npo", a["id"], forget_dataset=forget["id"])
        job = client.unlearn("remove", merged_id, remove=[b["id"]])

Every error answer (problem+json) raises `ApiError` with the server's stable `code`.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import httpx

from lorafold.errors import LorafoldError

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# Sent from an adapter directory when present (a pickled .bin only to be refused by name).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# The service fetches and validates before it answers (bounded by its own fetch timeout).
IMPORT_TIMEOUT_S = 3600.0
ProgressCallback = Callable[[dict[str, Any]], None]


class ApiError(LorafoldError):
    """An error answer from the API; `code` is the server's, `status` the HTTP status."""

    def __init__(self, message: str, *, code: str, status: int) -> None:
        super().__init__(message, code=code)
        self.status = status


def _raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    code = str(body.get("code") or f"http_{response.status_code}")
    detail = str(body.get("detail") or response.reason_phrase)
    raise ApiError(detail, code=code, status=response.status_code)


class LorafoldClient:
    def __init__(self, url: str, api_key: str | None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10.0),
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LorafoldClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ApiError(f"cannot reach {self._http.base_url}: {e}", code="unreachable",
                           status=0) from e
        _raise_for_problem(response)
        return response

    @staticmethod
    def _idempotency(key: str | None) -> dict[str, str]:
        return {"Idempotency-Key": key} if key else {}

    # -- adapters -------------------------------------------------------------------------

    def upload(self, path: Path, *, name: str | None = None,
               metadata: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Upload an adapter directory (its two PEFT files) or an archive; streamed."""
        path = Path(path)
        if not path.exists():
            raise LorafoldError(f"{path}: no such file or directory", code="path_not_found")
        data = {"name": name or path.name.split(".")[0]}
        if metadata is not None:
            data["metadata"] = json.dumps(metadata)
        with contextlib.ExitStack() as stack:
            files: list[tuple[str, tuple[str, BinaryIO, str]]] = []
            if path.is_dir():
                present = [f for f in PEFT_FILES if (path / f).is_file()]
                if not present:
                    raise LorafoldError(f"{path} holds no adapter_config.json or "
                                        "adapter_model.safetensors", code="path_not_found")
                for filename in present:
                    handle = stack.enter_context((path / filename).open("rb"))
                    files.append(("files", (filename, handle, "application/octet-stream")))
            else:
                handle = stack.enter_context(path.open("rb"))
                files.append(("archive", (path.name, handle, "application/octet-stream")))
            response = self._request("POST", "/v1/adapters", data=data, files=files,
                                     headers=self._idempotency(idempotency_key))
        result: dict[str, Any] = response.json()
        return result

    def list_adapters(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", "/v1/adapters").json()["data"]
        return data

    def get_adapter(self, adapter_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/adapters/{adapter_id}").json()
        return result

    def delete_adapter(self, adapter_id: str) -> None:
        self._request("DELETE", f"/v1/adapters/{adapter_id}")

    def download(self, adapter_id: str, dest: Path, *, extract: bool = False,
                 archive_format: str = "tar") -> Path:
        """Save the adapter as a .tar, .tar.gz or .zip (`archive_format`) to `dest`, or
        unpack it into the directory `dest` when `extract`."""
        dest = Path(dest)
        archive = dest.with_name(f"{dest.name}.{archive_format}") if extract else dest
        archive.parent.mkdir(parents=True, exist_ok=True)
        url = f"/v1/adapters/{adapter_id}/download"
        # httpx drops our Authorization header when a redirect leaves our origin (S3).
        with self._http.stream("GET", url, params={"format": archive_format},
                               follow_redirects=True) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_problem(response)
            with archive.open("wb") as f:
                for chunk in response.iter_bytes(1024 * 1024):
                    f.write(chunk)
        if not extract:
            return archive
        dest.mkdir(parents=True, exist_ok=True)
        if archive_format == "zip":
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(dest)  # zipfile drops absolute and '..' parts of names
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
        archive.unlink()
        return dest

    def import_adapter(self, source: str, *, name: str | None = None,
                       metadata: dict[str, Any] | None = None,
                       idempotency_key: str | None = None) -> dict[str, Any]:
        """Have the service fetch an adapter by reference (https://..., s3://bucket/key,
        hf://org/name@rev) and store it as an upload; fields as in POST /v1/adapters."""
        body: dict[str, Any] = {"source": source}
        if name is not None:
            body["name"] = name
        if metadata is not None:
            body["metadata"] = metadata
        result: dict[str, Any] = self._request(
            "POST", "/v1/adapters", json=body, headers=self._idempotency(idempotency_key),
            timeout=httpx.Timeout(IMPORT_TIMEOUT_S, connect=10.0)).json()
        return result

    # -- data sets ----------------------------------------------------------------------

    def upload_dataset(self, path: Path, *, name: str | None = None,
                       idempotency_key: str | None = None) -> dict[str, Any]:
        """Upload a JSONL data set ({"text"} or {"prompt", "completion"} per line); streamed."""
        path = Path(path)
        if not path.is_file():
            raise LorafoldError(f"{path}: no such file", code="path_not_found")
        with path.open("rb") as handle:
            response = self._request(
                "POST", "/v1/datasets", params={"name": name or path.stem}, content=handle,
                headers={"Content-Type": "application/jsonl",
                         **self._idempotency(idempotency_key)})
        result: dict[str, Any] = response.json()
        return result

    def list_datasets(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", "/v1/datasets").json()["data"]
        return data

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/datasets/{dataset_id}").json()
        return result

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # -- merges, unlearning and jobs ------------------------------------------------------

    def merge(self, adapter_ids: Sequence[str], *, weights: Sequence[float] | None = None,
              method: str | None = None, rule: str | None = None,
              rank: int | str | None = None, min_energy: float | None = None,
              density: float | None = None, drop: float | None = None, scale: float = 1.0,
              seed: int = 0, beta: float | None = None, subspace: str | None = None,
              force: bool = False, dtype: str | None = None, target: str | None = None,
              base_model_name: str | None = None, name: str | None = None,
              webhook_url: str | None = None, tune: Mapping[str, Any] | None = None,
              idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a merge job; fields as in POST /v1/merges. Options left at None are not
        sent, so the service's defaults apply (method and rule: `DEFAULT_METHOD` and
        `DEFAULT_RULE` of lorafold.merge.plan; beta, subspace, drop: the core's). `tune`
        makes it a tuned merge: {"datasets": [ids], "base_model", "params", "budget",
        "time_limit_s"} (docs/tuning.md)."""
        weights = list(weights) if weights is not None else [1.0] * len(adapter_ids)
        options = {"method": method, "rule": rule, "rank": rank, "min_energy": min_energy,
                   "density": density,
                   "drop": drop, "beta": beta, "subspace": subspace, "dtype": dtype,
                   "target": target, "base_model_name": base_model_name, "name": name,
                   "webhook_url": webhook_url,
                   "tune": None if tune is None else {k: v for k, v in tune.items()
                                                      if v is not None}}
        body: dict[str, Any] = {
            "adapters": [{"id": i, "weight": w} for i, w in zip(adapter_ids, weights,
                                                                  strict=True)],
            "scale": scale, "seed": seed, "force": force,
            **{key: value for key, value in options.items() if value is not None}}
        result: dict[str, Any] = self._request(
            "POST", "/v1/merges", json=body, headers=self._idempotency(idempotency_key)).json()
        return result

    def plan(self, adapter_ids: Sequence[str], *, rank: int | str = "auto",
             min_energy: float | None = None, max_rank: int | None = None,
             max_groups: int | None = None, min_similarity: float | None = None,
             force: bool = False, webhook_url: str | None = None,
             idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a consolidation plan job; fields as in POST /v1/plans (its result's `plan`
        holds the groups, each with its members and rank)."""
        options = {"min_energy": min_energy, "max_rank": max_rank, "max_groups": max_groups,
                   "min_similarity": min_similarity, "webhook_url": webhook_url}
        body: dict[str, Any] = {"adapters": list(adapter_ids), "rank": rank, "force": force,
                                **{k: v for k, v in options.items() if v is not None}}
        result: dict[str, Any] = self._request(
            "POST", "/v1/plans", json=body, headers=self._idempotency(idempotency_key)).json()
        return result

    def unlearn(self, method: str, adapter_id: str, *, name: str | None = None,
                idempotency_key: str | None = None, **fields: Any) -> dict[str, Any]:
        """Submit unlearning; `fields` as in POST /v1/unlearning (remove, forget_adapter,
        strength, rank, base_model, forget_dataset, retain_dataset, holdout_dataset,
        hyperparams). Unset (None) fields are not sent."""
        body = {"method": method, "adapter": adapter_id, "name": name,
                **{key: value for key, value in fields.items() if value is not None}}
        result: dict[str, Any] = self._request(
            "POST", "/v1/unlearning", json=body,
            headers=self._idempotency(idempotency_key)).json()
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/jobs/{job_id}").json()
        return result

    def list_jobs(self, *, status: str | None = None, job_type: str | None = None,
                  limit: int = 50) -> Iterator[dict[str, Any]]:
        """The tenant's jobs, newest first, following the pages."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if job_type:
            params["type"] = job_type
        while True:
            page = self._request("GET", "/v1/jobs", params=params).json()
            yield from page["data"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def events(self, job_id: str, *, since: int = 0) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request(
            "GET", f"/v1/jobs/{job_id}/events", params={"since": since}).json()["data"]
        return data

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"/v1/jobs/{job_id}/cancel").json()
        return result

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 0.5,
             on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled; returns the final job."""
        deadline = time.monotonic() + timeout
        delay = min(0.05, poll_s)
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() >= deadline:
                raise ApiError(f"job {job_id} still {job['status']} after {timeout:.0f}s",
                               code="wait_timeout", status=0)
            time.sleep(delay)
            delay = min(delay * 2, poll_s)
