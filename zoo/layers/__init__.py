"""moezoo.zoo.layers: the MoE block family and the layers models are built from."""

from .moe import (
    AUX_LOSSES,
    EXPERT_KINDS,
    ROUTERS,
    GatedMLP,
    MoE,
    Router,
    RoutingRecord,
    collect_routing,
    set_backend,
    total_aux_loss,
)

__all__ = [
    "AUX_LOSSES",
    "EXPERT_KINDS",
    "ROUTERS",
    "GatedMLP",
    "MoE",
    "Router",
    "RoutingRecord",
    "collect_routing",
    "set_backend",
    "total_aux_loss",
]
