"""The dashboard page: served at / without a key, holds no data, and ships a CSP that allows
only its own same-origin script and style (no inline script), plots as blob: images."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.api.helpers import assert_envelope


def _csp(response_headers: object) -> dict[str, str]:
    header = response_headers["content-security-policy"]  # type: ignore[index]
    return {
        part.split()[0]: " ".join(part.split()[1:]) for part in header.split(";") if part.strip()
    }


def test_page_is_served_without_a_key_with_a_strict_csp(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = _csp(response.headers)
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'"  # no 'unsafe-inline', no other origin
    assert csp["style-src"] == "'self'"
    assert csp["img-src"] == "'self' blob:"
    assert csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_page_has_no_inline_script_or_style_and_sends_nothing_in_urls(client: TestClient) -> None:
    html = client.get("/").text
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts, "the page loads its script"
    for attributes, body in scripts:
        assert 'src="/dashboard/' in attributes and body.strip() == ""
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"
    # Form fields without a name are never serialised into a URL, even if the script failed.
    assert not re.search(r"<input[^>]*\bname=", html)


def test_assets_are_served_and_unknown_assets_are_404(client: TestClient) -> None:
    script = client.get("/dashboard/dashboard.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    # Server text reaches the page as text only: no HTML sinks, no string evaluation.
    assert not re.search(
        r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|\beval\(|new Function",
        script.text,
    )
    assert "sessionStorage" in script.text
    style = client.get("/dashboard/dashboard.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    for path in ("/dashboard/index.html", "/dashboard/..%2Fmain.py", "/dashboard/nope.js"):
        assert_envelope(client.get(path), 404)


def test_the_page_is_not_a_way_around_the_key(client: TestClient) -> None:
    # Loading the page grants nothing: the data it shows still needs the key.
    client.get("/")
    assert_envelope(client.get("/v1/datasets"), 401, code="missing_api_key")
    assert "/" not in client.get("/openapi.json").json()["paths"]
