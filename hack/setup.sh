#!/usr/bin/env bash
# Installs what dynvol needs on a fresh Debian machine: the system packages the tests use
# (FUSE mounters, etcd) and a virtualenv with the project and its development tools.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(etcd-server s3fs rclone fuse3 util-linux mount procps iproute2 openssl
  containerd runc containernetworking-plugins debootstrap busybox-static iptables buildah
  openssh-server)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The package starts nothing here (no init system), but make sure no etcd is left running
  # on the default ports on machines that do start services.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    "${sudo_cmd[@]}" systemctl disable --now etcd || true
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.dynvol-setup-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ hack/constraints.txt -nt "$stamp" ]; then
  echo "setup: installing dynvol and its development tools into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # The pinned build backend too: tests/integration/test_wheel.py builds the wheel with it,
  # without fetching one.
  .venv/bin/pip install -q -c hack/constraints.txt setuptools wheel
  # Every extra: the checkout's tests run the three services and the testing fixtures.
  .venv/bin/pip install -q -c hack/constraints.txt -e '.[dev,services,testing]'
  for example in examples/*/pyproject.toml; do
    [ -f "$example" ] && .venv/bin/pip install -q -c hack/constraints.txt -e "$(dirname "$example")"
  done
  touch "$stamp"
fi
