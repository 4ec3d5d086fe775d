"""Every contract in one place: the modules, their messages, records and subjects.

The generator, the contract tests and any tool that needs the whole bus vocabulary read it from
here. A *message* is a tagged Struct that travels on a subject (commands, queries, events,
replies and the error reply); a *record* is an untagged Struct: a KV value, a stream entry, or a
value nested in messages.
"""

from __future__ import annotations

import inspect
from types import ModuleType

import msgspec

from rucher.proto import (
    base,
    bus,
    cluster,
    common,
    compute,
    container,
    errors,
    firewall,
    gpu,
    guest,
    ha,
    iam,
    iam_state,
    node,
    scheduler,
    storage,
    task,
)
from rucher.proto.base import Subject

MODULES: tuple[ModuleType, ...] = (
    errors,
    common,
    bus,
    task,
    guest,
    node,
    cluster,
    compute,
    container,
    storage,
    scheduler,
    gpu,
    iam_state,
    iam,
    firewall,
    ha,
)

# Base classes that are never sent themselves.
ABSTRACT: frozenset[type[msgspec.Struct]] = frozenset(
    {base.Message, base.Command, base.Event, base.Reply, common.Query, common.GuestCommand}
)

# What each KV bucket of rucher.proto.streams holds, by bucket name.
BUCKET_VALUES: dict[str, type[msgspec.Struct]] = {
    "tasks": task.TaskState,
    "guests": guest.GuestRecord,
    "leases": node.LeaseRecord,
    "ha-node-{node}": node.LeaseRecord,
    "services": node.LeaseRecord,
    "idempotency": bus.AppliedCommand,
    "allocations": scheduler.NodeAllocations,
    "claims": scheduler.Claim,
    "storage": storage.StorageRecord,
    "mappings": gpu.PciMapping,
    "gpu_leases": gpu.GpuLease,
}


def short_module(cls: type) -> str:
    """The contract module's short name (``compute`` for ``rucher.proto.compute``)."""
    return cls.__module__.rsplit(".", 1)[-1]


def _structs(module: ModuleType) -> list[type[msgspec.Struct]]:
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == module.__name__
        and value not in ABSTRACT
    ]


def is_message(cls: type[msgspec.Struct]) -> bool:
    """Whether ``cls`` is a tagged message (as opposed to a record)."""
    return cls.__struct_config__.tag_field is not None


def tag_of(cls: type[msgspec.Struct]) -> str:
    """A message's wire tag."""
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{cls.__qualname__} has no string tag")
    return tag


def record_name(cls: type[msgspec.Struct]) -> str:
    """A record's stable name: its module's short name and class name (``guest.GuestRecord``)."""
    return f"{short_module(cls)}.{cls.__name__}"


def contract_name(cls: type[msgspec.Struct]) -> str:
    """A message's tag, or a record's name."""
    return tag_of(cls) if is_message(cls) else record_name(cls)


def _subjects(modules: tuple[ModuleType, ...]) -> list[Subject[msgspec.Struct]]:
    found = {
        value.pattern: value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, Subject)
    }
    return [found[pattern] for pattern in sorted(found)]


_ALL_STRUCTS = [cls for module in MODULES for cls in _structs(module)]

MESSAGES: tuple[type[msgspec.Struct], ...] = tuple(
    sorted((cls for cls in _ALL_STRUCTS if is_message(cls)), key=tag_of)
)
RECORDS: tuple[type[msgspec.Struct], ...] = tuple(
    sorted((cls for cls in _ALL_STRUCTS if not is_message(cls)), key=record_name)
)
SUBJECTS: tuple[Subject[msgspec.Struct], ...] = tuple(_subjects(MODULES))
