"""Writes the pod and StorageProviderClass that csi-sanity's volume belongs to.

``dynvol node --csi-only --publish-guard objects:DIR`` checks every NodePublishVolume
against these files, as the full node process checks against the apiserver: the pod must
exist with the UID of the volume context, be bound to this node, have opted in, and carry
exactly the volume dynvol's webhook injects; its class must exist and allow its namespace.

    python hack/sanity/objects.py DIR POD_UID POD_NAME NAMESPACE NODE CLASS

The pod is built by dynvol's own admission code (the webhook's patch applied to a plain
pod), so the files say what a real opted-in pod says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(directory: str, pod_uid: str, pod_name: str, namespace: str, node: str, spc: str) -> None:
    from dynvol_controllers.admission import apply_patch, mutate_pod
    from dynvol_core import constants as c

    plain = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "uid": pod_uid,
            "annotations": {c.ANNOTATION_STORAGE_PROVIDER_CLASS: spc},
        },
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "sanity"}]},
    }
    decision = mutate_pod(plain)
    if not decision.allowed:
        raise SystemExit(f"objects: the webhook would refuse the sanity pod: {decision.message}")
    pod = apply_patch(plain, decision.patch)
    storage_class = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND_CLASS,
        "metadata": {"name": spc},
        "spec": {"provider": c.PROVIDER_S3, "allowedNamespaces": [namespace]},
    }
    root = Path(directory)
    (root / "pods" / namespace).mkdir(parents=True, exist_ok=True)
    (root / c.PLURAL_CLASS).mkdir(parents=True, exist_ok=True)
    (root / "pods" / namespace / f"{pod_name}.json").write_text(json.dumps(pod, indent=2))
    (root / c.PLURAL_CLASS / f"{spc}.json").write_text(json.dumps(storage_class, indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 7:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
