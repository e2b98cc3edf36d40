"""Image specifications (qimg.spec): every spelling of a node tree, the canonical JSON the
core opens, what qemu-img prints as the image's name, and every refusal.

The accept/reject decisions are compared with qemu-img 10's on the same ``json:`` and
``--image-opts`` strings; where qimg decides differently on purpose, the test says so.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import NbdServer, StartNbd
from qimg.errors import InvalidOptionError, UsageError
from qimg.names import is_plain_filename
from qimg.spec import (
    BACKING_DEFAULT,
    BlkdebugEvent,
    BlkdebugNode,
    BlkdebugRule,
    FileNode,
    InetAddress,
    IoType,
    NbdNode,
    NodeSpec,
    ProbeNode,
    Qcow2Node,
    QuorumNode,
    RawNode,
    ReadPattern,
    UnixAddress,
    parse_image_opts,
    parse_spec,
)

RunCommand: TypeAlias = Callable[..., subprocess.CompletedProcess[str]]


def raw(name: str) -> dict[str, Any]:
    return {"driver": "raw", "file": {"driver": "file", "filename": name}}


def quorum_json(*names: str, **options: Any) -> str:
    tree = {"driver": "quorum", **options, "children": [raw(n) for n in names]}
    return "json:" + json.dumps(tree)


# --- the spellings ------------------------------------------------------------------------

THREE_WAY_CORE = {
    "driver": "quorum",
    "node-name": "root",
    "children": [
        {
            "driver": "raw",
            "node-name": f"children.{i}",
            "file": {"driver": "file", "node-name": f"children.{i}.file", "filename": name},
        }
        for i, name in enumerate(["a.raw", "b.raw", "c.raw"])
    ],
    "vote-threshold": 2,
    "blkverify": False,
    "rewrite-corrupted": False,
    "read-pattern": "quorum",
}


@pytest.mark.parametrize(
    ("text", "image_opts"),
    [
        (quorum_json("a.raw", "b.raw", "c.raw", **{"vote-threshold": 2}), False),
        (
            'json:{"driver": "quorum", "vote-threshold": 2, "children": ['
            '{"driver": "raw", "file.driver": "file", "file.filename": "a.raw"}, '
            '{"driver": "raw", "file": {"filename": "b.raw"}}, '
            '{"driver": "raw", "file.filename": "c.raw"}]}',
            False,
        ),
        (
            'json:{"driver": "quorum", "vote-threshold": 2, '
            '"children.0.driver": "raw", "children.0.file.filename": "a.raw", '
            '"children.1": {"driver": "raw", "file.filename": "b.raw"}, '
            '"children.2.driver": "raw", "children.2.file": {"filename": "c.raw"}}',
            False,
        ),
        (
            'json:{"driver": "quorum", "vote-threshold": 2, "children": {'
            '"0": {"driver": "raw", "file": {"filename": "a.raw"}}, '
            '"1": {"driver": "raw", "file": {"filename": "b.raw"}}, '
            '"2": {"driver": "raw", "file": {"filename": "c.raw"}}}}',
            False,
        ),
        (quorum_json("a.raw", "b.raw", "c.raw", **{"vote-threshold": "2"}), False),
        (
            "driver=quorum,vote-threshold=2,"
            "children.0.driver=raw,children.0.file.filename=a.raw,"
            "children.1.driver=raw,children.1.file.driver=file,children.1.file.filename=b.raw,"
            "children.2.driver=raw,children.2.file.filename=c.raw",
            True,
        ),
        (
            # A later duplicate wins, as in every qemu option list.
            "driver=quorum,vote-threshold=3,"
            "children.0.driver=raw,children.0.file.filename=a.raw,"
            "children.1.driver=raw,children.1.file.filename=b.raw,"
            "children.2.driver=raw,children.2.file.filename=c.raw,vote-threshold=2",
            True,
        ),
    ],
)
def test_every_spelling_of_a_three_way_quorum_gives_the_same_tree(
    text: str, image_opts: bool
) -> None:
    assert parse_spec(text, image_opts=image_opts).core_dict() == THREE_WAY_CORE


def test_nested_and_dotted_mappings_give_the_same_tree() -> None:
    nested = {"driver": "quorum", "vote-threshold": 2, "children": [raw(n) for n in "abc"]}
    dotted: dict[str, Any] = {"driver": "quorum", "vote-threshold": 2}
    for i, n in enumerate("abc"):
        dotted[f"children.{i}.driver"] = "raw"
        dotted[f"children.{i}.file.filename"] = n
    assert parse_spec(nested).core_dict() == parse_spec(dotted).core_dict()


def test_mapping_values_may_be_path_objects(tmp_path: Path) -> None:
    spec = parse_spec({"driver": "raw", "file": {"filename": tmp_path / "x.raw"}})
    assert spec.root == RawNode("root", FileNode("file", str(tmp_path / "x.raw")))


def test_typed_tree() -> None:
    spec = parse_spec(
        'json:{"driver": "quorum", "vote-threshold": 1, "read-pattern": "fifo", '
        '"node-name": "q", "children": [{"driver": "qcow2", "node-name": "disk0", '
        '"file": {"filename": "a.qcow2"}, "backing": null}, '
        '{"driver": "blkdebug", "image": {"file": {"filename": "b.img"}}, '
        '"inject-error": [{"event": "read_aio", "iotype": "read", "errno": 28, '
        '"sector": 8, "once": true}]}]}'
    )
    assert spec.root == QuorumNode(
        "q",
        (
            Qcow2Node("disk0", FileNode("children.0.file", "a.qcow2"), None),
            BlkdebugNode(
                "children.1",
                ProbeNode("children.1.image", FileNode("children.1.image.file", "b.img")),
                (BlkdebugRule(BlkdebugEvent.READ_AIO, IoType.READ, 28, 8, True),),
            ),
        ),
        vote_threshold=1,
        read_pattern=ReadPattern.FIFO,
    )
    assert [n.node_name for n in spec.nodes()] == [
        "q",
        "disk0",
        "children.0.file",
        "children.1",
        "children.1.image",
        "children.1.image.file",
    ]
    assert spec.node("disk0") == spec.root.children[0]
    assert [n.node_name for n in spec.probe_nodes()] == ["children.1.image"]


def test_blkdebug_rule_defaults() -> None:
    spec = parse_spec(
        'json:{"driver": "blkdebug", "image": {"driver": "file", "filename": "x"}, '
        '"inject-error": [{"event": "write_aio"}, {"event": "flush_to_disk", "immediately": "on"}]}'
    )
    assert spec.core_dict()["inject-error"] == [
        {"event": "write_aio", "iotype": None, "errno": 5, "sector": -1, "once": False},
        {"event": "flush_to_disk", "iotype": None, "errno": 5, "sector": -1, "once": False},
    ]


def test_qcow2_backing_default_null_and_node() -> None:
    base = 'json:{"driver": "qcow2", "file": {"filename": "top.qcow2"}'
    assert parse_spec(base + "}").root.backing is BACKING_DEFAULT  # type: ignore[union-attr]
    assert parse_spec(base + ', "backing": null}').core_dict()["backing"] is None
    # QEMU's older spelling of null, the only one --image-opts has.
    assert parse_spec(base + ', "backing": ""}').core_dict()["backing"] is None
    opts = parse_spec("driver=qcow2,file.filename=top.qcow2,backing=", image_opts=True)
    assert opts.core_dict()["backing"] is None
    below = parse_spec(base + ', "backing": {"driver": "raw", "file": {"filename": "b.raw"}}}')
    assert below.core_dict()["backing"] == {
        "driver": "raw",
        "node-name": "backing",
        "file": {"driver": "file", "node-name": "backing.file", "filename": "b.raw"},
    }


def test_to_core_json_is_the_core_dict_as_json() -> None:
    spec = parse_spec(quorum_json("a", "b", **{"vote-threshold": 1}))
    assert json.loads(spec.to_core_json()) == spec.core_dict()
    assert " " not in spec.to_core_json()


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "threshold"),
    [
        ("3", 3),
        (" 3", 3),
        ("+3", 3),
        ("0x3", 3),
        ("03", 3),
        ("010", 8),  # a leading 0 is octal, as QEMU reads numbers
        (3, 3),
        (3.0, 3),
    ],
)
def test_vote_threshold_spellings(value: object, threshold: int) -> None:
    children = [raw(str(i)) for i in range(9)]
    spec = parse_spec({"driver": "quorum", "vote-threshold": value, "children": children})
    assert spec.root.vote_threshold == threshold  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("on", True),
        ("yes", True),
        ("true", True),
        ("y", True),
        ("off", False),
        ("no", False),
        ("false", False),
        ("n", False),
        (None, False),
    ],
)
def test_boolean_spellings(value: object, expected: bool) -> None:
    spec = parse_spec(
        {
            "driver": "quorum",
            "vote-threshold": 2,
            "blkverify": value,
            "children": [raw("a"), raw("b")],
        }
    )
    assert spec.root.blkverify is expected  # type: ignore[union-attr]


def test_image_opts_commas_are_doubled_in_values() -> None:
    spec = parse_spec("driver=raw,file.filename=a,,b.raw", image_opts=True)
    assert spec.root == RawNode("root", FileNode("file", "a,b.raw"))
    assert parse_image_opts("a=1,b=x,,y,,,c=") == {"a": "1", "b": "x,y,", "c": ""}


def test_image_opts_trailing_comma_is_accepted() -> None:
    assert parse_image_opts("driver=file,filename=a,") == {"driver": "file", "filename": "a"}


def test_fmt_replaces_the_json_driver_as_qemu_img_f_does() -> None:
    spec = parse_spec('json:{"driver": "qcow2", "file": {"filename": "x"}}', format="raw")
    assert spec.root == RawNode("root", FileNode("file", "x"))
    spec = parse_spec('json:{"file": {"filename": "x"}}', format="qcow2")
    assert isinstance(spec.root, Qcow2Node)


def test_plain_file_names() -> None:
    assert is_plain_filename("a.qcow2")
    assert is_plain_filename(Path("json:x"))
    assert not is_plain_filename("json:{}")
    assert not is_plain_filename({"driver": "file"})
    spec = parse_spec("dir/a.qcow2")
    assert spec.is_plain
    assert spec.root == ProbeNode("root", FileNode("file", "dir/a.qcow2"))
    assert spec.display_name() == "dir/a.qcow2"
    assert parse_spec("a", format="qcow2").root == Qcow2Node("root", FileNode("file", "a"))
    assert parse_spec("a", format="raw").plain_format == "raw"
    assert parse_spec(spec) is spec


# --- node names ---------------------------------------------------------------------------


def test_generated_node_names_are_dotted_paths() -> None:
    spec = parse_spec(
        'json:{"driver": "blkdebug", "image": {"driver": "quorum", "vote-threshold": 1, '
        '"children": [{"driver": "qcow2", "file": {"filename": "a"}, '
        '"backing": {"driver": "raw", "file": {"filename": "b"}}}]}}'
    )
    assert [n.node_name for n in spec.nodes()] == [
        "root",
        "image",
        "image.children.0",
        "image.children.0.file",
        "image.children.0.backing",
        "image.children.0.backing.file",
    ]


@pytest.mark.parametrize("name", ["a", "drive-2", "x.y_z", "A" * 31])
def test_valid_node_names(name: str) -> None:
    spec = parse_spec({"driver": "raw", "node-name": name, "file": {"filename": "x"}})
    assert spec.root.node_name == name


def test_raw_over_blkdebug_becomes_blkdebug_over_raw_and_keeps_its_place_name() -> None:
    spec = parse_spec(
        'json:{"driver": "quorum", "vote-threshold": 1, "children": [{"driver": "raw", '
        '"file": {"driver": "blkdebug", "inject-error": [{"event": "read_aio"}], '
        '"image": {"driver": "file", "filename": "a.raw"}}}]}'
    )
    assert spec.core_dict()["children"] == [
        {
            "driver": "blkdebug",
            "node-name": "children.0",
            "image": {
                "driver": "raw",
                "node-name": "children.0.file",
                "file": {
                    "driver": "file",
                    "node-name": "children.0.file.image",
                    "filename": "a.raw",
                },
            },
            "inject-error": [
                {"event": "read_aio", "iotype": None, "errno": 5, "sector": -1, "once": False}
            ],
        }
    ]


# --- refusals -----------------------------------------------------------------------------

C2 = (
    '"children": [{"driver": "raw", "file": {"filename": "a.raw"}}, '
    '{"driver": "raw", "file": {"filename": "b.raw"}}]'
)
BLKDEBUG = '"driver": "blkdebug", "image": {"driver": "file", "filename": "a.raw"}'

#: Specs qimg refuses, with the message (QEMU's own words where QEMU has them).
REFUSED_JSON: list[tuple[str, str]] = [
    ('{"driver": "nope", "filename": "a"}', "Unknown driver 'nope'"),
    ('{"driver": "Raw", "file": {"filename": "a"}}', "Unknown driver 'Raw'"),
    ('{"filename": "a.raw"}', "Must specify either driver or file"),
    ("{}", "Must specify either driver or file"),
    ('{"driver": "raw"}', 'A block device must be specified for "file"'),
    ('{"driver": "qcow2", "filename": "a"}', 'A block device must be specified for "file"'),
    ('{"driver": "file"}', "The 'file' block driver requires a file name"),
    (
        '{"driver": "raw", "file": {"driver": "file", "filename": 5}}',
        "The 'file' block driver requires a file name",
    ),
    (
        '{"driver": "raw", "file": {"filename": "a"}, "bogus": 1}',
        "Block format 'raw' does not support the option 'bogus'",
    ),
    (
        '{"driver": "raw", "file": {"filename": "a", "bogus": 1}}',
        "Block protocol 'file' doesn't support the option 'bogus' (at file)",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2, "bogus": 1, ' + C2 + "}",
        "Block format 'quorum' does not support the option 'bogus'",
    ),
    (f'{{{BLKDEBUG}, "bogus": 1}}', "Block protocol 'blkdebug' doesn't support the option 'bogus'"),
    ('{"driver": "raw", "file": "a.raw"}', "Cannot find device='a.raw' nor node-name='a.raw'"),
    (
        '{"driver": "quorum", "vote-threshold": 1, "children": ["a.raw"]}',
        "Cannot find device='a.raw' nor node-name='a.raw'",
    ),
    (
        '{"driver": "raw", "file": {"filename": "a"}, "file.filename": "b"}',
        "Option 'file.filename' is given twice",
    ),
    ('{"driver": "raw", "driver": "qcow2"}', "JSON parse error, duplicate key 'driver'"),
    ('{"driver": ', "Could not parse the json: specification"),
    ("[1]", "A json: specification must be a JSON object"),
    # quorum
    ('{"driver": "quorum", "vote-threshold": 2}', "Number of provided children must be 1 or more"),
    (
        '{"driver": "quorum", "vote-threshold": 2, "children": []}',
        "Number of provided children must be 1 or more",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2, "children": "x"}',
        "Parameter 'children' expects a list of nodes",
    ),
    ('{"driver": "quorum", ' + C2 + "}", "Parameter 'vote-threshold' expects a value >= 1"),
    (
        '{"driver": "quorum", "vote-threshold": 0, ' + C2 + "}",
        "Parameter 'vote-threshold' expects a value >= 1",
    ),
    (
        '{"driver": "quorum", "vote-threshold": -1, ' + C2 + "}",
        "Parameter 'vote-threshold' expects a value >= 1",
    ),
    (
        '{"driver": "quorum", "vote-threshold": null, ' + C2 + "}",
        "Parameter 'vote-threshold' expects a value >= 1",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 3, ' + C2 + "}",
        "threshold may not exceed children count (vote-threshold=3, 2 children)",
    ),
    (
        '{"driver": "quorum", "vote-threshold": true, ' + C2 + "}",
        "Parameter 'vote-threshold' expects a number",
    ),
    (
        '{"driver": "quorum", "vote-threshold": "two", ' + C2 + "}",
        "Parameter 'vote-threshold' expects a number",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2.5, ' + C2 + "}",
        "Parameter 'vote-threshold' expects a number",
    ),
    (
        '{"driver": "quorum", "vote-threshold": "08", ' + C2 + "}",
        "Parameter 'vote-threshold' expects a number",
    ),
    (
        '{"driver": "quorum", "vote-threshold": "1k", ' + C2 + "}",
        "Parameter 'vote-threshold' expects a number",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 1, "blkverify": true, ' + C2 + "}",
        "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 1, "blkverify": true, "children": [{"driver": '
        '"file", "filename": "a"}]}',
        "blkverify=on can only be set if there are exactly two files",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2, "blkverify": 1, ' + C2 + "}",
        "Parameter 'blkverify' expects 'on' or 'off'",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2, "blkverify": "On", ' + C2 + "}",
        "Parameter 'blkverify' expects 'on' or 'off'",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2, "blkverify": "1", ' + C2 + "}",
        "Parameter 'blkverify' expects 'on' or 'off'",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2, "blkverify": true, "rewrite-corrupted": true, '
        + C2
        + "}",
        "rewrite-corrupted=on cannot be used with blkverify=on",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2, "read-pattern": "xx", ' + C2 + "}",
        "Please set read-pattern as fifo or quorum",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2, "read-pattern": 1, ' + C2 + "}",
        "Please set read-pattern as fifo or quorum",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 1, "children.1": {"driver": "file", "filename": '
        '"a"}}',
        "Option children is not a valid array",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 1, "children.00.driver": "file", '
        '"children.00.filename": "a"}',
        "Option children is not a valid array",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 1, "children": [{"filename": "a.raw"}]}',
        "Must specify either driver or file (at children.0)",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 1, "children": [{"driver": "raw", "filename": '
        '"a.raw"}]}',
        'A block device must be specified for "file" (at children.0)',
    ),
    # node names
    (
        '{"driver": "raw", "file": {"filename": "a"}, "node-name": "1abc"}',
        "Invalid node-name: '1abc'",
    ),
    (
        '{"driver": "raw", "file": {"filename": "a"}, "node-name": "a b"}',
        "Invalid node-name: 'a b'",
    ),
    ('{"driver": "raw", "file": {"filename": "a"}, "node-name": ""}', "Invalid node-name: ''"),
    ('{"driver": "raw", "file": {"filename": "a"}, "node-name": 5}', "Invalid node-name: '5'"),
    (
        '{"driver": "raw", "file": {"filename": "a"}, "node-name": "' + "a" * 32 + '"}',
        "Node name too long",
    ),
    (
        '{"driver": "raw", "file": {"filename": "a", "node-name": "x"}, "node-name": "x"}',
        "Duplicate nodes with node-name='x'",
    ),
    # blkdebug
    ('{"driver": "blkdebug"}', 'A block device must be specified for "image"'),
    (f'{{{BLKDEBUG}, "inject-error": [{{"event": "nope"}}]}}', "invalid parameter value: nope"),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"errno": 5}}]}}',
        "Missing event name for rule (at inject-error.0)",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "iotype": "bogus"}}]}}',
        "invalid parameter value: bogus",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "errno": "x"}}]}}',
        "Parameter 'errno' expects a number",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "sector": "x"}}]}}',
        "Parameter 'sector' expects a number",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "once": "x"}}]}}',
        "Parameter 'once' expects 'on' or 'off'",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "bogus": 1}}]}}',
        "[inject-error] section doesn't support the option 'bogus'",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": []}}',
        "Block protocol 'blkdebug' doesn't support the option 'inject-error'",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": "x"}}',
        "Block protocol 'blkdebug' doesn't support the option 'inject-error'",
    ),
]

#: What qemu-img accepts and qimg refuses on purpose (by name, never silently ignored).
REFUSED_ON_PURPOSE: list[tuple[str, str]] = [
    ('{"driver": "null-co"}', "Driver 'null-co' is not supported by qimg"),
    ('{"driver": "vvfat", "dir": "/tmp"}', "Driver 'vvfat' is not supported by qimg"),
    (
        '{"driver": "qcow2", "file": {"filename": "q.qcow2"}, "data-file": "x"}',
        "Option 'data-file' of driver 'qcow2' is not supported by qimg (external data files are "
        "not supported)",
    ),
    (
        '{"driver": "qcow2", "file": {"filename": "q.qcow2"}, "l2-cache-size": "1M"}',
        "Option 'l2-cache-size' of driver 'qcow2' is not supported by qimg",
    ),
    (
        '{"driver": "raw", "file": {"filename": "a.raw"}, "offset": 512}',
        "Option 'offset' of driver 'raw' is not supported by qimg",
    ),
    (
        '{"driver": "raw", "file": {"filename": "a.raw"}, "read-only": true}',
        "Option 'read-only' of driver 'raw' is not supported by qimg",
    ),
    (
        '{"driver": "raw", "file": {"filename": "a.raw"}, "cache": {"direct": true}}',
        "Option 'cache' of driver 'raw' is not supported by qimg",
    ),
    (
        '{"driver": "raw", "file": {"filename": "a.raw", "locking": "off"}}',
        "Option 'locking' of driver 'file' is not supported by qimg (at file)",
    ),
    (
        f'{{{BLKDEBUG}, "align": 512}}',
        "Option 'align' of driver 'blkdebug' is not supported by qimg",
    ),
    (
        f'{{{BLKDEBUG}, "set-state": [{{"event": "read_aio", "new_state": 2}}]}}',
        "Option 'set-state' of driver 'blkdebug' is not supported by qimg (blkdebug states are "
        "not supported)",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "state": 1}}]}}',
        "Option 'state' of inject-error rules is not supported by qimg (at inject-error.0)",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "l1_update"}}]}}',
        "blkdebug event 'l1_update' is not supported by qimg (at inject-error.0) (it fires "
        "read_aio, write_aio, flush_to_disk)",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "iotype": "block-status"}}]}}',
        "blkdebug iotype 'block-status' is not supported by qimg",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "errno": 0}}]}}',
        "Parameter 'errno' expects a positive error number, not 0",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "errno": -5}}]}}',
        "Parameter 'errno' expects a positive error number, not -5",
    ),
    (
        f'{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "sector": -2}}]}}',
        "Parameter 'sector' expects a sector number or -1 (any), not -2",
    ),
    # QEMU accepts these and then never compares anything: fifo reads do not vote.
    (
        '{"driver": "quorum", "vote-threshold": 2, "read-pattern": "fifo", "rewrite-corrupted": '
        "true, " + C2 + "}",
        "rewrite-corrupted=on needs read-pattern=quorum: with fifo nothing is compared",
    ),
    (
        '{"driver": "quorum", "vote-threshold": 2, "read-pattern": "fifo", "blkverify": true, '
        + C2
        + "}",
        "blkverify=on needs read-pattern=quorum",
    ),
    # blkdebug in the file role needs a file or an export below it.
    (
        '{"driver": "qcow2", "file": {"driver": "blkdebug", "image": {"driver": "raw", '
        '"file": {"filename": "q.qcow2"}}}}',
        "The image of a blkdebug node under a qcow2 node must be a 'file' or 'nbd' node, "
        "not 'raw' (at file)",
    ),
    (
        '{"driver": "raw", "file": {"driver": "raw", "file": {"filename": "a.raw"}}}',
        "The file of a raw node must be a 'file' or 'nbd' node, not 'raw' (at file)",
    ),
    (
        '{"driver": "raw", "file": {"driver": "blkdebug", "image": {"driver": "raw", "file": '
        '{"filename": "a.raw"}}}}',
        "The image of a blkdebug node under a raw node must be a 'file' or 'nbd' node, "
        "not 'raw' (at file)",
    ),
    (
        '{"file": {"filename": "q.qcow2"}, "backing": null}',
        "Option 'backing' needs the node's format",
    ),
    # A node name that is also the generated name of another node would make events ambiguous.
    (
        '{"driver": "quorum", "vote-threshold": 1, "children": [{"driver": "raw", "node-name": '
        '"children.1", "file": {"filename": "a.raw"}}, {"driver": "raw", "file": {"filename": '
        '"b.raw"}}]}',
        "Duplicate nodes with node-name='children.1' (a node name given in the spec is also the "
        "generated name of another node",
    ),
]

REFUSED_IMAGE_OPTS: list[tuple[str, str]] = [
    ("", "Must specify either driver or file"),
    (
        "driver=quorum,vote-threshold=08,children.0.driver=file,children.0.filename=a.raw",
        "Parameter 'vote-threshold' expects a number",
    ),
    (
        "driver=quorum,vote-threshold=1 ,children.0.driver=file,children.0.filename=a.raw",
        "Parameter 'vote-threshold' expects a number",
    ),
    (
        "driver=quorum,vote-threshold=,children.0.driver=file,children.0.filename=a.raw",
        "Parameter 'vote-threshold' expects a number",
    ),
    (
        "driver=quorum,vote-threshold=-1,children.0.driver=file,children.0.filename=a.raw",
        "Parameter 'vote-threshold' expects a value >= 1",
    ),
    (
        "driver=quorum,vote-threshold=1,children.0=a.raw",
        "Cannot find device='a.raw' nor node-name='a.raw'",
    ),
    (
        "driver=quorum,vote-threshold=1,children.1.driver=file,children.1.filename=a.raw",
        "Option children is not a valid array",
    ),
    ("driver=raw,file=a.raw", "Cannot find device='a.raw' nor node-name='a.raw'"),
    (
        "driver=raw,file.filename=a.raw,file=x",
        "Cannot reference an existing block device with additional options or a new filename",
    ),
    ("driver=raw,file.filename=", "The 'file' block driver requires a file name"),
    ("driver=raw,file.filename=a.raw,help", "Option 'help' of --image-opts has no value"),
    ("=x,driver=raw,file.filename=a.raw", "empty option name"),
    ("driver=raw,file.filename=a.raw,node-name=1x", "Invalid node-name: '1x'"),
    (
        "driver=quorum,vote-threshold=1,children.0.driver=raw,children.0.file.filename=a.raw,children.0.node-name=x,children.0.file.node-name=x",
        "Duplicate nodes with node-name='x'",
    ),
]


@pytest.mark.parametrize(("text", "message"), REFUSED_JSON + REFUSED_ON_PURPOSE)
def test_refused_json_specs_name_the_culprit(text: str, message: str) -> None:
    with pytest.raises(InvalidOptionError) as err:
        parse_spec("json:" + text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "message"), REFUSED_IMAGE_OPTS)
def test_refused_image_opts_name_the_culprit(text: str, message: str) -> None:
    with pytest.raises(InvalidOptionError) as err:
        parse_spec(text, image_opts=True)
    assert message in str(err.value)


def test_image_opts_and_format_are_mutually_exclusive() -> None:
    with pytest.raises(UsageError, match="--image-opts and --format are mutually exclusive"):
        parse_spec("driver=file,filename=a", image_opts=True, format="raw")


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("quorum", "A quorum node needs a json: or --image-opts specification"),
        ("vmdk", "Driver 'vmdk' is not supported by qimg"),
        ("bogus", "Unknown driver 'bogus'"),
    ],
)
def test_plain_file_name_with_a_format_qimg_cannot_open_that_way(fmt: str, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        parse_spec("a.img", format=fmt)


def test_mapping_values_of_other_types_are_refused() -> None:
    with pytest.raises(
        InvalidOptionError, match=r"Option 'file\.filename' has a value of type bytes"
    ):
        parse_spec({"driver": "raw", "file": {"filename": b"a"}})


# --- the name qemu-img prints -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('json:{"driver": "raw", "file": {"driver": "file", "filename": "a.raw"}}', "a.raw"),
        ('json:{"driver": "raw", "node-name": "n", "file.filename": "a.raw"}', "a.raw"),
        ('json:{"file": {"filename": "a.raw"}}', "a.raw"),
        ('json:{"driver": "file", "filename": "a.raw"}', "a.raw"),
        ('json:{"driver": "qcow2", "backing": null, "file": {"filename": "q.qcow2"}}', "q.qcow2"),
        (f"json:{{{BLKDEBUG}}}", "blkdebug::a.raw"),
        (
            'json:{"driver": "raw", "file": {"driver": "blkdebug", "image": {"filename": '
            '"a.raw"}}}',
            "blkdebug::a.raw",
        ),
        (
            quorum_json("a.raw", "b.raw", **{"vote-threshold": 2}),
            'json:{"children": [{"driver": "raw", "file": {"driver": "file", "filename": '
            '"a.raw"}}, '
            '{"driver": "raw", "file": {"driver": "file", "filename": "b.raw"}}], '
            '"driver": "quorum", "vote-threshold": 2}',
        ),
        (
            # Options appear as given (strings stay strings), in qemu-img's member order.
            'json:{"driver": "quorum", "vote-threshold": "1", "blkverify": false, '
            '"read-pattern": "fifo", "node-name": "q", "children": [{"driver": "file", '
            '"filename": "a"}]}',
            'json:{"read-pattern": "fifo", "children": [{"driver": "file", "filename": "a"}], '
            '"driver": "quorum", "blkverify": false, "vote-threshold": "1"}',
        ),
        (
            f'json:{{{BLKDEBUG}, "inject-error": [{{"event": "read_aio", "errno": 5}}, '
            '{"errno": 28, "event": "write_aio"}]}',
            'json:{"image": {"driver": "file", "filename": "a.raw"}, "driver": "blkdebug", '
            '"inject-error.1.errno": 28, "inject-error.1.event": "write_aio", '
            '"inject-error.0.errno": 5, "inject-error.0.event": "read_aio"}',
        ),
        (
            'json:{"driver": "quorum", "vote-threshold": 1, "children": [{"driver": "file", '
            '"filename": "\\u00e9\\"x\\\\.raw"}]}',
            'json:{"children": [{"driver": "file", "filename": "\\u00E9\\"x\\\\.raw"}], '
            '"driver": "quorum", "vote-threshold": 1}',
        ),
    ],
)
def test_display_name_is_what_qemu_img_prints(text: str, shown: str) -> None:
    assert parse_spec(text).display_name() == shown


def test_display_name_of_image_opts_keeps_their_order_within_a_bucket() -> None:
    spec = parse_spec(
        "driver=blkdebug,image.driver=file,image.filename=a.raw,"
        "inject-error.0.event=read_aio,inject-error.0.errno=5",
        image_opts=True,
    )
    assert spec.display_name() == (
        'json:{"image": {"driver": "file", "filename": "a.raw"}, "driver": "blkdebug", '
        '"inject-error.0.event": "read_aio", "inject-error.0.errno": "5"}'
    )


def test_display_name_shows_probed_formats() -> None:
    spec = parse_spec(
        'json:{"driver": "quorum", "vote-threshold": 1, "children": [{"file": {"filename": "a"}}]}'
    )
    assert spec.display_name({"children.0": "qcow2"}) == (
        'json:{"children": [{"driver": "qcow2", "file": {"driver": "file", "filename": "a"}}], '
        '"driver": "quorum", "vote-threshold": 1}'
    )
    assert spec.display_name_of("children.0") == "a"


def test_display_name_of_a_tree_built_in_python() -> None:
    assert NodeSpec(BlkdebugNode("d", FileNode("f", "x"))).display_name() == "blkdebug::x"
    spec = NodeSpec(QuorumNode("q", (FileNode("f", "a"), FileNode("g", "b")), 2))
    assert spec.display_name() == (
        'json:{"read-pattern": "quorum", "children": [{"driver": "file", "filename": "a"}, '
        '{"driver": "file", "filename": "b"}], "driver": "quorum", "blkverify": false, '
        '"rewrite-corrupted": false, "vote-threshold": 2}'
    )


# --- round trips --------------------------------------------------------------------------

_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=12,
)


@st.composite
def quorum_trees(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, 5))
    children = []
    for _ in range(count):
        kind = draw(st.sampled_from(["raw", "qcow2", "file", "probe", "blkdebug"]))
        name = draw(_names)
        if kind == "file":
            child: dict[str, Any] = {"driver": "file", "filename": name}
        elif kind == "probe":
            child = {"file": {"filename": name}}
        elif kind == "blkdebug":
            child = {"driver": "blkdebug", "image": {"driver": "raw", "file": {"filename": name}}}
            sectors = draw(st.lists(st.integers(-1, 1 << 40), max_size=3))
            if sectors:  # an empty list has no --image-opts spelling (and QEMU refuses it)
                child["inject-error"] = [
                    {"event": draw(st.sampled_from([e.value for e in BlkdebugEvent])), "sector": s}
                    for s in sectors
                ]
        else:
            child = {"driver": kind, "file": {"driver": "file", "filename": name}}
        children.append(child)
    tree: dict[str, Any] = {
        "driver": "quorum",
        "vote-threshold": draw(st.integers(1, count)),
        "children": children,
        "read-pattern": draw(st.sampled_from(["quorum", "fifo"])),
    }
    if tree["read-pattern"] == "quorum":
        tree["rewrite-corrupted"] = draw(st.booleans())
    return tree


def _image_opts(tree: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _image_opts(value, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _image_opts(value, f"{prefix}{i}.")
    else:
        text = ("on" if tree else "off") if isinstance(tree, bool) else str(tree)
        yield f"{prefix[:-1]}={text.replace(',', ',,')}"


@settings(max_examples=200, deadline=None)
@given(quorum_trees())
def test_image_opts_json_and_mapping_spellings_agree(tree: dict[str, Any]) -> None:
    from_json = parse_spec("json:" + json.dumps(tree))
    from_opts = parse_spec(",".join(_image_opts(tree)), image_opts=True)
    from_dict = parse_spec(tree)
    assert from_json.core_dict() == from_opts.core_dict() == from_dict.core_dict()
    assert from_json.display_name() == from_dict.display_name()


# --- against qemu-img ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.raw, b.raw (1 MiB each) and q.qcow2 (1 MiB) in a directory of their own."""
    d = tmp_path_factory.mktemp("spec")
    for name in ("a.raw", "b.raw"):
        with open(d / name, "wb") as f:
            f.truncate(1 << 20)
    from qimg import create

    create(d / "q.qcow2", 1 << 20, format="qcow2")
    return d


