"""Expert parallelism under Lightning: :class:`ExpertParallelStrategy`, DDP with the MoE experts sharded.

Every rank is a data-parallel rank (its own batches, a DistributedSampler as with DDP). The ranks form a
:class:`~torch.distributed.device_mesh.DeviceMesh` of shape ``(world / ep_size, ep_size)`` with dimensions
``("expert_data", "expert")``: along ``expert`` the ``ep_size`` ranks of one expert-parallel group share out the
experts of every :class:`~moezoo.zoo.layers.MoE` block (``shard_model_experts``); along ``expert_data`` sit the
ranks that hold the same experts. So:

- dense parameters (attention, router, shared experts, embeddings) are DDP's: replicated, all-reduced (mean)
  over all ranks; the experts are told apart by name (DDP's parameters-to-ignore) and by their mark
  (``moezoo.kernels.expert_parallel.is_expert_parameter``);
- expert gradients are reduced once per optimizer step, after the last backward of an accumulation and before
  gradient clipping, over the ``expert_data`` group only, divided by the world size like DDP's
  (``reduce_gradients``; Megatron's rule);
- checkpoints hold every expert whole (``gather_expert_state_dict``; each optimizer state tensor shaped like an
  expert parameter is gathered too), so a checkpoint saved by R ranks loads in one process and one saved by one
  process (or any ``ep_size`` that divides the experts) loads into R ranks, each keeping its own rows.

The sharding happens in the strategy's ``setup``, after the LightningModule's ``configure_model`` and the
restore of a checkpoint's weights, before DDP wraps the module and before the optimizers are made (they see the
sharded parameters). Routing record and aux losses are those of the ``routing`` group's whole batch:
``"expert"`` (default: one expert-parallel group) or ``"data"`` (all ranks: R processes compute exactly what one
process computes on their concatenated batch, at the cost of all-gathering the router outputs over all ranks).

CPU (gloo) and GPU (NCCL) take the same path. Importing this module registers the strategy as
``"expert_parallel"`` (``moezoo-train ... --trainer.strategy expert_parallel``); the CLI imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from moezoo.kernels.expert_parallel import all_gather_rows, is_expert_parameter, reduce_gradients
from moezoo.zoo.layers import gather_expert_state_dict, routed_blocks
from moezoo.zoo.layers.moe import MoE

__all__ = ["ExpertParallelStrategy", "expert_parallel_mesh"]

ROUTING = ("expert", "data")


def expert_parallel_mesh(ep_size: int | None, device_type: str) -> DeviceMesh:
    """The ``("expert_data", "expert")`` mesh of all ranks, ``ep_size`` (None: all) ranks per expert group."""
    world_size = dist.get_world_size()
    ep_size = ep_size or world_size
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size must divide the {world_size} ranks, got {ep_size}")
    return init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("expert_data", "expert"))


class ExpertParallelStrategy(DDPStrategy):
    """DDP over all ranks with every MoE block's experts sharded over expert-parallel groups of ``ep_size`` ranks
    (None: all ranks, one group). ``routing``: "expert" or "data", the group whose whole batch the routing
    record, capacity and aux losses see. ``pad_to_capacity``: capacity-padded equal all-to-all splits. Other
    keyword arguments go to :class:`~lightning.pytorch.strategies.DDPStrategy`."""

    strategy_name = "expert_parallel"

    def __init__(self, ep_size: int | None = None, routing: str = "expert", pad_to_capacity: bool = False,
                 **ddp_kwargs: Any):
        super().__init__(**ddp_kwargs)
        if routing not in ROUTING:
            raise ValueError(f"routing must be one of {ROUTING}, got {routing!r}")
        if ep_size is not None and (isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1):
            raise ValueError(f"ep_size must be a positive integer or None (all ranks), got {ep_size!r}")
        self.ep_size, self.routing, self.pad_to_capacity = ep_size, routing, pad_to_capacity
        self.mesh: DeviceMesh | None = None

    # --------------------------------------------------------------------------------------------- setup

    def setup(self, trainer) -> None:
        self._shard_experts()
        super().setup(trainer)

    def _shard_experts(self) -> None:
        """Shard every MoE block not sharded yet, and tell DDP (and Lightning's broadcast of the module's
        states from rank 0) to leave the experts alone: each rank's are its own."""
        module = self.lightning_module
        if self.mesh is None:
            self.mesh = expert_parallel_mesh(self.ep_size, self.root_device.type)
        routing_group = self.mesh.get_group("expert") if self.routing == "expert" else dist.group.WORLD
        unsharded = [b for _, b in routed_blocks(module) if isinstance(b, MoE) and not b.expert_parallel]
        if not unsharded:
            return
        for block in unsharded:
            block.shard_experts(self.mesh.get_group("expert"), routing_group=routing_group,
                                pad_to_capacity=self.pad_to_capacity)
        expert_names = [name for name, p in module.named_parameters() if is_expert_parameter(p)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, expert_names)

    # --------------------------------------------------------------------------------------------- gradients

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        """The experts' gradients are reduced right after the closure's backward (the last of an accumulation),
        before Lightning clips gradients and steps."""

        def closure_then_reduce_experts():
            result = closure()
            experts = [p for group in optimizer.param_groups for p in group["params"] if is_expert_parameter(p)]
            reduce_gradients(experts, expert_data_group=self.mesh.get_group("expert_data"))
            return result

        return super().optimizer_step(optimizer, closure_then_reduce_experts, model, **kwargs)

    # --------------------------------------------------------------------------------------------- checkpoints

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Every expert whole (collective: Lightning dumps checkpoints on every rank, rank 0 writes)."""
        return gather_expert_state_dict(self.lightning_module)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer's state with each expert parameter's per-parameter tensors (Adam's moments...) gathered
        over its expert-parallel group, as one process would hold them."""
        state = super().optimizer_state(optimizer)
        group = self.mesh.get_group("expert")
        for index, param in self._indexed_params(optimizer):
            if is_expert_parameter(param) and index in state["state"]:
                # a new dict: state_dict() shares the per-parameter dicts with the live optimizer
                state["state"][index] = {key: all_gather_rows(value, group) if _shaped_like(value, param) else value
                                         for key, value in state["state"][index].items()}
        return state

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Each expert parameter's state tensors saved whole (by R ranks or by one process) cut to this rank's
        rows before the optimizers load them."""
        group = self.mesh.get_group("expert")
        rank = dist.get_rank(group)
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            for index, param in self._indexed_params(optimizer):
                if is_expert_parameter(param) and index in saved["state"]:
                    saved["state"][index] = {key: _own_rows(value, param, rank)
                                             for key, value in saved["state"][index].items()}
        super().load_optimizer_state_dict(checkpoint)

    @staticmethod
    def _indexed_params(optimizer) -> list[tuple[int, torch.nn.Parameter]]:
        """(index in the optimizer's state dict, parameter): torch numbers parameters over all groups in order."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        return list(enumerate(p for group in optimizer.param_groups for p in group["params"]))


StrategyRegistry.register(ExpertParallelStrategy.strategy_name, ExpertParallelStrategy, override=True,
                          description="DDP with the MoE experts sharded over expert-parallel groups (moezoo)")


def _shaped_like(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _own_rows(value: Any, param: torch.Tensor, rank: int) -> Any:
    """A saved whole-experts state tensor cut to the rows of ``param`` (this rank's experts); anything else as is."""
    rows = param.shape[0]
    if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.shape[1:] == param.shape[1:] \
            and value.shape[0] != rows:
        return value[rank * rows:(rank + 1) * rows]
    return value
