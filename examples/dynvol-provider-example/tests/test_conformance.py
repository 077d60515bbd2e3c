"""The dynvol conformance suite, run on the example provider."""

from __future__ import annotations

import pytest

from dynvol_providers.testing import ConformanceCase, ProviderConformance


class TestTmpfsProvider(ProviderConformance):
    provider_name = "tmpfs"

    @pytest.fixture
    def dynvol_case(self) -> ConformanceCase:
        return ConformanceCase(
            config={"size": "8Mi"},
            invalid_configs=[({"size": "lots"}, "size"), ({"mode": "rwx"}, "mode")],
        )