def _info(run: RunCommand, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return run("info", *args)
    finally:
        os.chdir(old)


@pytest.mark.qemu
@pytest.mark.parametrize(("text", "message"), REFUSED_JSON)
def test_qemu_img_refuses_what_qimg_refuses(
    run_qemu_img: RunCommand, run_qimg: RunCommand, images: Path, text: str, message: str
) -> None:
    theirs = _info(run_qemu_img, images, "json:" + text)
    ours = _info(run_qimg, images, "json:" + text)
    assert theirs.returncode == 1, theirs.stdout
    assert ours.returncode == 1
    assert ours.stderr.startswith(f"qimg: Could not open 'json:{text}': ")
    assert ours.stderr.count("\n") == 1


@pytest.mark.qemu
@pytest.mark.parametrize(("text", "message"), REFUSED_ON_PURPOSE)
def test_qemu_img_accepts_what_qimg_refuses_on_purpose(
    run_qemu_img: RunCommand, run_qimg: RunCommand, images: Path, text: str, message: str
) -> None:
    theirs = _info(run_qemu_img, images, "json:" + text)
    ours = _info(run_qimg, images, "json:" + text)
    # qemu-img opens these (the vvfat one fails on the directory's contents, after parsing).
    assert theirs.returncode == 0 or "vvfat" in text, theirs.stderr
    assert ours.returncode == 1
    assert message in ours.stderr


@pytest.mark.qemu
@pytest.mark.parametrize(("text", "message"), REFUSED_IMAGE_OPTS)
def test_qemu_img_refuses_the_image_opts_qimg_refuses(
    run_qemu_img: RunCommand, run_qimg: RunCommand, images: Path, text: str, message: str
) -> None:
    theirs = _info(run_qemu_img, images, "--image-opts", text)
    ours = _info(run_qimg, images, "--image-opts", text)
    if text.endswith(",help"):
        # qemu-img reads a bare key as key=on and then refuses the option 'help'.
        assert "does not support the option 'help'" in theirs.stderr
    assert theirs.returncode == 1
    assert ours.returncode == 1
    assert message in ours.stderr


ACCEPTED = [
    ('json:{"driver": "raw", "file": {"driver": "file", "filename": "a.raw"}}', False),
    ('json:{"driver": "raw", "file.filename": "a.raw"}', False),
    ('json:{"file.filename": "a.raw"}', False),
    ('json:{"file": {"filename": "q.qcow2"}}', False),
    ('json:{"driver": "file", "filename": "a.raw"}', False),
    ('json:{"driver": "qcow2", "file": {"filename": "q.qcow2"}, "backing": null}', False),
    ('json:{"driver": "raw", "file": {"filename": "a.raw"}, "node-name": "a-b.c_d"}', False),
    (
        'json:{"driver": "raw", "file": {"filename": "a.raw"}, "node-name": "' + "a" * 31 + '"}',
        False,
    ),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": 2}), False),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": "2"}), False),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": " 0x2"}), False),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": 2.0}), False),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": 1, "read-pattern": "fifo"}), False),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": 2, "blkverify": True}), False),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": 2, "blkverify": "on"}), False),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": 2, "blkverify": "no"}), False),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": 2, "blkverify": None}), False),
    (quorum_json("a.raw", "b.raw", **{"vote-threshold": 2, "rewrite-corrupted": False}), False),
    (
        'json:{"driver": "quorum", "vote-threshold": 1, "node-name": "q", "children": ['
        '{"driver": "qcow2", "file": {"filename": "q.qcow2"}}, {"file": {"filename": "a.raw"}}, '
        '{"driver": "file", "filename": "b.raw"}, '
        '{"driver": "blkdebug", "image": {"driver": "raw", "file": {"filename": "a.raw"}}, '
        '"inject-error": [{"event": "read_aio", "sector": 7, "once": true, "iotype": "read"}]}, '
        '{"driver": "raw", "file": {"driver": "blkdebug", "image": {"filename": "b.raw"}}}, '
        '{"driver": "quorum", "vote-threshold": 1, "children": [{"driver": "file", "filename": '
        '"a.raw"}]}]}',
        False,
    ),
    (
        'json:{"driver": "blkdebug", "image": {"driver": "file", "filename": "a.raw"}, '
        '"inject-error": [{"event": "read_aio", "errno": 5}, {"event": "write_aio", "errno": '
        '"28"}]}',
        False,
    ),
    ('json:{"driver": "blkdebug", "image.filename": "a.raw"}', False),
    (
        "driver=quorum,vote-threshold=2,children.0.driver=raw,children.0.file.filename=a.raw,"
        "children.1.driver=raw,children.1.file.filename=b.raw",
        True,
    ),
    (
        "driver=quorum,vote-threshold=2,blkverify=on,read-pattern=quorum,"
        "children.0.driver=raw,children.0.file.filename=a.raw,"
        "children.1.driver=raw,children.1.file.filename=b.raw,",
        True,
    ),
    (
        "driver=blkdebug,inject-error.0.errno=5,inject-error.0.event=read_aio,"
        "image.driver=file,image.filename=a.raw",
        True,
    ),
    ("file.filename=a.raw", True),
    ("driver=file,filename=a.raw", True),
]


