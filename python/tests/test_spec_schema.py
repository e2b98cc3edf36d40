"""The canonical node document: what ``qimg.spec`` writes is what the core's schema reads.

Random trees of every node kind are built from the dataclasses of ``qimg.spec`` and written
with :meth:`NodeSpec.to_core_json`; ``_core.canonical_spec`` must read each one and give it
back unchanged, and must refuse it with one unknown key added to any of its objects or one
required key taken out of any of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qimg import _core
from qimg.errors import InvalidOptionError
from qimg.spec import (
    BACKING_DEFAULT,
    MAX_NODE_NAME,
    BlkdebugEvent,
    BlkdebugNode,
    BlkdebugRule,
    FileNode,
    InetAddress,
    IoType,
    NbdNode,
    Node,
    NodeSpec,
    ProbeNode,
    Qcow2Node,
    QuorumNode,
    RawNode,
    ReadPattern,
    UnixAddress,
)

# The pass hook (enable_assertion_pass_hook) explains hypothesis's own passing asserts, so it
# prints the strategies of nested trees once each, and hypothesis warns that they are long.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

#: qimg.spec's node-name rule.
NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")

#: Keys the schema lets a document leave out (each has a default).
OPTIONAL = {"export", "timeout", "connections", "backing", "inject-error", "iotype"}

# Few choices per value: under this project's pytest settings (enable_assertion_pass_hook)
# every passing assert inside hypothesis is explained, so each choice drawn is costly.
names = st.builds(
    str.__add__,
    st.sampled_from("aZq"),
    st.sampled_from(["", "0", "_x", ".file", "-9", "children.1.image", "x" * (MAX_NODE_NAME - 1)]),
)
#: File names, hosts, paths, exports: with what JSON escapes, and beyond ASCII.
texts = st.sampled_from(
    ["", "a.raw", "/tmp/x y", 'q"uote', "back\\slash", "l\ni\tne", "nul\x00", "é€😀"]
)

files = st.builds(FileNode, names, texts)
inets = st.builds(InetAddress, texts, st.integers(0, 65535))
unixes = st.builds(UnixAddress, texts)


def nbds(servers: st.SearchStrategy[InetAddress | UnixAddress]) -> st.SearchStrategy[NbdNode]:
    return st.builds(
        NbdNode,
        names,
        servers,
        st.none() | texts,
        st.integers(1, 86400),
        st.none() | st.integers(1, 16),
    )


exports = nbds(inets | unixes)


def rules(
    events: st.SearchStrategy[BlkdebugEvent], iotypes: st.SearchStrategy[IoType | None]
) -> st.SearchStrategy[BlkdebugRule]:
    return st.builds(
        BlkdebugRule,
        events,
        iotypes,
        st.integers(1, 2**31 - 1),
        st.integers(-1, 2**63 - 1),
        st.booleans(),
    )


any_rule = rules(st.sampled_from(BlkdebugEvent), st.none() | st.sampled_from(IoType))


def blkdebugs(images: st.SearchStrategy[Node]) -> st.SearchStrategy[BlkdebugNode]:
    return st.builds(BlkdebugNode, names, images, st.lists(any_rule, max_size=2).map(tuple))


#: What a format node's ``file`` may be: a file or an export under any number of blkdebugs.
protocols: st.SearchStrategy[FileNode | NbdNode | BlkdebugNode] = st.recursive(
    files | exports, blkdebugs, max_leaves=2
)
formats = st.one_of(
    st.builds(RawNode, names, files | exports),
    st.builds(Qcow2Node, names, protocols, st.sampled_from([BACKING_DEFAULT, None])),
    st.builds(ProbeNode, names, protocols, st.booleans()),
)


@st.composite
def quorums(draw: st.DrawFn, children: st.SearchStrategy[Node]) -> QuorumNode:
    members = draw(st.lists(children, min_size=1, max_size=3))
    return QuorumNode(
        draw(names),
        tuple(members),
        draw(st.integers(1, len(members))),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.sampled_from(ReadPattern)),
    )


def _above(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    return st.one_of(
        quorums(children),
        blkdebugs(children),
        st.builds(Qcow2Node, names, protocols, children),
    )


#: Random trees: the leaves are files, exports and format nodes over them; above them quorums
#: of mixed children, blkdebugs and qcow2 nodes with a backing node.
trees: st.SearchStrategy[Node] = st.recursive(files | exports | formats, _above, max_leaves=4)


#: One rule for each iotype (and for None), the events taken in turn: every event comes up.
_every_rule = st.tuples(
    *(
        rules(st.just(list(BlkdebugEvent)[i % len(BlkdebugEvent)]), st.just(iotype))
        for i, iotype in enumerate([None, *IoType])
    )
)
_one_of_each = st.tuples(
    files,
    nbds(inets),
    nbds(unixes),
    st.builds(RawNode, names, files | exports),
    st.builds(Qcow2Node, names, blkdebugs(files | exports), st.just(BACKING_DEFAULT)),
    st.builds(Qcow2Node, names, files, st.none()),
    st.builds(Qcow2Node, names, files, trees),
    st.builds(ProbeNode, names, protocols, st.just(True)),
    st.builds(ProbeNode, names, files, st.just(False)),
    st.builds(BlkdebugNode, names, trees, _every_rule),
    quorums(files | exports | formats),
)


@st.composite
def every_kind(draw: st.DrawFn) -> QuorumNode:
    """A quorum over a child of every kind (in random order, random trees among them):
    every node kind, server type, qcow2 and probe backing, blkdebug event and iotype."""
    # Only strategies made once are drawn from: hypothesis computes the repr of each new one,
    # and those of nested trees are large.
    children: list[Node] = list(draw(_one_of_each))
    order = draw(st.permutations(range(len(children))))
    return QuorumNode(
        draw(names),
        tuple(children[i] for i in order),
        draw(st.integers(1, len(children))),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.sampled_from(ReadPattern)),
    )


def walk(doc: Any, at: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The path of every object of ``doc``: nodes, servers, rules."""
    if isinstance(doc, dict):
        yield at
        for key, value in doc.items():
            yield from walk(value, (*at, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from walk(value, (*at, index))


def at(doc: Any, path: tuple[str | int, ...]) -> dict[str, Any]:
    for step in path:
        doc = doc[step]
    assert isinstance(doc, dict)
    return doc


def exact(text: str) -> str:
    """``text`` as parsed JSON, printed so that true and 1 differ (they compare equal)."""
    return json.dumps(json.loads(text), sort_keys=True)


def core_json(node: Node) -> str:
    return NodeSpec(node).to_core_json()


def refusal(doc: Any) -> str:
    with pytest.raises(InvalidOptionError) as caught:
        _core.canonical_spec(json.dumps(doc))
    message = str(caught.value)
    assert message.startswith("Invalid node specification: "), message
    return message


def gives_back(node: Node) -> None:
    doc = core_json(node)
    back = _core.canonical_spec(doc)
    assert exact(back) == exact(doc)
    assert all(NODE_NAME.fullmatch(n.node_name) for n in NodeSpec(node).nodes())


@settings(max_examples=30, deadline=None)
@given(trees)
def test_the_core_gives_back_every_tree(node: Node) -> None:
    gives_back(node)


NODES = (FileNode, NbdNode, RawNode, Qcow2Node, ProbeNode, QuorumNode, BlkdebugNode)


def features(node: Node) -> set[object]:
    """What ``node``'s tree holds: node and server classes, kinds of backing, rule values."""
    found: set[object] = set()
    for n in NodeSpec(node).nodes():
        found.add(type(n))
        if isinstance(n, NbdNode):
            found.add(type(n.server))
        elif isinstance(n, Qcow2Node):
            backing = n.backing
            found.add(f"qcow2 backing {'node' if isinstance(backing, NODES) else backing}")
        elif isinstance(n, ProbeNode):
            found.add(f"probe open_backing={n.open_backing}")
        elif isinstance(n, BlkdebugNode):
            found.update(x for r in n.inject_error for x in (r.event, r.iotype))
    return found


@settings(max_examples=6, deadline=None)
@given(every_kind())
def test_the_core_gives_back_every_kind_in_one_document(node: QuorumNode) -> None:
    gives_back(node)
    # The refusals below are only as good as the documents they see.
    wanted: list[object] = [
        *NODES,
        InetAddress,
        UnixAddress,
        f"qcow2 backing {BACKING_DEFAULT}",
        "qcow2 backing None",
        "qcow2 backing node",
        "probe open_backing=True",
        "probe open_backing=False",
        *BlkdebugEvent,
        *IoType,
        None,
    ]
    found = features(node)
    assert [f for f in wanted if f not in found] == []


@settings(max_examples=6, deadline=None)
@given(every_kind())
def test_an_unknown_key_in_any_object_is_refused(node: Node) -> None:
    doc = json.loads(core_json(node))
    for path in walk(doc):
        bad = json.loads(json.dumps(doc))
        at(bad, path)["no-such-option"] = 1
        assert "unknown field `no-such-option`" in refusal(bad), path


@settings(max_examples=6, deadline=None)
@given(every_kind())
def test_a_missing_required_key_in_any_object_is_refused(node: Node) -> None:
    doc = json.loads(core_json(node))
    for path in walk(doc):
        for key in list(at(doc, path)):
            less = json.loads(json.dumps(doc))
            del at(less, path)[key]
            if key in OPTIONAL:
                _core.canonical_spec(json.dumps(less))
            else:
                assert f"missing field `{key}`" in refusal(less), (path, key)
