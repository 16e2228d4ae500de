"""moezoo.zoo.layers: the routed blocks (MoE, MoH attention, ...) on one base, and the layers models share."""

from .moe import EXPERT_KINDS, ROUTERS, GatedMLP, MoE, Router
from .moh import MoHAttention
from .routed import (
    AUX_LOSSES,
    RoutedBlock,
    RoutingRecord,
    collect_routing,
    freeze,
    routed_blocks,
    routing_maps,
    set_backend,
    total_aux_loss,
    unfreeze,
)

__all__ = [
    "AUX_LOSSES",
    "EXPERT_KINDS",
    "ROUTERS",
    "GatedMLP",
    "MoE",
    "MoHAttention",
    "RoutedBlock",
    "Router",
    "RoutingRecord",
    "collect_routing",
    "freeze",
    "routed_blocks",
    "routing_maps",
    "set_backend",
    "total_aux_loss",
    "unfreeze",
]
