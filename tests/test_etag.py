"""Entity-tag grammar and comparison (RFC 9110 §8.8.3, §5.6.1)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etagproxy.etag import (
    EntityTag,
    TagList,
    make_etag,
    parse_etag,
    parse_tag_list,
    strong_match,
    weak_match,
)

# --- strategies -------------------------------------------------------------

# etagc = %x21 / %x23-7E / obs-text (RFC 9110 §8.8.3); obs-text as it arrives
# decoded: latin-1 code points, UTF-8 decoded text, surrogate escapes.
etagc = st.one_of(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"'),
    st.characters(min_codepoint=0x80, max_codepoint=0xFF),
    st.characters(min_codepoint=0x100),
    st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, categories=["Cs"]),
)
entity_tags = st.builds(EntityTag, opaque=st.text(etagc, max_size=12), weak=st.booleans())
ows = st.text(st.sampled_from(" \t"), max_size=2)
# Between two elements: OWS "," OWS, possibly with empty elements (", ,").
separators = st.lists(ows, min_size=2, max_size=4).map(lambda parts: ",".join(parts))
# Before the first / after the last element: OWS with optional empty elements.
edges = st.lists(ows, min_size=1, max_size=3).map(lambda parts: ",".join(parts))
any_text = st.text(
    st.one_of(
        st.characters(),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]),
    )
)
# Text made of the grammar's own characters, so near-misses are common.
grammar_text = st.text(st.sampled_from(['"', "W", "w", "/", ",", " ", "\t", "*", "a", "-", "\x80", "\x7f"]))


@st.composite
def formatted_lists(draw: st.DrawFn) -> tuple[str, list[EntityTag]]:
    tags = draw(st.lists(entity_tags, max_size=5))
    text = draw(edges)
    for index, tag in enumerate(tags):
        if index:
            text += draw(separators)
        text += str(tag)
    return text + draw(edges), tags


# --- an independent statement of the grammar as one regular expression -------

_REF_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\U0010ffff]*"'
# RFC 9110 §5.6.1: #entity-tag with OWS and empty elements; or "*".
_REF_LIST = re.compile(rf"[ \t,]*(?:{_REF_TAG}(?:[ \t]*,[ \t,]*{_REF_TAG})*)?[ \t,]*|[ \t]*\*[ \t]*")


# --- properties ---------------------------------------------------------------


@given(entity_tags)
def test_format_then_parse_round_trips(tag: EntityTag) -> None:
    parsed = parse_etag(str(tag))
    assert parsed == tag
    assert str(parsed) == str(tag)


@given(formatted_lists())
def test_formatted_list_parses_to_its_tags(case: tuple[str, list[EntityTag]]) -> None:
    text, tags = case
    assert parse_tag_list(text) == TagList(any=False, tags=tuple(tags))


@given(entity_tags, entity_tags)
def test_comparison_laws(a: EntityTag, b: EntityTag) -> None:
    # RFC 9110 §8.8.3.2: strong implies weak; both are symmetric.
    if strong_match(a, b):
        assert weak_match(a, b)
    assert strong_match(a, b) == strong_match(b, a)
    assert weak_match(a, b) == weak_match(b, a)
    if a.weak or b.weak:
        assert not strong_match(a, b)


@given(entity_tags)
def test_weak_match_is_reflexive_and_strong_only_for_strong_tags(tag: EntityTag) -> None:
    assert weak_match(tag, tag)
    assert strong_match(tag, tag) == (not tag.weak)


@given(any_text)
def test_arbitrary_text_never_raises(text: str) -> None:
    tag = parse_etag(text)
    # Whatever parses is an entity-tag that re-serialises to the input itself.
    if tag is not None:
        assert str(tag) == text.strip(" \t")
    tags = parse_tag_list(text)
    assert tags is not None
    assert not (tags.malformed and (tags.any or tags.tags))


@given(st.one_of(grammar_text, any_text))
def test_list_accepted_exactly_when_grammar_matches(text: str) -> None:
    parsed = parse_tag_list(text)
    assert parsed is not None
    assert parsed.malformed == (_REF_LIST.fullmatch(text) is None)
    if not parsed.malformed and not parsed.any:
        assert [str(t) for t in parsed.tags] == re.findall(_REF_TAG, text)


# --- examples -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"abc"', EntityTag("abc")),
        ('W/"abc"', EntityTag("abc", weak=True)),
        ('""', EntityTag("")),
        ('W/""', EntityTag("", weak=True)),
        (' \t"abc" ', EntityTag("abc")),  # OWS around a field value is not part of it
        ('"W/x"', EntityTag("W/x")),
        ('"*"', EntityTag("*")),
        ('"a!#~"', EntityTag("a!#~")),
        ('"\x80\xff"', EntityTag("\x80\xff")),  # obs-text
        ('"caf\u00e9-\u20ac"', EntityTag("caf\u00e9-\u20ac")),  # UTF-8 bytes are obs-text
        ('"\udc80"', EntityTag("\udc80")),  # surrogate-escaped byte 0x80
    ],
)
def test_valid_entity_tags(text: str, expected: EntityTag) -> None:
    assert parse_etag(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        'w/"abc"',  # weak indicator is case-sensitive (%s"W/")
        'W/ "abc"',  # no whitespace inside an entity-tag
        'W/abc',
        "abc",  # missing quotes
        '"abc',
        'abc"',
        '"a"b"',  # embedded quote
        '"a\\"b"',  # no quoted-pair escape in opaque-tag
        '"a b"',  # SP is not etagc
        '"a\tb"',
        '"a\x7f"',  # DEL
        '"a\x00"',  # control characters
        '"a\n"',
        '"a", "b"',  # a list is not one entity-tag
        "*",
        "",
        " ",
        'W/W/"a"',
        '/"a"',
        'W"a"',
    ],
)
def test_invalid_entity_tags(text: str) -> None:
    assert parse_etag(text) is None


def test_serialisation() -> None:
    assert str(EntityTag("x")) == '"x"'
    assert str(EntityTag("x", weak=True)) == 'W/"x"'


@pytest.mark.parametrize(
    ("tag", "token"),
    [
        (EntityTag("abc"), "abc"),
        (EntityTag("abc-gzip"), "abc"),
        (EntityTag("abc-gzip-json"), "abc"),
        (EntityTag("abc-x", weak=True), "abc"),
        (EntityTag("-x"), ""),
        (EntityTag(""), ""),
    ],
)
def test_token_is_opaque_up_to_first_dash(tag: EntityTag, token: str) -> None:
    assert tag.token == token


@pytest.mark.parametrize(
    ("a", "b", "strong", "weak"),
    [
        # The example table of RFC 9110 §8.8.3.2.
        ('W/"1"', 'W/"1"', False, True),
        ('W/"1"', 'W/"2"', False, False),
        ('W/"1"', '"1"', False, True),
        ('"1"', '"1"', True, True),
    ],
)
def test_rfc_comparison_table(a: str, b: str, strong: bool, weak: bool) -> None:
    tag_a, tag_b = parse_etag(a), parse_etag(b)
    assert tag_a is not None and tag_b is not None
    assert strong_match(tag_a, tag_b) is strong
    assert weak_match(tag_a, tag_b) is weak


@pytest.mark.parametrize(
    ("text", "tags"),
    [
        ('"a"', ['"a"']),
        ('"a","b"', ['"a"', '"b"']),
        ('"a" , W/"b"', ['"a"', 'W/"b"']),
        ('\t"a"\t,\t"b"\t', ['"a"', '"b"']),
        ('"a", ,"b"', ['"a"', '"b"']),  # empty elements (RFC 9110 §5.6.1.2)
        (", ,", []),
        (",", []),
        ("", []),
        ('"a",', ['"a"']),
        (',"a"', ['"a"']),
        ('"a,b"', ['"a,b"']),  # a comma inside quotes belongs to the tag
        ('"*"', ['"*"']),
    ],
)
def test_valid_lists(text: str, tags: list[str]) -> None:
    parsed = parse_tag_list(text)
    assert parsed is not None
    assert not parsed.malformed and not parsed.any
    assert [str(t) for t in parsed.tags] == tags


@pytest.mark.parametrize("text", ["*", " * ", "\t*"])
def test_star(text: str) -> None:
    assert parse_tag_list(text) == TagList(any=True, tags=())


@pytest.mark.parametrize(
    "text",
    [
        '*, "a"',  # "*" cannot be mixed with tags
        '"a", *',
        "*, *",  # "*" is not a list element
        "*,",
        "**",
        '"a" "b"',  # elements need a comma between them
        '"a";"b"',
        'W/"a" w/"b"',
        'w/"a"',
        "a",
        '"a',
        '"a", b',
        '"a", "b',
        '"a" x',
        '"a\x00"',
        '"a"\x0b',
    ],
)
def test_malformed_lists(text: str) -> None:
    parsed = parse_tag_list(text)
    assert parsed == TagList(any=False, tags=(), malformed=True)


def test_absent_header() -> None:
    assert parse_tag_list(None) is None


def test_make_etag() -> None:
    assert make_etag("mfrggzdfmztwq2lknnwg23tp") == EntityTag("mfrggzdfmztwq2lknnwg23tp")
    tag = make_etag("mfrggzdfmztwq2lknnwg23tp", "gzip")
    assert str(tag) == '"mfrggzdfmztwq2lknnwg23tp-gzip"'
    assert not tag.weak
    assert tag.token == "mfrggzdfmztwq2lknnwg23tp"
    assert make_etag("tok", "a-b").token == "tok"


@pytest.mark.parametrize(
    ("token", "variant"),
    [("", ""), ("a-b", ""), ('a"b', ""), ("a b", ""), ("tok", 'x"y'), ("tok", "x y")],
)
def test_make_etag_refuses_what_would_not_be_its_own_tag(token: str, variant: str) -> None:
    with pytest.raises(ValueError):
        make_etag(token, variant)


def test_random_bytes_differ_between_a_process_and_its_forked_child():
    """Buffered randomness must not be handed out twice across a fork
    (two workers minting the same token)."""
    import os

    from etagproxy.randomness import random_bytes

    random_bytes(1)  # the parent now holds a block
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, random_bytes(32))
        os._exit(0)
    os.close(write)
    child = os.read(read, 32)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != random_bytes(32)


@given(st.binary(min_size=15, max_size=15))
def test_new_token_is_the_base32_of_its_random_bytes(raw: bytes) -> None:
    """The lookup-table encoding gives what `base64.b32encode` gives."""
    import base64
    from unittest import mock

    from etagproxy.store import base

    with mock.patch.object(base, "random_bytes", return_value=raw):
        token = base.new_token()
    assert token == base64.b32encode(raw).decode("ascii").lower()
    assert len(token) == 24 and "-" not in token
