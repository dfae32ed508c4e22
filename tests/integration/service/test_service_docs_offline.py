"""/docs and /redoc work air-gapped: their pages name only the service's own paths, and
those assets answer 200 (they come from the fastapi-offline package, not a CDN)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

# src/href/spec-url values, and url: '...' strings in the pages' inline scripts
REFERENCE = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def references(html: str) -> list[str]:
    return [a or b for a, b in REFERENCE.findall(html)]


def test_docs_pages_reference_only_the_service(api: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        response = api.get(page)
        assert response.status_code == 200, page
        html = response.text
        assert "http://" not in html and "https://" not in html, page  # no CDN, no web fonts
        refs = references(html)
        assert refs, page
        for ref in refs:
            assert ref.startswith("/"), (page, ref)
            assert api.get(ref).status_code == 200, (page, ref)
    # the scripts are the real bundles, not placeholders
    assert len(api.get("/docs-assets/swagger-ui-bundle.js").content) > 500_000
    assert len(api.get("/docs-assets/redoc.standalone.js").content) > 500_000
