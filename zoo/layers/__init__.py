"""moezoo.zoo.layers: the routed blocks (MoE, MoH attention, ...) on one base, and the layers models share."""

from .connectors import MoEConnector, QueryResampler, mlp_projector
from .dcmoe import DynamicCapacityMoE, anneal_aux_weight, set_aux_weight
from .modality import IntraInterMoE, ModalityGroupMoE, ModalityUntiedAttention, ModalityUntiedFeedForward
from .moe import EXPERT_KINDS, ROUTERS, GatedMLP, MoE, Router, gather_expert_state_dict, shard_model_experts
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
    "DynamicCapacityMoE",
    "GatedMLP",
    "IntraInterMoE",
    "MoE",
    "MoEConnector",
    "MoHAttention",
    "ModalityGroupMoE",
    "ModalityUntiedAttention",
    "ModalityUntiedFeedForward",
    "QueryResampler",
    "RoutedBlock",
    "Router",
    "RoutingRecord",
    "anneal_aux_weight",
    "collect_routing",
    "freeze",
    "gather_expert_state_dict",
    "mlp_projector",
    "routed_blocks",
    "routing_maps",
    "set_aux_weight",
    "set_backend",
    "shard_model_experts",
    "total_aux_loss",
    "unfreeze",
]
