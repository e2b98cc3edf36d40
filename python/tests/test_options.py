"""Unit tests for -o option lists, sizes and the option tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qimg.errors import InvalidOptionError, UsageError
from qimg.formats import FORMATS, format_info
from qimg.options import (
    OptionItem,
    escape_value,
    parse_bool,
    parse_image_size,
    parse_number,
    parse_option_lists,
    parse_size,
)
from qimg.prealloc import PreallocMode


def test_doubled_comma_is_a_literal_comma_inside_a_value() -> None:
    items = parse_option_lists(["backing_file=a,,b,cluster_size=4k"])
    assert items == [OptionItem("backing_file", "a,b"), OptionItem("cluster_size", "4k")]


def test_several_lists_are_joined_in_order() -> None:
    items = parse_option_lists(["cluster_size=4k", "lazy_refcounts=on", "cluster_size=8k"])
    assert [i.key for i in items] == ["cluster_size", "lazy_refcounts", "cluster_size"]
    assert FORMATS["qcow2"].parse(items)["cluster_size"].value == 8192


@pytest.mark.parametrize(
    ("lists", "is_help"),
    [
        (["help"], True),
        (["?"], True),
        (["cluster_size=4k,help"], True),
        (["help,cluster_size=4k"], True),
        (["cluster_size=4k", "?"], True),
        (["backing_file=x,,help"], False),
        (["backing_file=x,,?"], False),
        (["help=1"], False),
    ],
)
def test_help_is_recognised_only_as_a_whole_item(lists: list[str], is_help: bool) -> None:
    assert any(i.is_help for i in parse_option_lists(lists)) is is_help


@pytest.mark.parametrize("bad", ["", ",help", ",,", "backing_file=x,", "a=b,,,"])
def test_malformed_lists_are_refused(bad: str) -> None:
    with pytest.raises(UsageError, match="Invalid option list"):
        parse_option_lists([bad])


@given(st.text(alphabet="ab,=x", min_size=1, max_size=12))
def test_escaped_values_round_trip(value: str) -> None:
    items = parse_option_lists([f"backing_file={escape_value(value)}"])
    assert items == [OptionItem("backing_file", value)]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1024", 1024),
        ("1024b", 1024),
        ("1k", 1024),
        ("1K", 1024),
        ("1m", 1 << 20),
        ("1G", 1 << 30),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        ("1E", 1 << 60),
        ("1.5k", 1536),
        ("0.5k", 512),
        ("1.1k", 1126),
        ("1024.0k", 1 << 20),
        ("1024.0", 1024),
        ("1024.0b", 1024),
        ("0x10", 16),
        (" 1k", 1024),
        ("+1k", 1024),
    ],
)
def test_sizes_parse_like_qemu(text: str, value: int) -> None:
    assert parse_size(text, "size") == value


@pytest.mark.parametrize("text", ["", "1.5", "0.5", "1e3", "1kb", "1k ", "0x10k", "foo"])
def test_malformed_sizes_are_refused_with_the_parameter_name(text: str) -> None:
    with pytest.raises(InvalidOptionError, match="Parameter 'size' expects"):
        parse_size(text, "size")


@pytest.mark.parametrize("text", ["-1024", "18446744073709551616"])
def test_out_of_range_sizes_say_so(text: str) -> None:
    with pytest.raises(InvalidOptionError, match="out of range for parameter 'size'"):
        parse_size(text, "size")


def test_image_size_argument_must_fit_a_signed_64_bit_offset() -> None:
    assert parse_image_size("7E") == 7 << 60
    assert parse_image_size("9223372036854775807") == (1 << 63) - 1
    with pytest.raises(UsageError, match="must be between 0 and 9223372036854775807"):
        parse_image_size("-1024")
    with pytest.raises(UsageError, match="Invalid image size specified: '1kilobyte'"):
        parse_image_size("1kilobyte")


def test_bools_and_numbers() -> None:
    assert parse_bool("on", "x") and parse_bool("true", "x") and not parse_bool("off", "x")
    with pytest.raises(InvalidOptionError, match="Parameter 'x' expects 'on' or 'off'"):
        parse_bool("maybe", "x")
    assert parse_number("16", "refcount_bits") == 16
    for bad in ["1_6", "", "-1", "sixteen"]:
        with pytest.raises(InvalidOptionError, match="expects a number"):
            parse_number(bad, "refcount_bits")


def test_prealloc_parser_names_value_and_choices() -> None:
    assert PreallocMode.parse("falloc") is PreallocMode.FALLOC
    with pytest.raises(InvalidOptionError) as err:
        PreallocMode.parse("1234")
    assert "'1234'" in str(err.value) and "off, metadata, falloc, full" in str(err.value)


def test_unknown_and_not_yet_supported_options_are_told_apart() -> None:
    qcow2 = FORMATS["qcow2"]
    with pytest.raises(InvalidOptionError, match="Invalid parameter 'foo'"):
        qcow2.parse([OptionItem("foo", "bar")])
    with pytest.raises(InvalidOptionError, match="not supported by qimg yet"):
        qcow2.parse([OptionItem("encrypt.format", "luks")])
    with pytest.raises(InvalidOptionError, match="Invalid parameter 'cluster_size'"):
        FORMATS["raw"].parse([OptionItem("cluster_size", "4k")])


def test_help_listing_is_sorted_and_aligned() -> None:
    text = FORMATS["qcow2"].help_text(with_protocol=True).splitlines()
    assert text[0] == "Supported options:"
    names = [line.split("=")[0].strip() for line in text[1:]]
    assert names == sorted(names)
    assert "nocow" in names and "extent_size_hint" in names
    assert text[1].startswith("  backing_file=<str>     - ")
    bare = FORMATS["qcow2"].help_text(with_protocol=False).splitlines()
    assert bare[0] == "Supported qcow2 options:" and "nocow" not in "".join(bare)
    assert bare[-1] == "Specify the target filename to include those options."


def test_formats_qemu_cannot_create_are_told_apart_from_unknown_ones() -> None:
    with pytest.raises(UsageError, match="does not support image creation"):
        format_info("bochs")
    with pytest.raises(UsageError, match="not support the 'vmdk' format yet"):
        format_info("vmdk")
    with pytest.raises(UsageError, match="Unknown file format 'foo'"):
        format_info("foo")
