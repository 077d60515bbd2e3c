"""Events for claims that select a pod but do not mount into it, once per reason.

Report stage of the node reconciler (:mod:`.nodes`): after each pass, every rejected
claim x pod pair of the plan (:attr:`dynvol_core.dispatch.NodePlan.matches`) gets one
Warning Event on the pod, with the reason (``ProviderMismatch``, ``MountpointConflict``,
...) and what to change; a pair is reported again only if its reason changes.
"""

from __future__ import annotations

import attrs

from dynvol_core.dispatch import NodePlan
from dynvol_kube import WARNING, EventRecorder

__all__ = ["RejectionReporter"]

#: Pairs remembered before the memo starts afresh (a repeat then costs one more Event).
_MEMO_SIZE = 100_000


@attrs.define(eq=False)
class RejectionReporter:
    """Record one Warning Event per rejected (pod, claim, reason)."""

    recorder: EventRecorder
    _reported: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)

    def report(self, plan: NodePlan) -> None:
        """Report the plan's rejected pairs not reported before."""
        for m in plan.matches:
            if m.ok or m.reason is None:
                continue
            key = (m.pod.uid, m.claim.uid, str(m.reason))
            if key in self._reported:
                continue
            self._reported.add(key)
            pod_ref = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": m.pod.name, "namespace": m.pod.namespace, "uid": m.pod.uid},
            }
            self.recorder.record(
                pod_ref, WARNING, str(m.reason), f"claim {m.claim.name}: {m.message}"
            )
        if len(self._reported) > _MEMO_SIZE:
            self._reported.clear()
