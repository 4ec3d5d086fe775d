"""Every contract survives encode/decode, built by Hypothesis from its own constraints."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rucher.proto import catalog

JSON_INT = 2**53
COLLECTION_MAX = 3


def _bounds(t: mi.IntType) -> tuple[int, int]:
    low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -JSON_INT)
    high = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else JSON_INT)
    return low, high


def _text(t: mi.StrType) -> st.SearchStrategy[str]:
    low, high = t.min_length or 0, t.max_length
    if t.pattern is None:
        return st.text(min_size=low, max_size=high if high is not None else max(low, 24))
    strings = st.from_regex(t.pattern, fullmatch=True)
    if low or high is not None:
        strings = strings.filter(lambda s: low <= len(s) <= (high if high is not None else len(s)))
    return strings


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers(-JSON_INT, JSON_INT) | st.text(max_size=8)
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=COLLECTION_MAX)
            | st.dictionaries(st.text(max_size=6), inner, max_size=COLLECTION_MAX)
        ),
        max_leaves=6,
    )


def _collection(t: mi.CollectionType) -> st.SearchStrategy[Any]:
    low = t.min_length or 0
    high = t.max_length if t.max_length is not None else max(low, COLLECTION_MAX)
    items = st.lists(strategy_for(t.item_type), min_size=low, max_size=high)
    if isinstance(t, mi.VarTupleType):
        return items.map(tuple)
    if isinstance(t, mi.FrozenSetType):
        return items.map(frozenset)
    if isinstance(t, mi.SetType):
        return items.map(set)
    return items


def _struct(t: mi.StructType) -> st.SearchStrategy[Any]:
    required = {f.name: strategy_for(f.type) for f in t.fields if f.required}
    optional = {f.name: strategy_for(f.type) for f in t.fields if not f.required}
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: t.cls(**kw))


def strategy_for(t: mi.Type) -> st.SearchStrategy[Any]:
    """Values of a msgspec type, honouring its constraints (bounds, lengths, patterns)."""
    match t:
        case mi.Metadata():
            return strategy_for(t.type)
        case mi.NoneType():
            return st.none()
        case mi.BoolType():
            return st.booleans()
        case mi.IntType():
            return st.integers(*_bounds(t))
        case mi.FloatType():
            return st.floats(
                min_value=t.ge if t.ge is not None else t.gt,
                max_value=t.le if t.le is not None else t.lt,
                exclude_min=t.gt is not None,
                exclude_max=t.lt is not None,
                allow_nan=False,
                allow_infinity=False,
            )
        case mi.StrType():
            return _text(t)
        case mi.BytesType():
            return st.binary(max_size=16)
        case mi.EnumType():
            return st.sampled_from(list(t.cls))
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.CollectionType():
            return _collection(t)
        case mi.TupleType():
            return st.tuples(*(strategy_for(item) for item in t.item_types))
        case mi.DictType():
            return st.dictionaries(
                strategy_for(t.key_type), strategy_for(t.value_type), max_size=COLLECTION_MAX
            )
        case mi.UnionType():
            return st.one_of([strategy_for(member) for member in t.types])
        case mi.StructType():
            return _struct(t)
        case mi.AnyType():
            return _json_values()
    raise NotImplementedError(f"no strategy for {t!r}")


@functools.cache
def _instances(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    return strategy_for(mi.type_info(cls))


def _union() -> Any:
    union: Any = None
    for cls in catalog.MESSAGES:
        union = cls if union is None else union | cls
    return union


ANY_MESSAGE = msgspec.json.Decoder(_union())
CONTRACTS = [*catalog.MESSAGES, *catalog.RECORDS]


@pytest.mark.parametrize("cls", CONTRACTS, ids=catalog.contract_name)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_contract_round_trips(cls: type[msgspec.Struct], data: st.DataObject) -> None:
    value = data.draw(_instances(cls))
    wire = msgspec.json.encode(value)
    assert msgspec.json.decode(wire, type=cls) == value
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=cls) == value
    if catalog.is_message(cls):
        # A consumer that decodes any message by its tag gets the same value back.
        assert ANY_MESSAGE.decode(wire) == value


@pytest.mark.parametrize("cls", CONTRACTS, ids=catalog.contract_name)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_readers_ignore_fields_they_do_not_know(
    cls: type[msgspec.Struct], data: st.DataObject
) -> None:
    """A newer writer's extra field never breaks an older reader (additive evolution)."""
    value = data.draw(_instances(cls))
    document = msgspec.to_builtins(value)
    document["field_from_the_future"] = {"nested": [1, 2, 3]}
    assert msgspec.json.decode(msgspec.json.encode(document), type=cls) == value
