"""The pictures in docs/images are rendered from their current sources (make docs-images).

Each SVG records the SHA-256 of the Graphviz source it was made from; this test needs no
Graphviz. It also checks that each SVG is well-formed and shows its source's labels, so a
hand-edited or truncated picture fails too.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_script

TOP = Path(__file__).resolve().parents[2]
IMAGES = TOP / "docs" / "images"
SOURCES = sorted((IMAGES / "src").glob("*.dot"))


def _renderer() -> ModuleType:
    return load_script("render_docs_images", IMAGES / "render.py")


def test_there_are_pictures_and_every_one_is_current() -> None:
    assert {s.stem for s in SOURCES} >= {"architecture", "propagation"}
    assert _renderer().stale() == []


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_each_svg_is_well_formed_and_shows_its_labels(source: Path) -> None:
    svg = (IMAGES / f"{source.stem}.svg").read_text()
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = (t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    shown = " ".join(" ".join(texts).split())
    for label in re.findall(r'label="([^"]+)"', source.read_text()):
        for line in label.split("\\n"):
            # Graphviz writes each line of a label as one text element.
            wanted = " ".join(line.split())
            assert wanted in shown, f"{wanted!r} is not in {source.stem}.svg"


def test_a_changed_source_makes_its_svg_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    render = _renderer()
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "architecture.dot"
    source.write_text((IMAGES / "src" / "architecture.dot").read_text() + "// changed\n")
    (tmp_path / "architecture.svg").write_text((IMAGES / "architecture.svg").read_text())
    monkeypatch.setattr(render, "HERE", tmp_path)
    monkeypatch.setattr(render, "SOURCES", tmp_path / "src")
    assert render.stale() == [
        "docs/images/architecture.svg is older than docs/images/src/architecture.dot"
    ]
