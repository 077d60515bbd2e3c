#!/usr/bin/env bash
# Builds the pinned test binaries from the Go module proxy and links them into .tools.
#
#   hack/tools/build.sh [TOOL...]
#
#   kubernetes          kube-apiserver, kubectl                        at $KUBERNETES_VERSION
#   kubernetes-node     kube-controller-manager, kube-scheduler,
#                       kubelet, kube-proxy                            at $KUBERNETES_VERSION
#   kubernetes-e2e      e2e.test (the upstream e2e suite)              at $KUBERNETES_VERSION
#   kubernetes-oldest   kube-apiserver, kubectl       at $KUBERNETES_OLDEST_VERSION
#   csi-sanity, minio, etcd
#   helm                the Helm client (charts/dynvol's tests)       at $HELM_VERSION
#   coredns             the multi-node cluster's DNS (static)         at $COREDNS_VERSION
#   --versions          print the Kubernetes versions the tiers run against, newest first
#
# KUBERNETES_VERSION defaults to the newest release in versions.env; set it in the
# environment to build another pinned release (KUBERNETES_VERSION=v1.35.4 hack/tools/build.sh
# kubernetes kubernetes-node). Each Kubernetes release is built from its own Go module,
# hack/tools/kubernetes-1.MINOR (written by pin-kubernetes.sh), and linked into
# .tools/k8s/<version>/bin; the binaries of $KUBERNETES_VERSION are also linked into
# .tools/bin, where the local cluster, the e2e tier and kubectl users find them.
#
# Each build lands in $DYNVOL_TOOLS_CACHE/<tool>-<version>-<go.sum digest>/, so a second run
# (or a fresh clone on the same machine) reuses it; changing a pin changes the directory,
# and two releases are cached side by side.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
requested=${KUBERNETES_VERSION:-}
# shellcheck source=versions.env
source "$here/versions.env"
KUBERNETES_DEFAULT_VERSION=$KUBERNETES_VERSION
KUBERNETES_VERSION=${requested:-$KUBERNETES_DEFAULT_VERSION}
cache=${DYNVOL_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynvol/tools}
bin="$top/.tools/bin"
# The machine's Go builds every pin (Kubernetes v1.37 needs go 1.26); never fetch another.
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

if [ "${1:-}" = "--versions" ]; then
  echo "$KUBERNETES_DEFAULT_VERSION $KUBERNETES_OLDEST_VERSION"
  exit 0
fi
mkdir -p "$bin" "$cache"

# The digest covers file contents only, so clones at other paths share the cache.
digest() { cat "$here/$1/go.mod" "$here/$1/go.sum" | sha256sum | cut -c1-12; }

# The module that pins Kubernetes VERSION, after checking that VERSION is one that
# versions.env pins and that the module requires exactly it.
k8s_module() {
  local version=$1 minor mod
  if ! [[ $version =~ ^v1\.([0-9]+)\.[0-9]+$ ]]; then
    echo "tools: KUBERNETES_VERSION='$version' is not a Kubernetes release (v1.MINOR.PATCH)" >&2
    return 1
  fi
  minor=${BASH_REMATCH[1]}
  mod="kubernetes-1.$minor"
  if [ "$version" != "$KUBERNETES_DEFAULT_VERSION" ] && [ "$version" != "$KUBERNETES_OLDEST_VERSION" ]; then
    echo "tools: KUBERNETES_VERSION=$version is not pinned; hack/tools/versions.env pins" \
      "$KUBERNETES_DEFAULT_VERSION and $KUBERNETES_OLDEST_VERSION" \
      "(hack/tools/pin-kubernetes.sh writes the module for another release)" >&2
    return 1
  fi
  if ! grep -qx "require k8s.io/kubernetes $version" "$here/$mod/go.mod" 2>/dev/null &&
    ! grep -qE "^\s+k8s.io/kubernetes $version\$" "$here/$mod/go.mod" 2>/dev/null; then
    echo "tools: hack/tools/$mod/go.mod does not require k8s.io/kubernetes $version;" \
      "run hack/tools/pin-kubernetes.sh $version" >&2
    return 1
  fi
  echo "$mod"
}

