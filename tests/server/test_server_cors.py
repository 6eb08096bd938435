"""CORS for browser clients: off unless --allowed-origins names them; a preflight needs no API
key, the request itself still does."""

from __future__ import annotations

import argparse

import httpx
import pytest

from engine.server.cli import add_serve, cors_options
from hal.errors import HalError
from tests.server.conftest import API_KEY, TIMEOUT_S, make_engine, start_server

ORIGIN = "http://localhost:3000"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_flags() -> None:
    assert cors_options(_args()) is None
    assert cors_options(_args("--allowed-origins", f'["{ORIGIN}"]', "--allow-credentials")) == {
        "allow_origins": [ORIGIN], "allow_methods": ["*"], "allow_headers": ["*"],
        "allow_credentials": True,
    }  # fmt: skip
    with pytest.raises(HalError, match="--allow-credentials needs --allowed-origins"):
        cors_options(_args("--allow-credentials"))
    with pytest.raises(SystemExit):
        _args("--allowed-origins", ORIGIN)  # not JSON


@pytest.mark.parametrize("origins", [None, [ORIGIN]])
def test_preflight_and_request(tiny_model, origins) -> None:
    cors = None if origins is None else cors_options(_args("--allowed-origins", f'["{ORIGIN}"]'))
    handle = start_server(make_engine(tiny_model), cors=cors)
    try:
        with httpx.Client(base_url=handle.base_url, timeout=TIMEOUT_S) as http:
            pre = http.options("/v1/models", headers={
                "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            })  # fmt: skip
            keyed = {"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"}
            ok = http.get("/v1/models", headers=keyed)
            denied = http.get("/v1/models", headers={"Origin": ORIGIN})
            other = http.get("/v1/models", headers={**keyed, "Origin": "http://evil.example"})
        assert ok.status_code == 200 and denied.status_code == 401
        if origins is None:
            assert "access-control-allow-origin" not in ok.headers
            assert pre.status_code in (401, 405)
        else:
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == ORIGIN
            assert ok.headers["access-control-allow-origin"] == ORIGIN
            assert "access-control-allow-origin" not in other.headers
    finally:
        handle.stop()
