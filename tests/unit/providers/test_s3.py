"""The s3 provider's pure half: config, credentials and the mounter it describes."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynvol_core.errors import InvalidObject
from dynvol_providers import MountFailed, MountRequest, Reason
from dynvol_providers.builtin.s3 import S3Config, S3Provider

PROVIDER = S3Provider()
KEYS = {"access-key-id": "cldevaccesskey", "secret-access-key": "cldevsecretkey"}


def request(
    config: S3Config, *, read_only: bool = False, keys: dict[str, str] = KEYS
) -> MountRequest:
    return MountRequest(
        name="ns/m",
        target=PurePosixPath("/xvols/data"),
        read_only=read_only,
        config=config,
        credentials=PROVIDER.parse_credentials(keys),
        work_dir=PurePosixPath("/run/dynvol/m"),
    )


def test_seed_configs_are_accepted() -> None:
    config = PROVIDER.parse_config(
        {"bucket": "ssat202410181", "endpoint": "https://play.min.io"}, parameters={}
    )
    assert config == S3Config(
        bucket="ssat202410181", endpoint="https://play.min.io", path_style=True
    )
    config = PROVIDER.parse_config(
        {"bucket": "my-s3-bucket", "endpoint": "http://my-s3-service.example.com"}, parameters={}
    )
    assert config.mounter == "s3fs"


def test_aws_defaults_to_virtual_hosted_style() -> None:
    config = PROVIDER.parse_config({"bucket": "data"}, parameters={})
    assert config.endpoint == "https://s3.amazonaws.com"
    assert config.path_style is False


@pytest.mark.parametrize(
    ("values", "parameters", "path"),
    [
        ({}, {}, "bucket"),
        ({"bucket": "Bad_Bucket"}, {}, "bucket"),
        ({"bucket": "data", "endpoint": "ftp://x"}, {}, "endpoint"),
        ({"bucket": "data", "endpoint": "https://k:s@x"}, {}, "endpoint"),
        ({"bucket": "data", "prefix": "../up"}, {}, "prefix"),
        ({"bucket": "data", "region": "EU WEST"}, {}, "region"),
        ({"bucket": "data", "pathStyle": "yes"}, {}, "pathStyle"),
        ({"bucket": "data", "bukket": "x"}, {}, "bukket"),
        ({"bucket": "data"}, {"s3-mounter": "goofys"}, "parameters.s3-mounter"),
    ],
)
def test_config_errors_name_the_field(
    values: dict[str, object], parameters: dict[str, str], path: str
) -> None:
    with pytest.raises(InvalidObject) as info:
        PROVIDER.parse_config(values, parameters=parameters)
    assert path in info.value.paths


def test_credentials_come_in_pairs() -> None:
    with pytest.raises(InvalidObject) as info:
        PROVIDER.parse_credentials({"access-key-id": b"AKIA"})
    assert info.value.paths == ("data.secret-access-key",)
    assert "AKIA" not in str(info.value)
    assert PROVIDER.parse_credentials({}).values == {}


def test_credentials_must_fit_the_passwd_file() -> None:
    with pytest.raises(InvalidObject) as info:
        PROVIDER.parse_credentials({"access-key-id": "a:b", "secret-access-key": "s"})
    assert info.value.paths == ("data.access-key-id",)


def test_s3fs_runs_in_the_foreground_with_a_private_passwd_file() -> None:
    config = PROVIDER.parse_config(
        {"bucket": "data", "endpoint": "http://127.0.0.1:9000", "prefix": "a/b"}, parameters={}
    )
    spec = PROVIDER.daemon_spec(request(config))
    argv = spec.command.argv
    assert argv[:4] == ("s3fs", "data:/a/b", "/xvols/data", "-f")
    assert "use_path_request_style" in argv
    assert "url=http://127.0.0.1:9000" in argv
    assert "ro" not in argv
    assert spec.fs_type == "fuse.s3fs"
    (passwd,) = spec.command.files
    assert passwd.mode == 0o600
    assert passwd.path.parent == PurePosixPath("/run/dynvol/m")
    assert passwd.content == b"cldevaccesskey:cldevsecretkey\n"
    assert f"passwd_file={passwd.path}" in argv
    assert spec.command.secrets == {"cldevaccesskey", "cldevsecretkey"}
    assert "AWS_SECRET_ACCESS_KEY" in spec.command.unset_env


def test_read_only_is_enforced_by_s3fs() -> None:
    config = PROVIDER.parse_config({"bucket": "data"}, parameters={})
    argv = PROVIDER.daemon_spec(request(config, read_only=True)).command.argv
    assert argv[argv.index("ro") - 1] == "-o"


def test_anonymous_mount_uses_public_bucket() -> None:
    config = PROVIDER.parse_config({"bucket": "data"}, parameters={})
    spec = PROVIDER.daemon_spec(request(config, keys={}))
    assert "public_bucket=1" in spec.command.argv
    assert spec.command.files == ()


def test_rclone_mounter_takes_keys_from_the_environment() -> None:
    config = PROVIDER.parse_config(
        {"bucket": "data", "endpoint": "http://127.0.0.1:9000"}, parameters={"s3-mounter": "rclone"}
    )
    spec = PROVIDER.daemon_spec(request(config, read_only=True))
    argv = spec.command.argv
    assert argv[:4] == ("rclone", "mount", "dynvol:data", "/xvols/data")
    assert "--read-only" in argv
    env = spec.command.env
    assert env["RCLONE_CONFIG_DYNVOL_TYPE"] == "s3"
    assert env["RCLONE_CONFIG_DYNVOL_ACCESS_KEY_ID"] == "cldevaccesskey"
    assert env["RCLONE_CONFIG_DYNVOL_SECRET_ACCESS_KEY"] == "cldevsecretkey"
    assert env["RCLONE_CONFIG_DYNVOL_FORCE_PATH_STYLE"] == "true"
    assert "AWS_CA_BUNDLE" in spec.command.unset_env
    assert spec.preflight is not None
    assert spec.fs_type == "fuse.rclone"


# A marker keeps a generated value from being a substring of fixed text ("data", "Path").
secret_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters=":\n\r\x00"), min_size=1, max_size=40
).map(lambda text: f"k3y~{text}~")


@given(access=secret_text, secret=secret_text, mounter=st.sampled_from(["s3fs", "rclone"]))
def test_secrets_never_reach_argv_or_reprs(access: str, secret: str, mounter: str) -> None:
    config = PROVIDER.parse_config({"bucket": "data"}, parameters={"s3-mounter": mounter})
    spec = PROVIDER.daemon_spec(
        request(config, keys={"access-key-id": access, "secret-access-key": secret})
    )
    visible = " ".join(spec.command.argv) + repr(spec)
    if spec.preflight is not None:
        visible += " ".join(spec.preflight.argv)
    assert access not in visible
    assert secret not in visible


def test_failures_are_explained() -> None:
    config = PROVIDER.parse_config({"bucket": "data"}, parameters={})
    explained = PROVIDER.explain_failure(
        request(config), MountFailed(Reason.MOUNTER_EXITED, "s3fs: ... NoSuchBucket ...")
    )
    assert explained.reason == Reason.NOT_FOUND
    assert "create it or fix s3Config.bucket" in explained.message
    explained = PROVIDER.explain_failure(
        request(config), MountFailed(Reason.MOUNTER_EXITED, "InvalidAccessKeyId")
    )
    assert explained.reason == Reason.ACCESS_DENIED


def test_timestamps_are_not_http_codes() -> None:
    config = PROVIDER.parse_config({"bucket": "data"}, parameters={})
    output = (
        "2026-11-26T21:30:38.403Z [ERR] curl.cpp:CheckBucket(3421): Check bucket failed, "
        "S3 response: <Error><Code>NoSuchBucket</Code></Error>"
    )
    failure = MountFailed(Reason.MOUNTER_EXITED, output)
    assert PROVIDER.explain_failure(request(config), failure).reason == Reason.NOT_FOUND
    output = "2026-11-26T21:30:38.404Z [CRT] s3fs.cpp:s3fs_check_service(3597): unable to connect"
    failure = MountFailed(Reason.MOUNTER_EXITED, output)
    assert PROVIDER.explain_failure(request(config), failure).reason == Reason.UNREACHABLE


@pytest.mark.parametrize(
    "endpoint",
    ["http://h:9000/x,use_cache=/tmp", "http://h/x\\,dev", "http://h/\nx", "http://h/a b"],
)
def test_s3fs_refuses_a_forged_endpoint_itself(endpoint: str) -> None:
    # A config that bypassed parse_config (older dynvol, hand-made request) still stops here.
    forged = S3Config(bucket="data", endpoint=endpoint)
    with pytest.raises(InvalidObject) as info:
        PROVIDER.daemon_spec(request(forged))
    assert info.value.paths == ("endpoint",)


def test_s3fs_refuses_a_forged_region_itself() -> None:
    with pytest.raises(InvalidObject) as info:
        PROVIDER.daemon_spec(request(S3Config(bucket="data", region="x,dev")))
    assert info.value.paths == ("region",)


def test_claim_with_injected_endpoint_is_refused() -> None:
    with pytest.raises(InvalidObject) as info:
        PROVIDER.parse_config(
            {"bucket": "data", "endpoint": "http://host:9000/x,use_cache=/tmp,dbglevel=info"},
            parameters={},
        )
    assert info.value.paths == ("endpoint",)
