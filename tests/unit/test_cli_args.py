"""cli.py's arguments: --request-timeout, built from ServerConfig's default."""
from __future__ import annotations

import pytest

from textmill.cli import build_parser
from textmill.config import ServerConfig


def serve(*args: str):
    return build_parser().parse_args(["serve", *args])


def test_request_timeout_defaults_to_no_limit():
    assert ServerConfig().request_timeout is None
    assert serve().request_timeout == ServerConfig().request_timeout


def test_request_timeout_takes_seconds():
    assert serve("--request-timeout", "2.5").request_timeout == 2.5


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "soon"])
def test_request_timeout_must_be_a_positive_number(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        serve("--request-timeout", bad)
    assert exc.value.code == 2
    assert "--request-timeout: must be a positive number of seconds" in capsys.readouterr().err


def test_request_timeout_reaches_the_server_config():
    from textmill.wiring import server_config_from_args

    assert server_config_from_args(serve("--request-timeout", "7"), environ={}).request_timeout == 7.0
