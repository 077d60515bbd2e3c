#!/usr/bin/env bash
# Runs csi-sanity (kubernetes-csi/csi-test, built by `hack/tools/build.sh csi-sanity`)
# against a freshly started `dynvol node --csi-only` on a temporary socket, root and kubelet
# directory. Everything it mounts or starts is undone at exit, whatever happens.
#
#   hack/sanity.sh [extra csi-sanity flags...]      e.g. --ginkgo.v
#
# dynvol's node plugin is node-only and serves ephemeral inline volumes only: kubelet, not
# a Controller service, invents the volume ID and the volume context. csi-sanity's Node
# specs get their volume from CreateVolume instead, so hack/sanity/volume_source.py
# answers CreateVolume/DeleteVolume on a separate controller endpoint, returning the
# volume context kubelet would send (the --csi.testvolumeparameters file written below:
# the pod identity of the pod directory csi-sanity publishes into, and the
# volumeAttributes the webhook injects). Every Node RPC goes to the real plugin, with real
# bind mounts under a kubelet-like pod directory.
#
# The plugin's publish guard checks the pod and class of every publish, as in production;
# with no apiserver here it reads them from files (--publish-guard objects:DIR), written by
# hack/sanity/objects.py: the pod whose directory csi-sanity publishes into, opted in and
# carrying exactly the volume the webhook injects, and its StorageProviderClass.
#
# Skipped on purpose: the "[Controller Server]" and "[GroupController Server]" specs. They
# test a Controller service, which the plugin neither has nor advertises (the volume
# source is not one). csi-sanity skips more on its own, from the capabilities the plugin
# reports: staging, expansion, volume health, single-node-multi-writer, and the full
# "should work"/"should be idempotent" cycles (they need CONTROLLER_SERVICE).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD

sanity=$top/.tools/bin/csi-sanity
python=$top/.venv/bin/python
if [ ! -x "$sanity" ]; then
  echo "sanity: $sanity is missing; run 'hack/tools/build.sh csi-sanity'" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "sanity: the node plugin makes bind mounts; run as root" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/dynvol-sanity.XXXXXX")
pid=""
source_pid=""

mounts_under() {
  # Mount points at or below $1 in this namespace, deepest first.
  awk -v base="$1" '$5 == base || index($5, base "/") == 1 { print $5 }' /proc/self/mountinfo |
    awk '{ print gsub("/", "/"), $0 }' | sort -rn | cut -d' ' -f2-
}

stop() {
  # stop PID: SIGTERM, SIGKILL after 5 s, and always reap.
  [ -n "$1" ] || return 0
  if kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
  fi
  wait "$1" 2>/dev/null || true
}

cleanup() {
  local status=$? mp left
  trap - EXIT INT TERM
  stop "$pid"
  stop "$source_pid"
  for _ in 1 2 3; do
    left=$(mounts_under "$work")
    [ -n "$left" ] || break
    while IFS= read -r mp; do umount -l "$mp" 2>/dev/null || true; done <<<"$left"
  done
  if [ -n "$(mounts_under "$work")" ]; then
    echo "sanity: mounts left under $work; not deleting it:" >&2
    mounts_under "$work" >&2
    status=1
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_for_socket() {
  # wait_for_socket PATH PID LOG
  for _ in $(seq 150); do
    [ -S "$1" ] && return 0
    if ! kill -0 "$2" 2>/dev/null; then
      echo "sanity: the process logging to $3 exited during start-up:" >&2
      cat "$3" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "sanity: no socket at $1 after 15 s:" >&2
  cat "$3" >&2
  exit 1
}

# A pod directory as kubelet lays it out; csi-sanity creates its mount and staging
# directories inside it and publishes at <mountdir>/target.
pod_uid=$("$python" -c 'import uuid; print(uuid.uuid4())')
volume_dir=$work/kubelet/pods/$pod_uid/volumes/kubernetes.io~csi/sanity
mkdir -p "$volume_dir" "$work/registry" "$work/gen"
socket=$work/csi.sock
controller_socket=$work/controller.sock

"$python" hack/sanity/objects.py "$work/objects" "$pod_uid" sanity-pod default sanity-node sanity

"$python" -m dynvol --log-level INFO node --csi-only \
  --publish-guard "objects:$work/objects" \
  --endpoint "unix://$socket" \
  --node-id sanity-node \
  --root "$work/root" \
  --kubelet-dir "$work/kubelet" \
  --registration-dir "$work/registry" \
  >"$work/node.log" 2>&1 &
pid=$!

# The volume source (see above), its messages generated from hack/sanity/controller.proto.
PATH="$top/.venv/bin:$PATH" "$python" -m grpc_tools.protoc --proto_path=hack/sanity \
  --python_betterproto_out="$work/gen" controller.proto >"$work/gen.log" 2>&1 ||
  { cat "$work/gen.log" >&2; exit 1; }
"$python" hack/sanity/volume_source.py "$work/gen" "$controller_socket" >"$work/source.log" 2>&1 &
source_pid=$!

# What kubelet puts into the volume context of a dynvol volume (podInfoOnMount, and the
# volumeAttributes the webhook injects) for the pod whose directory csi-sanity uses.
cat >"$work/volume-context.yaml" <<YAML
csi.storage.k8s.io/pod.uid: "$pod_uid"
csi.storage.k8s.io/pod.name: sanity-pod
csi.storage.k8s.io/pod.namespace: default
csi.storage.k8s.io/ephemeral: "true"
storageProviderClass: sanity
mountPodDispatchPolicy: independent
YAML

wait_for_socket "$socket" "$pid" "$work/node.log"
wait_for_socket "$controller_socket" "$source_pid" "$work/source.log"

set +e
"$sanity" \
  --csi.endpoint="unix://$socket" \
  --csi.controllerendpoint="unix://$controller_socket" \
  --csi.testvolumeparameters="$work/volume-context.yaml" \
  --csi.mountdir="$volume_dir/mount" \
  --csi.stagingdir="$volume_dir/staging" \
  --ginkgo.skip='\[Controller Server\]|\[GroupController Server\]' \
  --ginkgo.no-color \
  "$@"
status=$?
set -e
if [ "$status" -ne 0 ]; then
  echo "sanity: csi-sanity failed (exit $status); node plugin log:" >&2
  tail -n 100 "$work/node.log" >&2
fi
exit "$status"
