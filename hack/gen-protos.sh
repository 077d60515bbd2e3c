#!/usr/bin/env bash
# Generates the betterproto messages and grpclib stubs for protos/*.proto into
# dynvol_csi/_proto/. The generated code is committed.
#
#   hack/gen-protos.sh           regenerate dynvol_csi/_proto/
#   hack/gen-protos.sh --check   regenerate into a temporary directory and fail (exit 1) if
#                                the result differs from the committed copy
set -euo pipefail
cd "$(dirname "$0")/.."

out=dynvol_csi/_proto
venv=${VENV:-.venv}
check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

if [ ! -x "$venv/bin/protoc-gen-python_betterproto" ]; then
  echo "gen-protos: $venv/bin/protoc-gen-python_betterproto is missing; run 'bash hack/setup.sh'" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$tmp.log" "$tmp.diff"' EXIT

# protoc finds its plugin on PATH by name; put the venv's first so the pinned betterproto
# (2.0.0b7) is used whatever else is installed. Sorted inputs keep the output stable.
mapfile -t sources < <(cd protos && ls -- *.proto | LC_ALL=C sort)
PATH="$PWD/$venv/bin:$PATH" "$venv/bin/python" -m grpc_tools.protoc \
  --proto_path=protos \
  --python_betterproto_out="$tmp" \
  "${sources[@]}" >"$tmp.log" 2>&1 || { cat "$tmp.log" >&2; rm -f "$tmp.log"; exit 1; }
rm -f "$tmp.log"

if ((check)); then
  if ! diff -ru --exclude=__pycache__ "$out" "$tmp" >"$tmp.diff" 2>&1; then
    cat "$tmp.diff" >&2
    rm -f "$tmp.diff"
    echo "gen-protos: $out is out of date with protos/; run 'hack/gen-protos.sh' (make protos)" >&2
    exit 1
  fi
  rm -f "$tmp.diff"
  echo "gen-protos: $out is up to date"
  exit 0
fi

rm -rf "$out"
mkdir -p "$(dirname "$out")"
cp -r "$tmp" "$out"
chmod -R u=rwX,go=rX "$out"
echo "gen-protos: wrote $out"
