"""The informer cache's indexes stay consistent with its content."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dynvol_kube.caching import IndexFunc, Obj, Store, object_key, split_key


def by_node(o: Obj) -> tuple[str, ...]:
    node = o["spec"]["nodeName"]
    return (node,) if node else ()


def by_app(o: Obj) -> tuple[str, ...]:
    app = (o["metadata"].get("labels") or {}).get("app")
    return (app,) if app is not None else ()


INDEXERS: dict[str, IndexFunc] = {"node": by_node, "app": by_app}


def obj(name: str, ns: str | None, node: str = "", app: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ns:
        meta["namespace"] = ns
    if app is not None:
        meta["labels"] = {"app": app}
    return {"metadata": meta, "spec": {"nodeName": node}}


def test_keys_round_trip() -> None:
    assert object_key(obj("a", "ns")) == "ns/a"
    assert object_key(obj("cluster", None)) == "cluster"
    assert split_key("ns/a") == ("ns", "a")
    assert split_key("cluster") == (None, "cluster")


ops = st.lists(
    st.tuples(
        st.booleans(),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["n1", "n2"]),
        st.sampled_from(["", "node-1", "node-2"]),
        st.sampled_from([None, "web", "db"]),
    ),
    max_size=30,
)


@given(ops)
def test_indexes_match_a_full_scan(
    operations: list[tuple[bool, str, str, str, str | None]],
) -> None:
    store = Store(INDEXERS)
    for put, name, ns, node, app in operations:
        if put:
            store.put(obj(name, ns, node, app))
        else:
            store.remove(f"{ns}/{name}")
    everything = list(store)
    for node in ("node-1", "node-2"):
        expected = {object_key(o) for o in everything if o["spec"]["nodeName"] == node}
        assert {object_key(o) for o in store.by_index("node", node)} == expected
    for app in ("web", "db"):
        expected = {
            object_key(o)
            for o in everything
            if (o["metadata"].get("labels") or {}).get("app") == app
        }
        assert {object_key(o) for o in store.by_index("app", app)} == expected
    for ns in ("n1", "n2"):
        expected = {object_key(o) for o in everything if o["metadata"]["namespace"] == ns}
        assert {object_key(o) for o in store.by_index("namespace", ns)} == expected
    assert store.by_index("node", "") == []