@pytest.mark.qemu
@pytest.mark.parametrize(("text", "image_opts"), ACCEPTED)
@pytest.mark.parametrize("output", ["human", "json"])
def test_info_of_accepted_specs_matches_qemu_img(
    run_qemu_img: RunCommand,
    run_qimg: RunCommand,
    images: Path,
    text: str,
    image_opts: bool,
    output: str,
) -> None:
    args = ["--image-opts", text] if image_opts else [text]
    theirs = _info(run_qemu_img, images, f"--output={output}", *args)
    ours = _info(run_qimg, images, f"--output={output}", *args)
    assert theirs.returncode == 0, theirs.stderr
    assert ours.returncode == 0, ours.stderr
    if 'raw", "file": {"driver": "blkdebug"' in text:
        # qimg opens raw -> blkdebug -> file as blkdebug -> raw -> file: same name and
        # contents, but the child nodes under it are listed in that order.
        first = ours.stdout.splitlines()[0]
        assert first == theirs.stdout.splitlines()[0]
        return
    assert ours.stdout == theirs.stdout


# --- the commands -------------------------------------------------------------------------


def _quorum_of(d: Path) -> str:
    return quorum_json(str(d / "a.raw"), str(d / "b.raw"), **{"vote-threshold": 2})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["amend", "-o", "compat=0.10"],
            "Format driver 'quorum' does not support option amendment",
        ),
        (["amend", "-o", "help"], "Format driver 'quorum' does not support option amendment"),
        (["resize"], "Image format driver does not support resize ('quorum' nodes cannot be"),
    ],
)
def test_commands_that_rewrite_one_image_refuse_a_quorum(
    run_qimg: RunCommand, images: Path, args: list[str], message: str
) -> None:
    before = (images / "a.raw").read_bytes()
    extra = ["2M"] if args == ["resize"] else []
    proc = run_qimg(*args, _quorum_of(images), *extra)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert (images / "a.raw").read_bytes() == before


