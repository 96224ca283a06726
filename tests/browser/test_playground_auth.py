"""The playground on a server started with --api-key: the page itself is open, the API is
not; the page asks for the key and shows the API's 401 as it came."""
from __future__ import annotations

import httpx
import pytest

from textmill.config import ServerConfig

from tests.integration.server import running_server

from .playground import MODEL, error_text

KEY = "playground-test-key"


@pytest.fixture(scope="module")
def base_url():
    with running_server(server=ServerConfig(api_keys=(KEY,))) as url:
        yield url


def test_page_and_assets_are_served_without_a_key(base_url):
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="playground/app.js">' in page.text
    for path, kind in [("app.js", "text/javascript"), ("render.js", "text/javascript"), ("style.css", "text/css")]:
        asset = httpx.get(f"{base_url}/playground/{path}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    assert httpx.get(f"{base_url}/playground/../auth.py").status_code in (401, 404)
    assert httpx.get(f"{base_url}/v1/models").status_code == 401


def test_a_wrong_key_shows_the_401_and_the_right_one_loads_the_models(tab, base_url, screenshots):
    page = tab.page
    page.goto(base_url)
    page.wait_for_selector("#auth:not([hidden])")
    api = httpx.get(f"{base_url}/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    page.wait_for_function("document.querySelector('#error .code')?.textContent === 'code: invalid_api_key'")
    shown = error_text(page)
    assert shown.startswith("401 invalid_request_error") and api["message"] in shown and "param: null" in shown
    assert page.evaluate("sessionStorage.getItem('textmill.apiKey')") == "wrong"
    page.screenshot(path=screenshots / "wrong-key.png")

    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#model") == MODEL
    assert page.is_hidden("#auth") and page.is_hidden("#error")
