"""Typed subjects: parameters are encoded, patterns checked, wildcards built."""

from __future__ import annotations

import pytest

from rucher.proto.base import Kind, Scope, Subject
from rucher.proto.task import TASK_LOG, TASK_STARTED, TaskStarted


def test_parameters_are_encoded_as_tokens():
    address = TASK_LOG.to(node="n1", upid="UPID:n1:1:")
    assert address.subject == "tasklog.n1.UPID=3An1=3A1=3A"
    assert address.of is TASK_LOG


def test_missing_parameters_are_refused():
    with pytest.raises(ValueError, match="needs"):
        TASK_STARTED.to()


def test_wildcards_fill_only_what_is_given():
    assert TASK_LOG.wildcard() == "tasklog.*.*"
    assert TASK_LOG.wildcard(node="n.2") == "tasklog.n=2E2.*"


def test_a_subject_must_match_its_kind_and_scope():
    with pytest.raises(ValueError, match="must start with"):
        Subject("cmd.unit.x", TaskStarted, Kind.EVENT, Scope.CLUSTER, "wrong kind")
    with pytest.raises(ValueError, match="lacks a"):
        Subject("evt.unit.y", TaskStarted, Kind.EVENT, Scope.NODE, "no node")
    with pytest.raises(ValueError, match="defined twice"):
        Subject("evt.task.started.{node}", TaskStarted, Kind.EVENT, Scope.NODE, "again")


def test_a_malformed_payload_names_the_field_at_fault():
    from rucher.bus import RucherError
    from rucher.bus.codec import decode
    from rucher.proto.errors import ErrorCode
    from rucher.proto.task import TaskLogLine

    with pytest.raises(RucherError) as wrong_type:
        decode(b'{"n": "one", "t": "x", "time": 1}', TaskLogLine)
    assert wrong_type.value.code is ErrorCode.MALFORMED
    assert wrong_type.value.details == {"field": "n"}
    with pytest.raises(RucherError) as missing:
        decode(b'{"n": 1, "time": 1}', TaskLogLine)
    assert missing.value.details == {"field": "t"}
    with pytest.raises(RucherError) as garbage:
        decode(b"not json", TaskLogLine)
    assert garbage.value.details == {}
