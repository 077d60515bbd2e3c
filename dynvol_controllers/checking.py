"""Which claims the node can mount at all: their provider is installed and takes their config.

The validating webhook normally refuses such claims earlier; a claim that got through (the
webhook was down, or the provider plugin is blocked on this node) is never mounted, and
the reason is logged once per claim generation. Part of the node reconciler's process
stage (:mod:`.nodes`), before planning.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

from dynvol_core.errors import DynvolError
from dynvol_core.models import DynamicVolumeClaim, thaw_json

__all__ = ["ProviderCheck"]

log = logging.getLogger(__name__)

#: Verdicts kept before the memo starts afresh (it only saves re-parsing).
_MEMO_SIZE = 10_000


@attrs.define(eq=False)
class ProviderCheck:
    """Whether a claim's provider is installed and accepts its config (memoised).

    ``registry`` is a dynvol_providers ProviderRegistry; without one every claim passes.
    """

    registry: Any
    node_name: str = ""
    _verdicts: dict[tuple[str, int], bool] = attrs.field(factory=dict, init=False)

    def usable(self, claim: DynamicVolumeClaim) -> bool:
        """Whether ``claim`` can be mounted here."""
        if self.registry is None:
            return True
        key = (claim.uid, claim.generation)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._check(claim)
            if len(self._verdicts) > _MEMO_SIZE:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _check(self, claim: DynamicVolumeClaim) -> bool:
        try:
            provider = self.registry.get(claim.storage_provider)
            provider.parse_config(thaw_json(claim.provider_config.values), parameters={})
        except DynvolError as exc:
            log.info(
                "node %s: claim %s/%s is not mounted: %s",
                self.node_name, claim.namespace, claim.name, exc,
            )  # fmt: skip
            return False
        return True
