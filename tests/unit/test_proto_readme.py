"""proto/README.md documents every stream, bucket, object store and error code the code has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rucher.proto.errors import HTTP_STATUS, RETRYABLE, ErrorCode
from rucher.proto.streams import BUCKET_FAMILIES, BUCKETS, OBJECT_STORES, STREAMS

README = (Path(__file__).resolve().parents[2] / "proto" / "README.md").read_text()


def _rows() -> dict[str, list[str]]:
    rows = {}
    for line in README.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and re.fullmatch(r"`[^`]+`( \(.*\))?", cells[0]):
            rows[cells[0].split("`")[1]] = cells
    return rows


@pytest.mark.parametrize(
    "name", [s.name for s in STREAMS] + [b.name for b in (*BUCKETS, *BUCKET_FAMILIES)]
)
def test_every_stream_and_bucket_is_documented(name):
    assert name in _rows()


@pytest.mark.parametrize("store", OBJECT_STORES, ids=lambda s: s.name)
def test_every_object_store_is_documented(store):
    assert store.name in _rows()


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_documented_with_its_status(code):
    row = _rows()[code.value]
    assert row[1] == str(HTTP_STATUS[code])
    assert row[2] == ("yes" if code in RETRYABLE else "no")
