#!/usr/bin/env bash
# Writes the Go module that hack/tools/build.sh builds one Kubernetes release from:
#
#   hack/tools/pin-kubernetes.sh v1.37.2      -> hack/tools/kubernetes-1.37/{go.mod,go.sum,...}
#
# k8s.io/kubernetes points its staging modules (k8s.io/api, k8s.io/client-go, ...) at
# ./staging, which a module outside its tree cannot use; every one of them is replaced by
# its published release of the same patch (v1.37.2 -> v0.37.2), read from the upstream
# go.mod of that release. The module pins the commands build.sh builds (tools.go) and the
# imports of test/e2e's own test file (e2e_test.go), so that `go test -c` of the upstream
# e2e suite finds every module in go.sum. Then add the version to versions.env.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=${1:?usage: pin-kubernetes.sh vMAJOR.MINOR.PATCH}
if ! [[ $version =~ ^v1\.([0-9]+)\.([0-9]+)$ ]]; then
  echo "pin-kubernetes: '$version' is not a Kubernetes release (v1.MINOR.PATCH)" >&2
  exit 2
fi
minor=${BASH_REMATCH[1]}
staging="v0.$minor.${BASH_REMATCH[2]}"
dir="$here/kubernetes-1.$minor"

upstream=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -d "$upstream" ] || {
  echo "pin-kubernetes: could not download k8s.io/kubernetes@$version" >&2
  exit 1
}
go_line=$(grep -m1 '^go ' "$upstream/go.mod")

mkdir -p "$dir"
rm -f "$dir/go.mod" "$dir/go.sum"
{
  echo "module dynvol.dev/hack/tools/kubernetes-1.$minor"
  echo
  echo "$go_line"
  echo
  echo "require k8s.io/kubernetes $version"
  echo
  echo "// k8s.io/kubernetes points its staging modules at ./staging; use their published releases."
  echo "replace ("
  sed -n 's|^\t\(k8s\.io/[a-z0-9-]*\) => \./staging/.*|\1|p' "$upstream/go.mod" | sort -u |
    while read -r mod; do printf '\t%s => %s %s\n' "$mod" "$mod" "$staging"; done
  echo ")"
} >"$dir/go.mod"

cat >"$dir/tools.go" <<'EOF'
//go:build tools

// Package tools pins the Kubernetes commands that hack/tools/build.sh builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/test/e2e"
)
EOF

# The non-standard imports of test/e2e/e2e_test.go (a path whose first element has a dot).
{
  echo "//go:build tools"
  echo
  echo "// The imports of the upstream e2e suite's test file, so that go.sum covers"
  echo "// \`go test -c k8s.io/kubernetes/test/e2e\` (written by pin-kubernetes.sh)."
  echo "package tools"
  echo
  echo "import ("
  sed -n '/^import (/,/^)/p' "$upstream/test/e2e/e2e_test.go" |
    sed -n 's|^\t\([a-z0-9_]* \)\{0,1\}"\([a-z0-9-]*\.[^"]*\)"$|\2|p' | sort -u |
    while read -r pkg; do printf '\t_ "%s"\n' "$pkg"; done
  echo ")"
} >"$dir/e2e_test.go"

(cd "$dir" && go mod tidy)
echo "pin-kubernetes: wrote $dir for $version (staging modules at $staging)"
