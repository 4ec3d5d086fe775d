"""Firewall (Proxmox ``pve-firewall``): ruleset changes and their application on each node.

Rulesets live in the cluster store with a revision that grows with every change. A change is an
event; each node's firewall agent compiles the rulesets that concern it and applies them
atomically (``cmd.firewall.ruleset_apply.{node}`` asks for it explicitly), then reports the
revision it applied. Invalid rules are dropped with a warning, never applied half-way.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Command, Event, Kind, Scope, Subject
from rucher.proto.common import AuthId, ChangeKind, NodeName, Seconds, Vmid

Revision = Annotated[
    int, msgspec.Meta(ge=0, description="The firewall configuration's revision in the store.")
]


class RulesetScope(StrEnum):
    """Which file a ruleset is, in Proxmox's terms: cluster.fw, host.fw or <VMID>.fw."""

    CLUSTER = "cluster"
    HOST = "host"
    GUEST = "guest"


class RulesetChanged(Event, frozen=True, kw_only=True, tag="firewall.ruleset.changed"):
    """A ruleset's rules, groups, aliases, IP sets or options changed.

    ``host`` names the node of a host ruleset, ``vmid`` the guest of a guest ruleset.
    """

    scope: RulesetScope
    revision: Revision
    change: ChangeKind
    host: NodeName | None = None
    vmid: Vmid | None = None
    actor: AuthId | None = None


class ApplyRuleset(Command, frozen=True, kw_only=True, tag="firewall.ruleset.apply"):
    """Compile and apply the node's rulesets at ``revision`` or later; ``vmids`` narrows it."""

    revision: Revision
    vmids: tuple[Vmid, ...] | None = None
    reason: str = ""


class RulesetApplied(Event, frozen=True, kw_only=True, tag="firewall.ruleset.applied"):
    """The node now enforces the rulesets at ``revision``; dropped rules are in ``warnings``."""

    revision: Revision
    rules: Annotated[int, msgspec.Meta(ge=0)]
    duration: Seconds
    warnings: tuple[str, ...] = ()


class RulesetApplyFailed(Event, frozen=True, kw_only=True, tag="firewall.ruleset.apply_failed"):
    """The node could not apply ``revision`` and still enforces ``enforced``."""

    revision: Revision
    reason: str
    enforced: Revision | None = None


RULESET_CHANGED = Subject(
    "evt.firewall.ruleset_changed.{node}",
    RulesetChanged,
    Kind.EVENT,
    Scope.NODE,
    "A firewall ruleset changed (published by the instance on {node} that changed it).",
)
RULESET_APPLY = Subject(
    "cmd.firewall.ruleset_apply.{node}",
    ApplyRuleset,
    Kind.COMMAND,
    Scope.NODE,
    "Apply the current rulesets on {node}; durable, applied once.",
)
RULESET_APPLIED = Subject(
    "evt.firewall.ruleset_applied.{node}",
    RulesetApplied,
    Kind.EVENT,
    Scope.NODE,
    "{node} now enforces a ruleset revision.",
)
RULESET_APPLY_FAILED = Subject(
    "evt.firewall.ruleset_apply_failed.{node}",
    RulesetApplyFailed,
    Kind.EVENT,
    Scope.NODE,
    "{node} failed to apply a ruleset revision.",
)
