#!/usr/bin/env python3
"""The Python side of the image build's reproducibility, run inside the Dockerfile's build stage.

    python3 pinned.py requirements pyproject.toml [EXTRA...]
                                                    print the project's runtime requirements
                                                    (and those of its extras EXTRA...)
    python3 pinned.py check constraints.txt         fail unless every installed distribution
                                                    is pinned there at its installed version
    python3 pinned.py complete                      fail if an installed distribution needs
                                                    one that is not installed (after the
                                                    build tools are removed)

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by canonical name."""
    found: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise SystemExit(f"pinned: {line!r} is not of the form name==version")
        found[canonical(name.strip())] = version.strip()
    return found


def unpinned(installed: dict[str, str], pinned: dict[str, str], *, own: str) -> list[str]:
    """Installed distributions (other than the project itself) not pinned at their version."""
    problems = []
    for name, version in sorted(installed.items()):
        if name == canonical(own):
            continue
        want = pinned.get(name)
        if want is None:
            problems.append(f"{name} {version} is not pinned by the constraints")
        elif want != version:
            problems.append(f"{name} {version} is installed but the constraints pin {want}")
    return problems


def missing(requires: dict[str, list[str]], installed: set[str]) -> list[str]:
    """Unconditional requirements (no environment marker) naming no installed distribution.
    Requirements with markers are left out: without ``packaging`` they cannot be evaluated."""
    problems = []
    for dist, lines in sorted(requires.items()):
        for line in lines:
            if ";" in line:
                continue
            name = canonical(re.split(r"[\s<>=!~\[(]", line.strip(), maxsplit=1)[0])
            if name and name not in installed:
                problems.append(f"{dist} needs {name}, which is not installed")
    return problems


def installed_distributions() -> dict[str, importlib.metadata.Distribution]:
    return {canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions()}


def main(argv: list[str]) -> int:
    if argv == ["complete"]:
        dists = installed_distributions()
        problems = missing({n: d.requires or [] for n, d in dists.items()}, set(dists))
        for problem in problems:
            print(f"pinned: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if argv[:1] == ["requirements"] and len(argv) >= 2:
        project = tomllib.loads(Path(argv[1]).read_text())["project"]
        extras = project.get("optional-dependencies", {})
        unknown = [e for e in argv[2:] if e not in extras]
        if unknown:
            print(f"pinned: no extra {', '.join(unknown)} in {argv[1]}", file=sys.stderr)
            return 2
        wanted = list(project["dependencies"])
        for extra in argv[2:]:
            wanted += [r for r in extras[extra] if r not in wanted]
        print("\n".join(wanted))
        return 0
    if len(argv) != 2 or argv[0] != "check":
        print(__doc__, file=sys.stderr)
        return 2
    path = argv[1]
    installed = {name: dist.version for name, dist in installed_distributions().items()}
    problems = unpinned(installed, pins(Path(path).read_text()), own="dynvol")
    for problem in problems:
        print(f"pinned: {problem}", file=sys.stderr)
    if problems:
        print(f"pinned: add the pins to {path} (name==version)", file=sys.stderr)
        return 1
    print(f"pinned: all {len(installed)} distributions are pinned", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
