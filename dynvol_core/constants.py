"""Names shared by every dynvol process: API group, annotations, parameters, labels.

The values in the first half are fixed by the project's interface contract; renaming one is
an API change. The label keys at the end are dynvol's own bookkeeping on the objects it
creates (DynamicVolumeMounts, Dynamic Mount Pods and their credential Secrets).
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "dynamicvolume.csi.cloudnative101.net"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
DRIVER_NAME: Final = GROUP

# Pod (or namespace) opt-in annotations.
ANNOTATION_STORAGE_PROVIDER_CLASS: Final = f"{GROUP}/storage-provider-class"
ANNOTATION_MOUNT_PATH_ROOT: Final = f"{GROUP}/volume-mount-path-root"
ANNOTATION_DISPATCH_POLICY: Final = f"{GROUP}/mount-pod-dispatch-policy"

# StorageProviderClass parameters.
PARAM_SECRET_NAME: Final = f"{GROUP}/storage-provider-secret-name"
PARAM_SECRET_NAMESPACE: Final = f"{GROUP}/storage-provider-secret-namespace"
PARAM_MOUNT_CPU_REQUEST: Final = f"{GROUP}/mount-cpu-request"
PARAM_MOUNT_MEMORY_REQUEST: Final = f"{GROUP}/mount-memory-request"
PARAM_MOUNT_CPU_LIMIT: Final = f"{GROUP}/mount-cpu-limit"
PARAM_MOUNT_MEMORY_LIMIT: Final = f"{GROUP}/mount-memory-limit"
#: Seconds a deleted mount with files still open in a pod is kept before its mounter is
#: stopped (a whole number, 0 to MAX_UNMOUNT_GRACE; default DEFAULT_UNMOUNT_GRACE).
PARAM_UNMOUNT_GRACE: Final = f"{GROUP}/unmount-grace-period"
DEFAULT_UNMOUNT_GRACE: Final = 30
MAX_UNMOUNT_GRACE: Final = 3600
#: When a pod's DMP starts: ``OnClaim`` (the default), once a claim selects the pod;
#: ``OnPublish``, as soon as the pod's volume is published on its node, so that the first
#: claim finds its mount pod running (for ``independent``, one idle DMP per opted-in pod
#: of the class until the pod goes; for ``shared``, the node's DMP of the class and
#: credential from its first opted-in pod on).
PARAM_DMP_START: Final = f"{GROUP}/dmp-start"
DMP_START_ON_CLAIM: Final = "OnClaim"
DMP_START_ON_PUBLISH: Final = "OnPublish"
DMP_STARTS: Final = (DMP_START_ON_CLAIM, DMP_START_ON_PUBLISH)
#: Every parameter key dynvol itself understands. Other keys under the dynvol prefix are
#: rejected as probable typos; keys without the prefix belong to the provider.
KNOWN_PARAMETERS: Final = frozenset(
    {
        PARAM_SECRET_NAME,
        PARAM_SECRET_NAMESPACE,
        PARAM_MOUNT_CPU_REQUEST,
        PARAM_MOUNT_MEMORY_REQUEST,
        PARAM_MOUNT_CPU_LIMIT,
        PARAM_MOUNT_MEMORY_LIMIT,
        PARAM_UNMOUNT_GRACE,
        PARAM_DMP_START,
    }
)

# The CSI ephemeral inline volume the webhook injects.
VOLUME_NAME: Final = "dynamic-volume-root-path"
VOLUME_ATTR_CLASS: Final = "storageProviderClass"
VOLUME_ATTR_POLICY: Final = "mountPodDispatchPolicy"
POLICY_INDEPENDENT: Final = "independent"
POLICY_SHARED: Final = "shared"
POLICIES: Final = frozenset({POLICY_INDEPENDENT, POLICY_SHARED})

# Keys kubelet puts into NodePublishVolume's volume context (podInfoOnMount).
CSI_CTX_POD_UID: Final = "csi.storage.k8s.io/pod.uid"
CSI_CTX_POD_NAME: Final = "csi.storage.k8s.io/pod.name"
CSI_CTX_POD_NAMESPACE: Final = "csi.storage.k8s.io/pod.namespace"
CSI_CTX_EPHEMERAL: Final = "csi.storage.k8s.io/ephemeral"

DEFAULT_ROOT: Final = "/var/lib/dynamic"
DEFAULT_SYSTEM_NAMESPACE: Final = "dynvol-system"

# Kinds and plurals of the custom resources.
KIND_CLASS: Final = "StorageProviderClass"
KIND_CLAIM: Final = "DynamicVolumeClaim"
KIND_MOUNT: Final = "DynamicVolumeMount"
KIND_CLAIM_SLICE: Final = "DynamicVolumeClaimSlice"
PLURAL_CLASS: Final = "storageproviderclasses"
PLURAL_CLAIM: Final = "dynamicvolumeclaims"
PLURAL_MOUNT: Final = "dynamicvolumemounts"
PLURAL_CLAIM_SLICE: Final = "dynamicvolumeclaimslices"

#: Finalizer the controller keeps on a StorageProviderClass while pods or claims use it.
FINALIZER_CLASS_IN_USE: Final = f"{GROUP}/in-use-protection"
#: Finalizer the DMP keeps on a DynamicVolumeMount until its mount is gone.
FINALIZER_MOUNT: Final = f"{GROUP}/unmount"

# Built-in provider names (third-party providers bring their own).
PROVIDER_S3: Final = "s3"
PROVIDER_NFS: Final = "nfs"
PROVIDER_RCLONE: Final = "rclone"

# Labels on the objects dynvol creates. Values are always valid label values: long names
# are replaced by a digest (see dynvol_core.dispatch.label_value).
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_MANAGED_BY_VALUE: Final = "dynvol"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
COMPONENT_DMP: Final = "dynamic-mount-pod"
COMPONENT_CREDENTIALS: Final = "dmp-credentials"
LABEL_CLAIM: Final = f"{GROUP}/claim"
LABEL_CLAIM_UID: Final = f"{GROUP}/claim-uid"
LABEL_POD: Final = f"{GROUP}/pod"
LABEL_POD_UID: Final = f"{GROUP}/pod-uid"
LABEL_POD_NAMESPACE: Final = f"{GROUP}/pod-namespace"
LABEL_NODE: Final = f"{GROUP}/node"
LABEL_DMP: Final = f"{GROUP}/dmp"
LABEL_CLASS: Final = f"{GROUP}/storage-provider-class"
LABEL_POLICY: Final = f"{GROUP}/dispatch-policy"
LABEL_CREDENTIAL: Final = f"{GROUP}/credential"

# Defaults for the Dynamic Mount Pods.
DEFAULT_DMP_SERVICE_ACCOUNT: Final = "dynvol-dmp"
#: dynvol's own PriorityClass (manifests/base/priorityclass.yaml): high, and never preempts.
DEFAULT_DMP_PRIORITY_CLASS: Final = "dynvol-mount"
DMP_XVOLS_DIR: Final = "/xvols"
#: The DMP agent's --work-dir (mounters' files and caches, e.g. rclone's VFS write cache):
#: an emptyDir, so that it survives a restart of the DMP container.
DMP_WORK_DIR: Final = "/run/dynvol/dmp"
#: The port of a DMP's /metrics, /healthz and /readyz on the pod network.
DMP_METRICS_PORT: Final = 9812
DMP_SECRETS_DIR: Final = "/secrets"

#: kubelet's waiting reason for a container it starts again only after a growing delay
#: (10 s, doubling to 5 min); a DMP waiting so is replaced by a new pod (docs/operations.md).
CRASH_LOOP_BACK_OFF: Final = "CrashLoopBackOff"