def test_rewrite_corrupted_repairs_through_a_read_only_open(
    run_qimg: RunCommand, tmp_path: Path
) -> None:
    # qemu-img refuses to open such a quorum read-only ("Block node is read-only"); qimg
    # opens the children for writing so that reads can repair them.
    names = []
    for name in ("a.raw", "b.raw", "c.raw"):
        (tmp_path / name).write_bytes(b"\x11" * 65536)
        names.append(str(tmp_path / name))
    with open(names[1], "r+b") as f:
        f.write(b"\x00" * 512)
    spec = quorum_json(*names, **{"vote-threshold": 2, "rewrite-corrupted": True})
    proc = run_qimg("io", "-r", "-c", "read -P 0x11 0 512", spec)
    assert proc.returncode == 0, proc.stderr
    assert Path(names[1]).read_bytes() == b"\x11" * 65536


def test_json_and_image_opts_qcow2_for_resize_amend_and_check(
    run_qimg: RunCommand, tmp_path: Path
) -> None:
    from qimg import create, open

    path = tmp_path / "x.qcow2"
    create(path, 1 << 20, format="qcow2")
    spec = f'json:{{"driver": "qcow2", "file": {{"filename": "{path}"}}}}'
    assert run_qimg("resize", spec, "2M").returncode == 0
    opts = f"driver=qcow2,file.filename={path}"
    proc = run_qimg("amend", "--image-opts", "-o", "lazy_refcounts=on", opts)
    assert proc.returncode == 0, proc.stderr
    proc = run_qimg("check", "--image-opts", opts)
    assert (proc.returncode, proc.stdout.splitlines()[0]) == (
        0,
        "No errors were found on the image.",
    )
    with open(path) as img:
        assert img.size == 2 << 20
        info: Any = img.info()
        assert info["format-specific"]["data"]["lazy-refcounts"] is True


