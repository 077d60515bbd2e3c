"""Reading kubeconfig files and the in-cluster service account (dynvol_kube.kubeconfig):
which files the client's own transport takes, and errors that name the field.

The requests themselves are tested against the real apiserver in
tests/integration/kube/test_transport.py.
"""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynvol_kube import kubeconfig as kc


def _config(cluster: dict[str, Any], user: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [
            {"name": "one", "context": {"cluster": "c", "user": "u", "namespace": "team"}},
            {"name": "two", "context": {"cluster": "c", "user": "u"}},
        ],
        "current-context": "one",
        **extra,
    }


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    return path


def test_a_token_over_plain_http(tmp_path: Path) -> None:
    path = _write(tmp_path, _config({"server": "http://127.0.0.1:8080/"}, {"token": "abc"}))
    endpoint = kc.from_kubeconfig_file(path)
    assert endpoint is not None
    assert endpoint.server == "http://127.0.0.1:8080"
    assert endpoint.ssl_context is None
    assert endpoint.namespace == "team"
    assert endpoint.auth_headers() == {"Authorization": "Bearer abc"}


def test_the_context_given_wins_over_the_current_one(tmp_path: Path) -> None:
    path = _write(tmp_path, _config({"server": "http://127.0.0.1:1"}, {}))
    endpoint = kc.from_kubeconfig_file(path, context="two")
    assert endpoint is not None
    assert endpoint.namespace is None
    assert endpoint.auth_headers() == {}


def test_basic_auth(tmp_path: Path) -> None:
    user = {"username": "ann", "password": "s3cret"}
    endpoint = kc.from_kubeconfig_file(_write(tmp_path, _config({"server": "http://h:1"}, user)))
    assert endpoint is not None
    expected = base64.b64encode(b"ann:s3cret").decode()
    assert endpoint.auth_headers() == {"Authorization": f"Basic {expected}"}


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("user", {"exec": {"command": "aws"}}),
        ("user", {"auth-provider": {"name": "oidc"}}),
        ("user", {"as": "someone-else"}),
        ("cluster", {"proxy-url": "http://proxy:3128"}),
    ],
)
def test_what_needs_the_librarys_loader_is_handed_to_it(
    tmp_path: Path, section: str, field: dict[str, Any]
) -> None:
    cluster: dict[str, Any] = {"server": "https://127.0.0.1:6443"}
    user: dict[str, Any] = {"token": "t"}
    (cluster if section == "cluster" else user).update(field)
    assert kc.from_kubeconfig_file(_write(tmp_path, _config(cluster, user))) is None


def test_a_token_file_is_relative_to_the_kubeconfig_and_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("first\n")
    path = _write(tmp_path, _config({"server": "http://h:1"}, {"tokenFile": "token"}))
    endpoint = kc.from_kubeconfig_file(path)
    assert endpoint is not None
    assert endpoint.auth_headers() == {"Authorization": "Bearer first"}
    (tmp_path / "token").write_text("second\n")
    assert endpoint.auth_headers() == {"Authorization": "Bearer first"}  # within a minute
    monkeypatch.setattr(kc, "TOKEN_REREAD_SECONDS", 0.0)
    assert endpoint.auth_headers() == {"Authorization": "Bearer second"}
    (tmp_path / "token").unlink()
    # A failed read keeps the last token (kubelet swaps the file; the server judges it).
    assert endpoint.auth_headers() == {"Authorization": "Bearer second"}


def test_a_missing_token_file_is_an_error_at_the_first_request(tmp_path: Path) -> None:
    source = kc.TokenSource(path=tmp_path / "absent")
    with pytest.raises(kc.KubeconfigError, match="cannot read the token file"):
        source.current()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"contexts": []}, "no context was given and current-context is not set"),
        ({"current-context": "x", "contexts": []}, "contexts has no entry named 'x'"),
        (
            {"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c"}}]},
            "clusters has no entry named 'c'",
        ),
        (
            {
                "current-context": "x",
                "contexts": [{"name": "x", "context": {"cluster": "c"}}],
                "clusters": [{"name": "c", "cluster": {"server": "ftp://h"}}],
            },
            "cluster 'c' has no http\\(s\\) server",
        ),
    ],
)
def test_errors_name_what_is_missing(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(kc.KubeconfigError, match=message):
        kc.from_kubeconfig_file(_write(tmp_path, config))


def test_bad_base64_names_the_field(tmp_path: Path) -> None:
    cluster = {"server": "https://h:1", "certificate-authority-data": "not base64!"}
    with pytest.raises(kc.KubeconfigError, match="certificate-authority-data is not base64"):
        kc.from_kubeconfig_file(_write(tmp_path, _config(cluster, {})))


def test_a_client_certificate_without_its_key(tmp_path: Path) -> None:
    user = {"client-certificate-data": base64.b64encode(b"-----BEGIN-----").decode()}
    with pytest.raises(kc.KubeconfigError, match="needs both the certificate and the key"):
        kc.from_kubeconfig_file(_write(tmp_path, _config({"server": "https://h:1"}, user)))


def test_a_file_that_is_not_a_kubeconfig(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("- just\n- a list\n")
    with pytest.raises(kc.KubeconfigError, match="not a kubeconfig"):
        kc.from_kubeconfig_file(path)
    with pytest.raises(kc.KubeconfigError, match="cannot read the kubeconfig"):
        kc.from_kubeconfig_file(tmp_path / "absent")


def test_insecure_skip_tls_verify(tmp_path: Path) -> None:
    cluster = {"server": "https://h:1", "insecure-skip-tls-verify": True, "tls-server-name": "n"}
    endpoint = kc.from_kubeconfig_file(_write(tmp_path, _config(cluster, {})))
    assert endpoint is not None
    assert endpoint.ssl_context is not None
    assert endpoint.ssl_context.verify_mode == ssl.CERT_NONE
    assert endpoint.server_hostname == "n"


def test_in_cluster_needs_the_service_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kc.KubeconfigError, match="KUBERNETES_SERVICE_HOST"):
        kc.in_cluster(tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(kc.KubeconfigError, match="no service account token"):
        kc.in_cluster(tmp_path)


@given(st.text(max_size=40))
def test_a_token_is_sent_only_if_a_header_can_carry_it(token: str) -> None:
    endpoint = kc.Endpoint(server="http://h:1", token=kc.TokenSource(token=token))
    if token and all(0x21 <= ord(ch) <= 0x7E for ch in token):
        assert endpoint.auth_headers() == {"Authorization": f"Bearer {token}"}
    elif not token:
        assert endpoint.auth_headers() == {}
    else:  # a newline would end the header and start another one
        with pytest.raises(kc.KubeconfigError, match="the token has a space"):
            endpoint.auth_headers()


def test_a_token_file_is_stripped_but_checked(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  abc.def\n")
    assert kc.TokenSource(path=tmp_path / "token").current() == "abc.def"
    (tmp_path / "token").write_text("abc\nX-Injected: yes\n")
    with pytest.raises(kc.KubeconfigError, match="has a space, a control"):
        kc.TokenSource(path=tmp_path / "token").current()
