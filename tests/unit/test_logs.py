"""``--log-format json``: one JSON object per line, with the stable keys and nothing else."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from dynvol import logs
from dynvol.cli import _requested, build_parser


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_the_stable_keys(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    log = logging.getLogger("dynvol.dmp.agent")
    log.debug("not at INFO")
    log.info("mounted %s at %s", "ns/dvm", "/xvols/data")
    log.warning(
        "refusing", extra={"namespace": "ns", "object_name": "dvm", "node": "n1",
                           "reason": "UntrustedMount", "password": "hunter2"},
    )  # fmt: skip
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("reconciling failed")
    first, second, third = _lines(stream)
    assert list(first) == ["ts", "level", "logger", "msg"]
    assert first["level"] == "info"
    assert first["logger"] == "dynvol.dmp.agent"
    assert first["msg"] == "mounted ns/dvm at /xvols/data"
    assert str(first["ts"]).endswith("Z")
    assert "T" in str(first["ts"])
    assert list(second) == ["ts", "level", "logger", "msg", "namespace", "name", "node", "reason"]
    assert second["reason"] == "UntrustedMount"
    assert second["name"] == "dvm"
    assert "hunter2" not in stream.getvalue()  # other extras are not keys of the contract
    assert third["level"] == "error"
    assert "RuntimeError: boom" in str(third["exc"])


def test_a_message_with_newlines_and_quotes_stays_one_line(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("DEBUG", "json", stream=stream)
    logging.getLogger("x").info('line one\nline "two" ünïcode')
    (entry,) = _lines(stream)
    assert entry["msg"] == 'line one\nline "two" ünïcode'


def test_text_is_the_default(restore_logging: None) -> None:
    args = build_parser(("dmp",)).parse_args(
        ["dmp", "--name", "n", "--namespace", "s", "--xvols", "/x", "--secrets-dir", "/s"]
    )
    assert args.log_format == "text"
    assert args.metrics_address == "127.0.0.1:0"
    stream = io.StringIO()
    logs.configure(args.log_level, args.log_format, stream=stream)
    logging.getLogger("dynvol").info("hello")
    assert stream.getvalue().rstrip().endswith("INFO dynvol: hello")


def test_the_flag_value_is_not_taken_for_the_command() -> None:
    assert _requested(["--log-format", "json", "node", "--csi-only"]) == ("node",)
    assert _requested(["--log-format=json", "dmp"]) == ("dmp",)


def test_a_bad_format_or_address_is_refused_with_the_flag_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser(("node",)).parse_args(["--log-format", "xml", "node"])
    assert "--log-format" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser(("node",)).parse_args(
            ["node", "--endpoint", "unix:///x", "--node-id", "n", "--metrics-address", "9810"]
        )
    assert "--metrics-address '9810': use HOST:PORT" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--log-format"):
        logs.configure("INFO", "xml")
