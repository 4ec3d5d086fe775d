"""termproxy's client protocol as the gateway parses it: data, resize, ping, split and joined."""

from __future__ import annotations

import pytest

from rucher.bus import RucherError
from rucher.gateway.routes.qemu_console import TermproxyParser


def test_messages_are_parsed_whether_joined_or_split():
    parser = TermproxyParser()
    assert parser.feed(b"0:3:ls\n2") == [("data", b"ls\n"), ("ping", b"")]
    assert parser.feed(b"1:80:2") == []
    assert parser.feed(b"4:0:5:he") == [("resize", b"80:24")]
    assert parser.feed(b"llo") == [("data", b"hello")]


def test_the_length_counts_bytes_not_characters():
    text = "é:\n".encode()
    assert TermproxyParser().feed(b"0:%d:" % len(text) + text) == [("data", text)]


@pytest.mark.parametrize("message", [b"9", b"0:x:abc", b"1:a:b:"])
def test_malformed_messages_are_refused(message):
    with pytest.raises(RucherError):
        TermproxyParser().feed(message)