def test_image_opts_with_a_format_is_refused(run_qimg: RunCommand, images: Path) -> None:
    proc = run_qimg("info", "-f", "raw", "--image-opts", f"driver=file,filename={images / 'a.raw'}")
    assert (proc.returncode, proc.stderr) == (
        1,
        "qimg: --image-opts and --format are mutually exclusive\n",
    )


def test_convert_into_an_existing_quorum(run_qimg: RunCommand, tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    source.write_bytes(bytes(range(256)) * 4096)
    replicas = []
    for name in ("a.raw", "b.raw", "c.raw"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
        replicas.append(str(tmp_path / name))
    target = quorum_json(*replicas, **{"vote-threshold": 2})
    proc = run_qimg("convert", "-O", "raw", source, target)
    assert proc.returncode == 1
    assert "must exist: use -n" in proc.stderr
    proc = run_qimg("convert", "-n", source, target)
    assert proc.returncode == 0, proc.stderr
    for name in replicas:
        assert Path(name).read_bytes() == source.read_bytes()
    opts = "driver=quorum,vote-threshold=1," + ",".join(
        f"children.{i}.driver=raw,children.{i}.file.filename={n}" for i, n in enumerate(replicas)
    )
    proc = run_qimg("convert", "--target-image-opts", source, opts)
    assert (proc.returncode, proc.stderr) == (
        1,
        "qimg: --target-image-opts requires use of -n flag\n",
    )
    assert run_qimg("convert", "-n", "--target-image-opts", source, opts).returncode == 0


def test_api_opens_every_spelling(images: Path) -> None:
    from qimg import open

    tree = {"driver": "raw", "file": {"filename": str(images / "a.raw")}}
    names = [
        open(tree).filename,
        open("json:" + json.dumps(tree)).filename,
        open(f"driver=raw,file.filename={images / 'a.raw'}", image_opts=True).filename,
        open(parse_spec(tree)).filename,
        open(images / "a.raw").filename,
    ]
    assert names == [str(images / "a.raw")] * 5


def test_api_errors_name_the_spec() -> None:
    from qimg import open

    with pytest.raises(InvalidOptionError) as err:
        open('json:{"driver": "quorum"}')
    assert str(err.value) == (
        """Could not open 'json:{"driver": "quorum"}': """
        "Number of provided children must be 1 or more"
    )


# --- nbd ----------------------------------------------------------------------------------


def nbd_core(
    name: str,
    server: dict[str, str],
    export: str | None = "x",
    timeout: int = 30,
    connections: int | None = None,
) -> dict[str, Any]:
    return {
        "driver": "nbd",
        "node-name": name,
        "server": server,
        "export": export,
        "timeout": timeout,
        "connections": connections,
    }


INET = {"type": "inet", "host": "127.0.0.1", "port": "10809"}
UNIX = {"type": "unix", "path": "/run/n.sock"}

#: NBD URLs given as file names: the canonical nbd node, and the name qemu-img prints.
NBD_URLS: list[tuple[str, dict[str, Any], str]] = [
    ("nbd://127.0.0.1:10809/x", nbd_core("file", INET), "nbd://127.0.0.1:10809/x"),
    ("nbd://127.0.0.1/x", nbd_core("file", INET), "nbd://127.0.0.1:10809/x"),
    ("nbd://127.0.0.1:/x", nbd_core("file", INET), "nbd://127.0.0.1:10809/x"),
    ("nbd+tcp://127.0.0.1:10809/x", nbd_core("file", INET), "nbd://127.0.0.1:10809/x"),
    ("nbd://127.0.0.1:010809/x", nbd_core("file", INET), "nbd://127.0.0.1:10809/x"),
    ("nbd://127.0.0.1:10809", nbd_core("file", INET, None), "nbd://127.0.0.1:10809"),
    ("nbd://127.0.0.1:10809/", nbd_core("file", INET, None), "nbd://127.0.0.1:10809"),
    ("nbd://127.0.0.1:10809//x", nbd_core("file", INET, "/x"), "nbd://127.0.0.1:10809//x"),
    (
        "nbd://[::1]:10900/x",
        nbd_core("file", {"type": "inet", "host": "::1", "port": "10900"}),
        "nbd://::1:10900/x",
    ),
    (
        "nbd://host.example:1/a%20b%3Fc/d",
        nbd_core("file", {"type": "inet", "host": "host.example", "port": "1"}, "a b?c/d"),
        "nbd://host.example:1/a b?c/d",
    ),
    ("nbd://user@127.0.0.1:10809/x#part", nbd_core("file", INET), "nbd://127.0.0.1:10809/x"),
    (
        "nbd+unix:///x?socket=/run/n.sock",
        nbd_core("file", UNIX),
        "nbd+unix:///x?socket=/run/n.sock",
    ),
    (
        "nbd+unix://?socket=/run/n.sock",
        nbd_core("file", UNIX, None),
        "nbd+unix://?socket=/run/n.sock",
    ),
    (
        "nbd+unix:///?socket=/run/%6E.sock&",
        nbd_core("file", UNIX, None),
        "nbd+unix://?socket=/run/n.sock",
    ),
]


@pytest.mark.parametrize(("url", "node", "shown"), NBD_URLS)
def test_nbd_urls_are_an_export_under_a_probed_format(
    url: str, node: dict[str, Any], shown: str
) -> None:
    assert not is_plain_filename(url)
    spec = parse_spec(url)
    assert not spec.is_plain
    assert spec.core_dict() == {"driver": "probe", "node-name": "root", "file": node}
    assert spec.display_name() == shown
    assert spec.display_name({"root": "raw"}) == shown


def test_nbd_ports_may_be_service_names() -> None:
    text = 'json:{"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "nbd"}}'
    try:
        expected = socket.getservbyname("nbd", "tcp")
    except OSError:
        # A system without the name refuses it, as QEMU's lookup would fail.
        with pytest.raises(InvalidOptionError, match='known TCP service name, not "nbd"'):
            parse_spec(text)
        return
    spec = parse_spec(text)
    assert spec.root == NbdNode("root", InetAddress("h", expected))
    # qemu-img shows the port as it was given.
    assert spec.display_name() == "nbd://h:nbd"
    with pytest.raises(InvalidOptionError, match='known TCP service name, not "no-such-svc"'):
        parse_spec(text.replace('"nbd"}', '"no-such-svc"}'))


def test_nbd_url_formats() -> None:
    url = "nbd://127.0.0.1:10809/x"
    assert parse_spec(url, format="raw").core_dict() == {
        "driver": "raw",
        "node-name": "root",
        "file": nbd_core("file", INET),
    }
    assert parse_spec(url, format="nbd").core_dict() == nbd_core("root", INET)
    assert parse_spec(url, format="nbd").display_name() == url
    # -f file takes the name as a path, as qemu-img -f file does.
    assert parse_spec(url, format="file").root == FileNode("root", url)
    qcow2 = parse_spec(url, format="qcow2").root
    assert qcow2 == Qcow2Node("root", NbdNode("file", InetAddress("127.0.0.1", 10809), "x"))
    with pytest.raises(InvalidOptionError, match="A quorum node needs a json:"):
        parse_spec(url, format="quorum")
    with pytest.raises(InvalidOptionError, match="An nbd node needs an nbd:// or nbd\\+unix://"):
        parse_spec("a.raw", format="nbd")


def test_nbd_typed_tree() -> None:
    spec = parse_spec(
        'json:{"driver": "quorum", "vote-threshold": 1, "children": ['
        '{"driver": "nbd", "server": {"type": "inet", "host": "h", "port": 7}, "timeout": "5"}, '
        '{"driver": "raw", "file": {"driver": "nbd", "path": "/s", "export": "e"}}]}'
    )
    assert isinstance(spec.root, QuorumNode)
    assert spec.root.children == (
        NbdNode("children.0", InetAddress("h", 7), None, 5),
        RawNode("children.1", NbdNode("children.1.file", UnixAddress("/s"), "e")),
    )


def test_nbd_connections_is_qimgs_own_option() -> None:
    base = '{"driver": "nbd", "server": {"type": "inet", "host": "h", "port": 7}, "export": "x"'
    spec = parse_spec("json:" + base + ', "connections": 3}')
    assert spec.root == NbdNode("root", InetAddress("h", 7), "x", 30, 3)
    assert json.loads(spec.to_core_json())["connections"] == 3
    # Like the timeout, it is not part of the name qemu-img would print.
    assert spec.display_name() == "nbd://h:7/x"
    opts = "driver=nbd,server.type=inet,server.host=h,server.port=7,connections=2"
    assert parse_spec(opts, image_opts=True).root == NbdNode(
        "root", InetAddress("h", 7), None, 30, 2
    )
    shown = NodeSpec(QuorumNode("q", (NbdNode("n", InetAddress("h", 7), "x", 30, 4),), 1))
    assert "connections" not in shown.display_name()
    for bad in ("0", "17", '"many"', "true"):
        with pytest.raises(InvalidOptionError, match="'connections' expects a number"):
            parse_spec("json:" + base + f', "connections": {bad}}}')


def test_nbd_tree_built_in_python_round_trips() -> None:
    node = NbdNode("n", InetAddress("127.0.0.1", 10900), "x", 7)
    under_raw = NbdNode("m", InetAddress("127.0.0.1", 10900), "x")
    spec = NodeSpec(QuorumNode("q", (node, RawNode("r", under_raw)), 1))
    # The timeout is qimg's own option: not in what qemu-img would print.
    assert spec.display_name() == (
        'json:{"read-pattern": "quorum", "children": [{"server.port": "10900", '
        '"server.host": "127.0.0.1", "driver": "nbd", "export": "x", "server.type": "inet"}, '
        '{"driver": "raw", "file": {"server.host": "127.0.0.1", "server.port": "10900", '
        '"driver": "nbd", "export": "x", "server.type": "inet"}}], "driver": "quorum", '
        '"blkverify": false, "rewrite-corrupted": false, "vote-threshold": 1}'
    )
    assert NodeSpec(NbdNode("n", UnixAddress("/s"))).display_name() == "nbd+unix://?socket=/s"
    assert json.loads(NodeSpec(node).to_core_json()) == nbd_core(
        "n", {"type": "inet", "host": "127.0.0.1", "port": "10900"}, "x", 7
    )


NBD = '"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": "10809"}'
NBD_RAW_SHOWN = (
    '{"server.host": "127.0.0.1", "server.port": "10809", "driver": "nbd", "export": "x", '
    '"server.type": "inet"}'
)
NBD_SHOWN = (
    '{"server.port": "10809", "server.host": "127.0.0.1", "driver": "nbd", "export": "x", '
    '"server.type": "inet"}'
)


def _q1(child: str) -> str:
    return f'json:{{"driver": "quorum", "vote-threshold": 1, "children": [{child}]}}'


#: Specs with nbd nodes and what qemu-img 10 prints for them (seen against qemu-nbd).
NBD_SHOWN_NAMES: list[tuple[str, bool, str]] = [
    (f'json:{{{NBD}, "export": "x"}}', False, "nbd://127.0.0.1:10809/x"),
    (f'json:{{{NBD}, "export": ""}}', False, "nbd://127.0.0.1:10809/"),
    (f'json:{{{NBD}, "export": null}}', False, "nbd://127.0.0.1:10809"),
    (
        'json:{"driver": "nbd", "host": "::1", "port": 10900, "export": "x"}',
        False,
        "nbd://::1:10900/x",
    ),
    ('json:{"driver": "nbd", "host": "h", "port": "010900"}', False, "nbd://h:010900"),
    ('json:{"driver": "nbd", "host": "h", "port": 10900.0}', False, "nbd://h:10900"),
    ('json:{"driver": "nbd", "host": "h"}', False, "nbd://h:10809"),
    ('json:{"driver": "nbd", "path": "/s", "export": "x"}', False, "nbd+unix:///x?socket=/s"),
    (
        'json:{"driver": "nbd", "server": {"type": "unix", "path": "/s"}, "export": ""}',
        False,
        "nbd+unix:///?socket=/s",
    ),
    (
        f'json:{{"driver": "raw", "file": {{{NBD}, "export": "x"}}}}',
        False,
        "nbd://127.0.0.1:10809/x",
    ),
    (f'json:{{"file": {{{NBD}, "export": "x"}}}}', False, "nbd://127.0.0.1:10809/x"),
    (
        f'json:{{"driver": "blkdebug", "image": {{{NBD}, "export": "x"}}}}',
        False,
        "blkdebug::nbd://127.0.0.1:10809/x",
    ),
    (
        _q1(f'{{{NBD}, "export": "x"}}'),
        False,
        f'json:{{"children": [{NBD_SHOWN}], "driver": "quorum", "vote-threshold": 1}}',
    ),
    (
        _q1(
            '{"driver": "nbd", "export": "x", '
            '"server": {"port": "10809", "type": "inet", "host": "127.0.0.1"}}'
        ),
        False,
        f'json:{{"children": [{NBD_SHOWN}], "driver": "quorum", "vote-threshold": 1}}',
    ),
    (
        _q1(f'{{"driver": "raw", "file": {{{NBD}, "export": "x"}}}}'),
        False,
        f'json:{{"children": [{{"driver": "raw", "file": {NBD_RAW_SHOWN}}}], "driver": "quorum", '
        '"vote-threshold": 1}',
    ),
    (
        _q1(
            '{"driver": "nbd", "host": "127.0.0.1", "port": 10809, "export": "x", "node-name": "n"}'
        ),
        False,
        'json:{"children": [{"port": 10809, "host": "127.0.0.1", "driver": "nbd", "export": "x"}], '
        '"driver": "quorum", "vote-threshold": 1}',
    ),
    (
        _q1('{"driver": "nbd", "server": {"type": "unix", "path": "/s"}, "export": null}'),
        False,
        'json:{"children": [{"server.path": "/s", "driver": "nbd", "export": null, '
        '"server.type": "unix"}], "driver": "quorum", "vote-threshold": 1}',
    ),
    (
        "driver=quorum,vote-threshold=1,children.0.driver=nbd,children.0.server.type=inet,"
        "children.0.server.host=127.0.0.1,children.0.server.port=10809,children.0.export=x",
        True,
        f'json:{{"children": [{NBD_SHOWN}], "driver": "quorum", "vote-threshold": "1"}}',
    ),
    (
        "driver=quorum,vote-threshold=1,children.0.driver=raw,children.0.file.driver=nbd,"
        "children.0.file.server.port=10809,children.0.file.server.host=127.0.0.1,"
        "children.0.file.server.type=inet,children.0.file.export=x",
        True,
        f'json:{{"children": [{{"driver": "raw", "file": {NBD_RAW_SHOWN}}}], "driver": "quorum", '
        '"vote-threshold": "1"}',
    ),
    (
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=10809,export=x",
        True,
        "nbd://127.0.0.1:10809/x",
    ),
]


@pytest.mark.parametrize(("text", "image_opts", "shown"), NBD_SHOWN_NAMES)
def test_nbd_display_name_is_what_qemu_img_prints(text: str, image_opts: bool, shown: str) -> None:
    assert parse_spec(text, image_opts=image_opts).display_name() == shown


def test_nbd_spellings_give_the_same_node() -> None:
    expected = nbd_core("root", INET)
    spellings = [
        parse_spec(f'json:{{{NBD}, "export": "x"}}'),
        parse_spec(
            'json:{"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", '
            '"port": 10809}, "export": "x"}'
        ),
        parse_spec('json:{"driver": "nbd", "host": "127.0.0.1", "port": "10809", "export": "x"}'),
        parse_spec('json:{"driver": "nbd", "host": "127.0.0.1", "export": "x"}'),
        parse_spec(
            'json:{"driver": "nbd", "server.type": "inet", "server.host": "127.0.0.1", '
            '"server.port": "10809", "export": "x", "timeout": 30}'
        ),
        parse_spec(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=10809,export=x",
            image_opts=True,
        ),
        parse_spec("driver=nbd,host=127.0.0.1,port=10809,export=x,timeout=30", image_opts=True),
        parse_spec("nbd://127.0.0.1:10809/x", format="nbd"),
        parse_spec(
            {
                "driver": "nbd",
                "server": {"type": "inet", "host": "127.0.0.1", "port": 10809},
                "export": "x",
            }
        ),
    ]
    for spec in spellings:
        assert spec.core_dict() == expected
    unix = parse_spec("driver=nbd,path=/run/n.sock,export=x", image_opts=True)
    assert unix.core_dict() == nbd_core("root", UNIX)


#: NBD URLs qemu-img refuses as they are written (no server needed to see it).
NBD_URLS_REFUSED: list[tuple[str, str]] = [
    ("nbd+tls://127.0.0.1/x", "Unknown protocol 'nbd+tls' (TLS is not supported)"),
    ("nbd+rdma://127.0.0.1/x", "Unknown protocol 'nbd+rdma'"),
    ("nbd://127.0.0.1:10809/x?foo=bar", "Unknown query parameter 'foo' in NBD URL"),
    ("nbd+unix:///x", "An nbd+unix:// URL needs the socket's path"),
    ("nbd+unix:///x?socket", "Unknown query parameter 'socket' in NBD URL"),
    ("nbd+unix://127.0.0.1/x?socket=/s", "An nbd+unix:// URL has no host (given '127.0.0.1')"),
    ("nbd://127.0.0.1:10809/x?socket=/s", "socket= needs an nbd+unix:// URL, not nbd://"),
    ("nbd://", "No valid host in NBD URL (given '')"),
    ("nbd:///x", "No valid host in NBD URL (given '')"),
    ("nbd://127.0.0.1:abc/x", "Invalid port 'abc' in NBD URL"),
    ("nbd://127.0.0.1:99999/x", "Invalid port '99999' in NBD URL"),
    ("nbd://127.0.0.1:+10809/x", "Invalid port '+10809' in NBD URL"),
    ("nbd://%31%32%37.0.0.1:10809/x", "No valid host in NBD URL"),
    ("nbd:/x", "The nbd:HOST:PORT form is not supported by qimg"),
    ("nbd+unix:/x?socket=/s", "The nbd+unix:HOST:PORT form is not supported by qimg"),
]

#: What qemu-img opens (given a server) and qimg refuses on purpose.
NBD_URLS_REFUSED_ON_PURPOSE: list[tuple[str, str]] = [
    # QEMU's older syntax; the URL says the same.
    ("nbd:127.0.0.1:{port}:exportname=x", "The nbd:HOST:PORT form is not supported by qimg"),
    ("nbd+unix:///x?socket=", "An nbd+unix:// URL needs the socket's path"),
]


@pytest.mark.parametrize(("url", "message"), NBD_URLS_REFUSED)
def test_nbd_urls_refused_name_the_culprit(url: str, message: str) -> None:
    with pytest.raises(InvalidOptionError) as err:
        parse_spec(url)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


#: nbd nodes qimg refuses (qemu-img refuses them too, before or when connecting).
NBD_REFUSED_JSON: list[tuple[str, str]] = [
    (
        f'{{{NBD}, "host": "127.0.0.1"}}',
        "Cannot use 'server' and path/host/port at the same time",
    ),
    ('{"driver": "nbd", "host": "127.0.0.1", "path": "/s"}', "path and host may not be used"),
    ('{"driver": "nbd", "port": "10809"}', "NBD server address missing"),
    ('{"driver": "nbd"}', "NBD server address missing"),
    ('{"driver": "nbd", "path": "/s", "port": "1"}', "port may not be used without host"),
    ('{"driver": "nbd", "server": "foo"}', "Parameter 'server' expects an object"),
    ('{"driver": "nbd", "server": {}}', "Parameter 'server.type' is missing"),
    (
        '{"driver": "nbd", "server": {"host": "127.0.0.1", "port": "1"}}',
        "Parameter 'server.type' is missing",
    ),
    (
        '{"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1"}}',
        "Parameter 'server.port' is missing",
    ),
    (
        '{"driver": "nbd", "server": {"type": "fd", "str": "3"}}',
        "NBD server type 'fd' is not supported by qimg",
    ),
    (
        '{"driver": "nbd", "server": {"type": "vsock", "cid": "3", "port": "1"}}',
        "NBD server type 'vsock' is not supported by qimg",
    ),
    (
        '{"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": "abc"}}',
        "Parameter 'server.port' expects a port number from 1 to 65535 or a known TCP service "
        'name, not "abc"',
    ),
    (
        '{"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": true}}',
        "Parameter 'server.port' expects a port number from 1 to 65535 or a known TCP service "
        "name, not true",
    ),
    (
        '{"driver": "nbd", "server": {"type": "inet", "host": "", "port": "1"}}',
        "Parameter 'server.host' must not be empty",
    ),
    (
        '{"driver": "nbd", "server": {"type": "unix", "path": ""}}',
        "Parameter 'server.path' must not be empty",
    ),
    (
        '{"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "1", "bogus": 1}}',
        "Parameter 'server.bogus' is unexpected",
    ),
    (
        f'{{{NBD}, "tls-creds": "t"}}',
        "Option 'tls-creds' of driver 'nbd' is not supported by qimg (TLS connections",
    ),
    (
        f'{{{NBD}, "x-dirty-bitmap": "b"}}',
        "Option 'x-dirty-bitmap' of driver 'nbd' is not supported by qimg",
    ),
    (
        f'{{{NBD}, "file": {{"filename": "a"}}}}',
        "Block protocol 'nbd' doesn't support the option 'file.filename'",
    ),
    (f'{{{NBD}, "timeout": 5}}', "Block protocol 'nbd' doesn't support"),  # qimg accepts it
    ('{"driver": "nbd", "filename": "nbd://127.0.0.1/x"}', "NBD server address missing"),
]

#: What qemu-img opens (given a server) and qimg refuses on purpose.
NBD_REFUSED_ON_PURPOSE_JSON: list[tuple[str, str]] = [
    (f'{{{NBD}, "tls-hostname": "h"}}', "Option 'tls-hostname' of driver 'nbd' is not supported"),
    (
        f'{{{NBD}, "reconnect-delay": 0}}',
        "Option 'reconnect-delay' of driver 'nbd' is not supported",
    ),
    (f'{{{NBD}, "open-timeout": 3}}', "Option 'open-timeout' of driver 'nbd' is not supported"),
    (f'{{{NBD}, "read-only": true}}', "Option 'read-only' of driver 'nbd' is not supported"),
    (
        '{"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": "{port}", '
        '"numeric": true}}',
        "Option 'server.numeric' of driver 'nbd' is not supported by qimg",
    ),
    (
        '{"driver": "nbd", "server": {"type": "unix", "path": "{socket}", "abstract": false}}',
        "Option 'server.abstract' of driver 'nbd' is not supported by qimg",
    ),
    (
        '{"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": " {port}"}}',
        "Parameter 'server.port' expects a port number from 1 to 65535",
    ),
    (
        '{"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": "{port}"}, '
        '"export": 5}',
        "Parameter 'export' expects a string",
    ),
]


@pytest.mark.parametrize(("text", "message"), NBD_REFUSED_JSON + NBD_REFUSED_ON_PURPOSE_JSON)
def test_nbd_refusals_name_the_culprit(text: str, message: str) -> None:
    if '"timeout": 5' in text:
        # qimg's own option is accepted; the unknown one next to it is not.
        text = text.replace('"timeout": 5', '"timeout": 5, "bogus": 1')
        message = "Block protocol 'nbd' doesn't support the option 'bogus'"
    with pytest.raises(InvalidOptionError) as err:
        parse_spec("json:" + text.replace("{port}", "1").replace("{socket}", "/s"))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "timeout=0",
            "Parameter 'timeout' expects a number of seconds from 1 to 4294967295, not 0",
        ),
        ("timeout=4294967296", "not 4294967296"),
        ("timeout=soon", "Parameter 'timeout' expects a number"),
        ("export=" + "e" * 4097, "Export name too long (at most 4096 bytes)"),
        ("server.type=tcp", "Parameter 'server.type' does not accept value 'tcp'"),
    ],
)
def test_nbd_image_opts_refusals(text: str, message: str) -> None:
    base = "driver=nbd,server.type=inet,server.host=h,server.port=1,"
    with pytest.raises(InvalidOptionError, match=re.escape(message)):
        parse_spec(base + text, image_opts=True)


