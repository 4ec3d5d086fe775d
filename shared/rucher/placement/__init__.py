"""Pure placement: the columnar cluster view, filters, weighers and the decisions built on them.

Shared by the scheduler service and the HA manager (and its simulator); imports nothing but
``rucher.proto`` and numpy, does no I/O, and never changes a view it is given except through the
view's own update methods.
"""

from rucher.placement.demand import Demand, PlacementError, compile_demand
from rucher.placement.engine import DEFAULT_OPTIONS, Decision, Options, place, place_demand
from rucher.placement.group import place_group, suggest_migration
from rucher.placement.rebalance import Plan, imbalance, rebalance_plan
from rucher.placement.view import ClusterView, Reservation

__all__ = [
    "DEFAULT_OPTIONS",
    "ClusterView",
    "Decision",
    "Demand",
    "Options",
    "PlacementError",
    "Plan",
    "Reservation",
    "compile_demand",
    "imbalance",
    "place",
    "place_demand",
    "place_group",
    "rebalance_plan",
    "suggest_migration",
]