# build MODULE_DIR NAME VERSION LDFLAGS LINK_DIRS PACKAGE...
#   NAME names the cache directory; LINK_DIRS is a space-separated list of directories to
#   link each binary into. A package ending in /test/e2e is built as its test binary.
build() {
  local mod=$1 cname=$2 version=$3 ldflags=$4 links=$5
  shift 5
  local out="$cache/$cname-$version-$(digest "$mod")" pkg name todo=() start dir
  for pkg in "$@"; do
    name=$(binary_name "$pkg")
    [ -x "$out/$name" ] || todo+=("$pkg")
  done
  if ((${#todo[@]})); then
    mkdir -p "$out.partial"
    for pkg in "${todo[@]}"; do
      name=$(binary_name "$pkg")
      echo "tools: building $name ($version) into $out"
      start=$(date +%s)
      if [ "$name" = e2e.test ]; then
        (cd "$here/$mod" && go test -c -mod=readonly -trimpath -ldflags "$ldflags" \
          -o "$out.partial/$name" "$pkg")
      else
        (cd "$here/$mod" && go build -mod=readonly -trimpath -ldflags "$ldflags" \
          -o "$out.partial/$name" "$pkg")
      fi
      echo "tools: built $name ($version) in $(($(date +%s) - start))s"
    done
    mkdir -p "$out"
    for pkg in "${todo[@]}"; do
      name=$(binary_name "$pkg")
      mv "$out.partial/$name" "$out/"
    done
    rmdir "$out.partial" 2>/dev/null || true
  fi
  for dir in $links; do
    mkdir -p "$dir"
    for pkg in "$@"; do
      name=$(binary_name "$pkg")
      ln -sfn "$out/$name" "$dir/$name"
    done
  done
}

binary_name() {
  case $1 in
    */test/e2e) echo e2e.test ;;
    *) echo "${1##*/}" ;;
  esac
}

k8s_ldflags() {
  local v=${1#v} major minor
  major=${v%%.*}
  minor=${v#*.}
  minor=${minor%%.*}
  echo "-s -w -X k8s.io/component-base/version.gitVersion=$1 -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
}

# build_k8s VERSION PACKAGE...: into .tools/k8s/VERSION/bin, and .tools/bin for the
# release this run builds for (KUBERNETES_VERSION).
build_k8s() {
  local version=$1 mod links
  shift
  mod=$(k8s_module "$version")
  links="$top/.tools/k8s/$version/bin"
  [ "$version" != "$KUBERNETES_VERSION" ] || links+=" $bin"
  build "$mod" kubernetes "$version" "$(k8s_ldflags "$version")" "$links" "$@"
}

tool_kubernetes() {
  build_k8s "$KUBERNETES_VERSION" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
}

tool_kubernetes-node() {
  build_k8s "$KUBERNETES_VERSION" k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy
}

tool_kubernetes-e2e() {
  build_k8s "$KUBERNETES_VERSION" k8s.io/kubernetes/test/e2e
}

tool_kubernetes-oldest() {
  build_k8s "$KUBERNETES_OLDEST_VERSION" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kubectl
}

tool_csi-sanity() {
  build csi-test csi-test "$CSI_TEST_VERSION" "-s -w" "$bin" \
    github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
}

tool_minio() {
  build minio minio "$MINIO_VERSION" "-s -w" "$bin" github.com/minio/minio
}

# Stamped as Helm's own release build stamps it: its version, and the Kubernetes minor of
# the client-go it was built with (what `helm template` assumes without --kube-version).
tool_helm() {
  local minor pkg=helm.sh/helm/v3
  minor=$(sed -n 's|^\s*k8s.io/client-go v0\.\([0-9]*\)\..*|\1|p' "$here/helm/go.mod")
  build helm helm "$HELM_VERSION" "-s -w -X $pkg/internal/version.version=$HELM_VERSION \
-X $pkg/pkg/chartutil.k8sVersionMajor=1 -X $pkg/pkg/chartutil.k8sVersionMinor=$minor \
-X $pkg/pkg/lint/rules.k8sVersionMajor=1 -X $pkg/pkg/lint/rules.k8sVersionMinor=$minor" \
    "$bin" $pkg/cmd/helm
}

# Static (CGO_ENABLED=0), so that its image needs no libc; hack/tools/coredns has only the
# plugins the multi-node cluster's Corefile uses.
tool_coredns() {
  CGO_ENABLED=0 build coredns coredns "$COREDNS_VERSION" "-s -w" "$bin" \
    dynvol.dev/hack/tools/coredns
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
  if ! declare -F "tool_$t" >/dev/null; then
    echo "tools: unknown tool '$t' (see hack/tools/build.sh)" >&2
    exit 2
  fi
  "tool_$t"
done