def test_nbd_under_blkdebug_and_raw_is_blkdebug_over_raw() -> None:
    spec = parse_spec(
        f'json:{{"driver": "raw", "file": {{"driver": "blkdebug", "image": {{{NBD}}}, '
        '"inject-error": [{"event": "read_aio"}]}}'
    )
    assert spec.root == BlkdebugNode(
        "root",
        RawNode("file", NbdNode("file.image", InetAddress("127.0.0.1", 10809))),
        (BlkdebugRule(BlkdebugEvent.READ_AIO),),
    )
    # Under qcow2 it stays in the file role: qcow2's own requests meet its rules.
    spec = parse_spec(
        f'json:{{"driver": "qcow2", "file": {{"driver": "blkdebug", "image": {{{NBD}}}}}}}'
    )
    assert spec.root == Qcow2Node(
        "root",
        BlkdebugNode("file", NbdNode("file.image", InetAddress("127.0.0.1", 10809))),
    )


# --- nbd against qemu-img (live qemu-nbd servers) -----------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize(("url", "message"), NBD_URLS_REFUSED)
def test_qemu_img_refuses_the_nbd_urls_qimg_refuses(
    run_qemu_img: RunCommand, run_qimg: RunCommand, url: str, message: str
) -> None:
    theirs = run_qemu_img("info", url)
    ours = run_qimg("info", url)
    assert theirs.returncode == 1, theirs.stdout
    assert (ours.returncode, ours.stdout) == (1, "")
    assert ours.stderr.startswith(f"qimg: Could not open '{url}': ")
    assert message in ours.stderr
    assert ours.stderr.count("\n") == 1


