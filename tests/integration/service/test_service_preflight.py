"""GET /v1/adapters/{id}/preflight?target=T: the serving-engine verdict of a stored adapter."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from lorafold.synthetic import write_random_adapter

SHAPES = {f"model.layers.{i}.self_attn.{p}": (16, 16) for i in range(2)
          for p in ("q_proj", "v_proj")}


def upload(api: TestClient, directory: Path) -> str:
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream"))
             for p in sorted(directory.iterdir())]
    response = api.post("/v1/adapters", files=files, data={"name": directory.name})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_preflight_over_http(api: TestClient, tmp_path: Path) -> None:
    good = upload(api, write_random_adapter(tmp_path / "good", SHAPES, rank=8,
                                            base_model="org/base"))
    gappy = {k: v for k, v in SHAPES.items() if k != "model.layers.1.self_attn.v_proj"}
    bad = upload(api, write_random_adapter(tmp_path / "gappy", gappy, rank=8,
                                           base_model="org/base"))
    verdict = api.get(f"/v1/adapters/{good}/preflight", params={"target": "lorax"}).json()
    assert verdict["ok"] is True and verdict["adapter_id"] == good
    assert {c["rule"] for c in verdict["checks"]} >= {"lorax_keys", "lorax_coverage"}
    verdict = api.get(f"/v1/adapters/{bad}/preflight", params={"target": "lorax"}).json()
    failed = [c for c in verdict["checks"] if not c["ok"]]
    assert verdict["ok"] is False and [c["rule"] for c in failed] == ["lorax_coverage"]
    assert failed[0]["fix"]
    assert api.get(f"/v1/adapters/{bad}/preflight",
                   params={"target": "vllm"}).json()["ok"] is True
    for params, status in (({"target": "triton"}, 422), ({}, 422)):
        assert api.get(f"/v1/adapters/{good}/preflight", params=params).status_code == status
    assert api.get("/v1/adapters/ad_missing/preflight",
                   params={"target": "vllm"}).status_code == 404
    spool = api.app.state.context.spool_dir  # type: ignore[attr-defined]
    assert not any(p.name.startswith("preflight-") for p in spool.iterdir())  # cleaned up
