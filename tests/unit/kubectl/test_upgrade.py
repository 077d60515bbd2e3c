"""Which DMPs ``kubectl dynvol upgrade-dmps`` moves, read from objects that may be malformed."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dynvol.kubectl.upgrade import outdated, plugin_images, table


def pod(node: str, image: str, *, phase: str = "Running", name: str = "p", **extra: Any) -> Any:
    container = {"name": extra.pop("container", "dmp"), "image": image, **extra}
    return {
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [container]},
        "status": {"phase": phase},
    }


def test_the_plugins_image_is_its_dmp_image_flag_else_its_own() -> None:
    plugins = [
        pod("a", "img:2", container="node"),
        pod("b", "img:2", container="node", args=["node", "--dmp-image=dmp:9"]),
        pod("c", "img:2", container="node", command=["dynvol", "node", "--dmp-image", "dmp:8"]),
        pod("d", "img:2", container="node", phase="Pending"),
    ]
    deleting = pod("e", "img:2", container="node")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert plugin_images([*plugins, deleting]) == {"a": "img:2", "b": "dmp:9", "c": "dmp:8"}


def test_outdated_dmps_in_node_then_name_order_and_by_node() -> None:
    images = {"a": "img:2", "b": "img:2"}
    dmps = [
        pod("b", "img:1", name="z"),
        pod("a", "img:1", name="y"),
        pod("a", "img:2", name="x"),  # current
        pod("a", "img:1", name="w", phase="Pending"),  # not running: the node plugin's to fix
        pod("c", "img:1", name="v"),  # no plugin known on c
    ]
    assert [d["metadata"]["name"] for d in outdated(dmps, images)] == ["y", "z"]
    assert [d["metadata"]["name"] for d in outdated(dmps, images, node="b")] == ["z"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.lists(json_values, max_size=4), st.lists(json_values, max_size=4))
def test_malformed_objects_are_skipped_never_fatal(plugins: list[Any], dmps: list[Any]) -> None:
    objs = [p for p in plugins if isinstance(p, dict)]
    images = plugin_images(objs)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in images.items())
    chosen = outdated([d for d in dmps if isinstance(d, dict)], images)
    assert all(isinstance(d, dict) for d in chosen)


def test_the_table_says_what_moved_and_when() -> None:
    report = {
        "dryRun": False,
        "dmps": [{"name": "dmp-1", "node": "a", "from": "img:1", "to": "img:2", "mounts": 2,
                  "running_after_s": 0.8, "mounted_after_s": 1.9}],
    }  # fmt: skip
    text = table(report)
    assert "img:1 -> img:2" in text
    assert "2 mount(s) Mounted again after 1.90s" in text
    assert "nothing to move" in table({"dryRun": True, "dmps": []})
    assert "dry run" in table({**report, "dryRun": True})