@dataclass
class Served:
    """One raw image served read-only four ways: export x and the default export "",
    each on loopback TCP and on a unix socket."""

    tcp: NbdServer
    unix: NbdServer
    tcp_default: NbdServer
    unix_default: NbdServer

    def fill(self, text: str, *, default_export: bool = False) -> str:
        """``text`` with {port} and {socket} pointing at the servers."""
        tcp = self.tcp_default if default_export else self.tcp
        unix = self.unix_default if default_export else self.unix
        return text.replace("{port}", str(tcp.port)).replace("{socket}", str(unix.socket_path))


@pytest.fixture
def served(nbd_servers: StartNbd, tmp_path: Path) -> Served:
    image = tmp_path / "s.raw"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    return Served(
        nbd_servers(image, read_only=True),
        nbd_servers(image, read_only=True, unix=True),
        nbd_servers(image, read_only=True, export=""),
        nbd_servers(image, read_only=True, unix=True, export=""),
    )


@pytest.mark.qemu
@pytest.mark.parametrize(("text", "message"), NBD_REFUSED_ON_PURPOSE_JSON)
def test_qemu_img_opens_the_nbd_specs_qimg_refuses_on_purpose(
    run_qemu_img: RunCommand, run_qimg: RunCommand, served: Served, text: str, message: str
) -> None:
    text = served.fill(text.replace('"10809"', '"{port}"'))
    if '"export"' not in text:
        text = text[:-1] + ', "export": "x"}'
    theirs = run_qemu_img("info", "json:" + text)
    ours = run_qimg("info", "json:" + text)
    if '"export": 5' in text:
        # qemu-img reads the number as the export name "5", which this server lacks.
        assert "export '5' not present" in theirs.stderr
    else:
        assert theirs.returncode == 0, theirs.stderr
    assert (ours.returncode, ours.stdout) == (1, "")
    assert message in ours.stderr


