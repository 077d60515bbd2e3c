"""Load a repository script that is not part of an installed package (hack/, bench/, docs/)
as a module, for the tests of its pure helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(name: str, path: Path) -> ModuleType:
    """Import the file ``path`` as the module ``name`` (registered in ``sys.modules``, which
    dataclasses look their module up in while they are made)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
