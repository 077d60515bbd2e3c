#!/usr/bin/env bash
# Builds the pinned test binaries from the Go module proxy and links them into .tools/bin.
#
#   hack/tools/build.sh [TOOL...]     TOOL: kubernetes, kubernetes-node, csi-sanity, minio, etcd
#
# Each build lands in $DYNVOL_TOOLS_CACHE/<tool>-<version>-<go.sum digest>/, so a second run
# (or a fresh clone on the same machine) reuses it; changing a pin changes the directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${DYNVOL_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynvol/tools}
bin="$top/.tools/bin"
mkdir -p "$bin" "$cache"

# The digest covers file contents only, so clones at other paths share the cache.
digest() { cat "$here/$1/go.mod" "$here/$1/go.sum" | sha256sum | cut -c1-12; }

# build MODULE_DIR VERSION LDFLAGS PACKAGE...
build() {
  local mod=$1 version=$2 ldflags=$3
  shift 3
  local out="$cache/$mod-$version-$(digest "$mod")" pkg name todo=()
  for pkg in "$@"; do
    name=${pkg##*/}
    [ -x "$out/$name" ] || todo+=("$pkg")
  done
  if ((${#todo[@]})); then
    echo "tools: building ${todo[*]##*/} ($version) into $out"
    mkdir -p "$out.partial"
    (cd "$here/$mod" && go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$out.partial/" "${todo[@]}")
    mkdir -p "$out"
    for pkg in "${todo[@]}"; do mv "$out.partial/${pkg##*/}" "$out/"; done
    rmdir "$out.partial" 2>/dev/null || true
  fi
  for pkg in "$@"; do
    name=${pkg##*/}
    ln -sfn "$out/$name" "$bin/$name"
  done
}

k8s_ldflags() {
  local v=${KUBERNETES_VERSION#v} major minor
  major=${v%%.*}
  minor=${v#*.}; minor=${minor%%.*}
  echo "-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
}

tool_kubernetes() {
  build kubernetes "$KUBERNETES_VERSION" "$(k8s_ldflags)" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
}

tool_kubernetes-node() {
  build kubernetes "$KUBERNETES_VERSION" "$(k8s_ldflags)" \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet
}

tool_csi-sanity() {
  build csi-test "$CSI_TEST_VERSION" "-s -w" github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
}

tool_minio() {
  build minio "$MINIO_VERSION" "-s -w" github.com/minio/minio
}

# etcd comes from Debian (hack/setup.sh installs etcd-server); it is linked here so that
# every tool is found in one place.
tool_etcd() {
  local etcd
  etcd=$(command -v etcd || true)
  [ -n "$etcd" ] || etcd=/usr/bin/etcd
  if [ ! -x "$etcd" ]; then
    echo "tools: etcd not found; run 'make setup' (Debian package etcd-server)" >&2
    return 1
  fi
  ln -sfn "$etcd" "$bin/etcd"
}

tools=("$@")
((${#tools[@]})) || tools=(etcd kubernetes csi-sanity minio)
for t in "${tools[@]}"; do
  "tool_$t"
done
