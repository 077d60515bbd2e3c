"""The pure decisions about the webhook's serving certificate (dynvol_controllers.servingcert)."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_controllers.servingcert import (
    CertificatePolicy,
    Material,
    UnusableSecret,
    examine,
    needs_renewal,
    read_bundle,
    read_secret,
    renew,
    service_names,
)

NAMES = service_names("dynvol-webhook", "dynvol-system")
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
POLICY = CertificatePolicy()


@pytest.fixture(scope="module")
def fresh() -> Material:
    return renew(None, None, NAMES, NOW, POLICY)


def test_service_names() -> None:
    assert NAMES == (
        "dynvol-webhook.dynvol-system.svc",
        "dynvol-webhook.dynvol-system.svc.cluster.local",
    )


def test_new_material_is_valid_and_round_trips(fresh: Material) -> None:
    assert examine(fresh, NAMES, NOW, POLICY).ok
    again = read_secret(fresh.secret_data())
    assert again.cert == fresh.cert
    assert again.ca_cert == fresh.ca_cert
    assert again.bundle == (fresh.ca_cert,)
    san = fresh.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(NAMES)
    assert fresh.cert.not_valid_after_utc - fresh.cert.not_valid_before_utc == (
        POLICY.serving_lifetime + POLICY.backdate
    )


@settings(max_examples=200, deadline=None)
@given(
    lifetime=st.integers(min_value=2, max_value=10**9),
    offset=st.integers(min_value=-(10**9), max_value=2 * 10**9),
    fraction=st.floats(min_value=0.01, max_value=0.99),
)
def test_needs_renewal_is_the_window(lifetime: int, offset: int, fraction: float) -> None:
    start = NOW
    end = start + dt.timedelta(seconds=lifetime)
    at = start + dt.timedelta(seconds=offset)
    due = needs_renewal(start, end, at, fraction)
    if at < start or at >= end:
        assert due
    else:
        left = (end - at).total_seconds()
        assert due == (left < lifetime * fraction)


@settings(max_examples=50, deadline=None)
@given(days=st.integers(min_value=0, max_value=400))
def test_serving_renewed_once_a_third_is_left(fresh: Material, days: int) -> None:
    at = NOW + dt.timedelta(days=days)
    found = examine(fresh, NAMES, at, POLICY)
    left = fresh.cert.not_valid_after_utc - at
    lifetime = fresh.cert.not_valid_after_utc - fresh.cert.not_valid_before_utc
    assert bool(found.serving) == (left < lifetime / 3)
    assert not found.ca  # the ten-year CA is far from its window


def test_wrong_names_are_found(fresh: Material) -> None:
    found = examine(fresh, service_names("other", "dynvol-system"), NOW, POLICY)
    assert found.serving
    assert "not valid for other.dynvol-system.svc" in found.serving[0]
    renewed = renew(fresh, found, service_names("other", "dynvol-system"), NOW, POLICY)
    assert renewed.ca_cert == fresh.ca_cert
    assert renewed.cert != fresh.cert
    assert examine(renewed, service_names("other", "dynvol-system"), NOW, POLICY).ok


def test_key_mismatch_and_foreign_signer_are_found(fresh: Material) -> None:
    other = renew(None, None, NAMES, NOW, POLICY)
    mismatched = Material(
        cert=fresh.cert, key=other.key, ca_cert=fresh.ca_cert, ca_key=fresh.ca_key,
        bundle=fresh.bundle,
    )  # fmt: skip
    assert any(
        "tls.key: does not match" in r for r in examine(mismatched, NAMES, NOW, POLICY).serving
    )
    foreign = Material(
        cert=other.cert, key=other.key, ca_cert=fresh.ca_cert, ca_key=fresh.ca_key,
        bundle=fresh.bundle,
    )  # fmt: skip
    assert any("not signed by the CA" in r for r in examine(foreign, NAMES, NOW, POLICY).serving)
    wrong_ca_key = Material(
        cert=fresh.cert, key=fresh.key, ca_cert=fresh.ca_cert, ca_key=other.ca_key,
        bundle=fresh.bundle,
    )  # fmt: skip
    assert examine(wrong_ca_key, NAMES, NOW, POLICY).ca


def test_ca_rotation_keeps_the_old_ca_until_the_overlap_passed() -> None:
    policy = CertificatePolicy(
        ca_lifetime=dt.timedelta(days=30), serving_lifetime=dt.timedelta(days=5),
        ca_overlap=dt.timedelta(hours=1),
    )  # fmt: skip
    first = renew(None, None, NAMES, NOW, policy)
    later = NOW + dt.timedelta(days=21)  # less than a third of 30 days left
    found = examine(first, NAMES, later, policy)
    assert found.ca
    rotated = renew(first, found, NAMES, later, policy)
    assert rotated.ca_cert != first.ca_cert
    assert rotated.bundle == (rotated.ca_cert, first.ca_cert)
    assert rotated.cert.issuer == rotated.ca_cert.subject
    assert examine(rotated, NAMES, later + dt.timedelta(minutes=30), policy).ok
    pruning = examine(rotated, NAMES, later + dt.timedelta(hours=2), policy)
    assert pruning.prune
    assert not pruning.serving
    assert not pruning.ca
    pruned = renew(rotated, pruning, NAMES, later + dt.timedelta(hours=2), policy)
    assert pruned.bundle == (rotated.ca_cert,)
    assert pruned.cert == rotated.cert


def test_expired_ca_is_not_kept_in_the_bundle() -> None:
    policy = CertificatePolicy(
        ca_lifetime=dt.timedelta(days=30), serving_lifetime=dt.timedelta(days=5)
    )
    first = renew(None, None, NAMES, NOW, policy)
    much_later = NOW + dt.timedelta(days=60)
    rotated = renew(first, examine(first, NAMES, much_later, policy), NAMES, much_later, policy)
    assert rotated.bundle == (rotated.ca_cert,)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (None, "data"),
        ({}, "data.tls.crt: missing"),
        ({"tls.crt": "%%%"}, "data.tls.crt: not base64"),
        ({"tls.crt": base64.b64encode(b"hello").decode()}, "data.tls.crt: not PEM"),
    ],
)
def test_unusable_secrets_name_the_field(data: object, field: str) -> None:
    with pytest.raises(UnusableSecret, match=field):
        read_secret(data)  # type: ignore[arg-type]


def test_unusable_key_names_the_field(fresh: Material) -> None:
    data = fresh.secret_data()
    data["tls.key"] = base64.b64encode(b"-----BEGIN PRIVATE KEY-----\nAAAA\n").decode()
    with pytest.raises(UnusableSecret, match=r"data\.tls\.key"):
        read_secret(data)
    data = fresh.secret_data()
    data["ca.key"] = "A" * 70000
    with pytest.raises(UnusableSecret, match=r"data\.ca\.key: longer than"):
        read_secret(data)


def test_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="renew_fraction"):
        CertificatePolicy(renew_fraction=1.5)
    with pytest.raises(ValueError, match="serving_lifetime"):
        CertificatePolicy(ca_lifetime=dt.timedelta(days=3), serving_lifetime=dt.timedelta(days=2))


def test_ip_addresses_are_ip_names() -> None:
    names = (*NAMES, "127.0.0.1")
    material = renew(None, None, names, NOW, POLICY)
    san = material.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert examine(material, names, NOW, POLICY).ok
    assert examine(material, (*names, "::1"), NOW, POLICY).serving


def test_taking_over_a_foreign_secret_keeps_its_ca_for_the_overlap() -> None:
    foreign = renew(None, None, NAMES, NOW, POLICY)
    data = foreign.secret_data()
    del data["ca.key"]  # as cert-manager writes it: ca.crt, tls.crt, tls.key
    with pytest.raises(UnusableSecret, match=r"data\.ca\.key: missing"):
        read_secret(data)
    assert read_bundle(data) == (foreign.ca_cert,)
    taken = renew(None, None, NAMES, NOW, POLICY, trusted_before=read_bundle(data))
    assert taken.ca_cert != foreign.ca_cert
    assert taken.bundle == (taken.ca_cert, foreign.ca_cert)
    assert examine(taken, NAMES, NOW, POLICY).ok
    assert examine(taken, NAMES, NOW + POLICY.ca_overlap + dt.timedelta(seconds=1), POLICY).prune
    # A leaf certificate in a foreign ca.crt is not kept as a CA.
    leafy = renew(None, None, NAMES, NOW, POLICY, trusted_before=(foreign.cert,))
    assert leafy.bundle == (leafy.ca_cert,)