@pytest.mark.qemu
@pytest.mark.parametrize(("text", "message"), NBD_URLS_REFUSED_ON_PURPOSE)
def test_qemu_img_opens_the_nbd_urls_qimg_refuses_on_purpose(
    run_qemu_img: RunCommand, run_qimg: RunCommand, served: Served, text: str, message: str
) -> None:
    url = served.fill(text)
    theirs = run_qemu_img("info", url)
    ours = run_qimg("info", url)
    if url.endswith("socket="):
        # qemu-img takes it, then connects to the socket "" (and fails).
        assert "Failed to connect to ''" in theirs.stderr
    else:
        assert theirs.returncode == 0, theirs.stderr
    assert (ours.returncode, ours.stdout) == (1, "")
    assert message in ours.stderr


@pytest.mark.qemu
@pytest.mark.parametrize(("text", "message"), NBD_REFUSED_JSON)
def test_qemu_img_refuses_the_nbd_specs_qimg_refuses(
    run_qemu_img: RunCommand, run_qimg: RunCommand, served: Served, text: str, message: str
) -> None:
    # Pointed at live servers, so that a refusal is about the spec, not the address.
    text = served.fill(text.replace('"10809"', '"{port}"').replace('"/s"', '"{socket}"'))
    theirs = run_qemu_img("info", "json:" + text)
    ours = run_qimg("info", "json:" + text)
    assert theirs.returncode == 1, theirs.stdout
    assert (ours.returncode, ours.stdout) == (1, "")
    assert ours.stderr.count("\n") == 1


def _on_loopback(case: tuple[str, bool, str]) -> bool:
    """Whether qemu-img can open the spec against the test's servers (on 127.0.0.1
    and unix sockets; the other cases were checked by hand against servers there)."""
    text = case[0]
    return "127.0.0.1" in text or '"/s"' in text


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("text", "image_opts", "shown"), [c for c in NBD_SHOWN_NAMES if _on_loopback(c)]
)
def test_qemu_img_prints_the_nbd_names_qimg_prints(
    run_qemu_img: RunCommand, served: Served, text: str, image_opts: bool, shown: str
) -> None:
    default = '"export": null' in text or '"export": ""' in text or "export" not in text
    text = text.replace("10809", "{port}").replace('"/s"', '"{socket}"')
    live = served.fill(text, default_export=default)
    args = ["--image-opts", live] if image_opts else [live]
    theirs = run_qemu_img("info", "--output=json", *args)
    assert theirs.returncode == 0, theirs.stderr
    spec = parse_spec(live, image_opts=image_opts)
    assert json.loads(theirs.stdout)["filename"] == spec.display_name({"root": "raw"})
