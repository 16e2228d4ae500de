"""Expert parallelism under Lightning: MoE experts sharded over expert-parallel groups, the rest data parallel.

Every rank is a data-parallel rank (its own batches, a DistributedSampler as with DDP). The ranks form a
:class:`~torch.distributed.device_mesh.DeviceMesh` of shape ``(world / ep_size, ep_size)`` with dimensions
``("expert_data", "expert")``: along ``expert`` the ``ep_size`` ranks of one expert-parallel group share out the
experts of every :class:`~moezoo.zoo.layers.MoE` block (``shard_model_experts``); along ``expert_data`` sit the
ranks that hold the same experts. Two strategies, both registered by importing this module:

- :class:`ExpertParallelStrategy` (``--trainer.strategy expert_parallel``): DDP for the dense parameters
  (attention, router, shared experts, embeddings): replicated, all-reduced (mean) over all ranks; the experts
  are told apart by name (DDP's parameters-to-ignore) and by their mark
  (``moezoo.kernels.expert_parallel.is_expert_parameter``). It shards the experts itself, in its ``setup``,
  after the LightningModule's ``configure_model`` and the restore of a checkpoint's weights, before DDP wraps
  the module and before the optimizers are made (they see the sharded parameters). Any LightningModule.
- :class:`ExpertParallelFSDPStrategy` (``expert_parallel_fsdp``): Lightning's ``ModelParallelStrategy`` with
  FSDP2 (``fully_shard``) for the dense parameters (tested on CPU with gloo: torch 2.14 and Lightning 2.6 run
  it there; NCCL takes the same calls). As Lightning's strategy asks, the
  LightningModule parallelises itself in ``configure_model``, by calling :func:`fully_shard_moe`: it builds the
  mesh, shards the experts and fully shards the given modules (default: its children with trainable
  parameters) as HSDP on the mesh (dense parameters sharded along ``expert``, replicated along
  ``expert_data``: gradients averaged over all ranks), the experts left to the strategy. FSDP2 all-gathers a
  module's parameters in its ``forward``: each fully sharded module must be called through it.

In both, expert gradients are reduced once per optimizer step, after the last backward of an accumulation and
before gradient clipping, over the ``expert_data`` group only, divided by the world size like the dense ones
(``reduce_gradients``; Megatron's rule), and checkpoints are one process's: every expert whole
(``gather_expert_state_dict``), FSDP's shards gathered, each optimizer state tensor of an expert or a sharded
parameter gathered too. So a checkpoint saved by R ranks loads in one process, and one saved by one process (or
by any ``ep_size`` that divides the experts, under either strategy) loads into R ranks, each keeping its own
rows. Routing record and aux losses are those of the ``routing`` group's whole batch: ``"expert"`` (default:
one expert-parallel group) or ``"data"`` (all ranks: R processes compute exactly what one process computes on
their concatenated batch, at the cost of all-gathering the router outputs over all ranks). Gradient clipping
by norm (``gradient_clip_val``) uses the norm of the whole model's gradient, every rank's experts counted once
(Lightning's own would clip each rank by the norm of its own experts: the ranks would clip differently).

CPU (gloo) and GPU (NCCL) take the same path (``moezoo-train ... --trainer.strategy expert_parallel``; the CLI
imports this module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.strategy import Strategy
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from moezoo.kernels.expert_parallel import all_gather_rows, clip_grad_norm_, is_expert_parameter, reduce_gradients
from moezoo.zoo.layers import gather_expert_state_dict, routed_blocks
from moezoo.zoo.layers.moe import MoE

__all__ = ["ExpertParallelFSDPStrategy", "ExpertParallelStrategy", "expert_parallel_mesh", "fully_shard_moe",
           "shard_experts_on_mesh"]

ROUTING = ("expert", "data")


def expert_parallel_mesh(ep_size: int | None, device_type: str) -> DeviceMesh:
    """The ``("expert_data", "expert")`` mesh of all ranks, ``ep_size`` (None: all) ranks per expert group."""
    world_size = dist.get_world_size()
    ep_size = ep_size or world_size
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size must divide the {world_size} ranks, got {ep_size}")
    return init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("expert_data", "expert"))


def _check_setting(ep_size: int | None, routing: str) -> None:
    if routing not in ROUTING:
        raise ValueError(f"routing must be one of {ROUTING}, got {routing!r}")
    if ep_size is not None and (isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1):
        raise ValueError(f"ep_size must be a positive integer or None (all ranks), got {ep_size!r}")


def shard_experts_on_mesh(module: nn.Module, mesh: DeviceMesh, routing: str = "expert",
                          pad_to_capacity: bool = False) -> list[str]:
    """Shard every MoE block of ``module`` not sharded yet over ``mesh``'s ``expert`` dimension, routing over
    that group (``routing="expert"``) or all ranks (``"data"``); the names of ``module``'s expert parameters."""
    routing_group = mesh.get_group("expert") if routing == "expert" else dist.group.WORLD
    for _, block in routed_blocks(module):
        if isinstance(block, MoE) and not block.expert_parallel:
            block.shard_experts(mesh.get_group("expert"), routing_group=routing_group, pad_to_capacity=pad_to_capacity)
    return [name for name, p in module.named_parameters() if is_expert_parameter(p)]


def fully_shard_moe(module: nn.Module, ep_size: int | None = None, *, routing: str = "expert",
                    pad_to_capacity: bool = False, modules: Iterable[nn.Module] | None = None) -> DeviceMesh:
    """Expert parallelism with FSDP2 for the rest, for a LightningModule's ``configure_model`` under
    :class:`ExpertParallelFSDPStrategy` (collective: every rank calls it).

    Builds the ``("expert_data", "expert")`` mesh of all ranks (``ep_size`` per expert group, None: all), shards
    every MoE block's experts over ``expert`` (``routing``, ``pad_to_capacity``: as
    :class:`ExpertParallelStrategy`), and applies ``fully_shard`` to each of ``modules`` (default: the children
    of ``module`` with trainable parameters; each must run through its ``forward``) on the mesh as HSDP, the
    experts ignored (the strategy reduces them). The mesh is kept as ``module.expert_mesh``; returned."""
    _check_setting(ep_size, routing)
    if getattr(module, "expert_mesh", None) is not None:
        raise RuntimeError("fully_shard_moe was already applied to this module")
    mesh = expert_parallel_mesh(ep_size, "cuda" if dist.get_backend() == "nccl" else "cpu")
    shard_experts_on_mesh(module, mesh, routing, pad_to_capacity)
    if modules is None:
        modules = [child for child in module.children() if any(p.requires_grad for p in child.parameters())]
    for child in modules:
        experts = {p for p in child.parameters() if is_expert_parameter(p)}
        fully_shard(child, mesh=mesh, ignored_params=experts or None)
    module.expert_mesh = mesh
    return mesh


class _ExpertGradientsAndCheckpoints:
    """What both strategies add to Lightning's: the experts' gradient reduction once per optimizer step, and
    one process's checkpoints (experts gathered whole, FSDP's DTensors made whole; cut back on load)."""

    mesh: DeviceMesh | None

    def setup(self, trainer) -> None:
        self._clip_norms_over_all_experts()
        super().setup(trainer)

    def _clip_norms_over_all_experts(self) -> None:
        """Lightning's clipping by norm (``gradient_clip_val``) made expert-aware: the precision plugin's
        ``clip_grad_by_norm`` takes the norm of the whole model's gradient, every rank's experts included
        (``moezoo.kernels.expert_parallel.clip_grad_norm_``), not the norm of this rank's experts only, which
        would clip each rank differently. Only where the plugin clips as Lightning's base ``Precision`` does
        (a plugin with its own clipping keeps it). Clipping by value is elementwise: the same everywhere."""
        precision = self.precision_plugin
        if type(precision).clip_grad_by_norm is not Precision.clip_grad_by_norm:
            return

        def clip_grad_by_norm(optimizer, clip_val) -> None:
            clip_grad_norm_(precision.main_params(optimizer), clip_val, expert_group=self.mesh.get_group("expert"))

        precision.clip_grad_by_norm = clip_grad_by_norm  # this plugin instance only

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        """The experts' gradients are reduced right after the closure's backward (the last of an accumulation),
        before Lightning clips gradients and steps."""

        def closure_then_reduce_experts():
            result = closure()
            experts = [p for group in optimizer.param_groups for p in group["params"] if is_expert_parameter(p)]
            reduce_gradients(experts, expert_data_group=self.mesh.get_group("expert_data"))
            return result

        return super().optimizer_step(optimizer, closure_then_reduce_experts, model, **kwargs)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Every expert whole, every sharded tensor whole (collective: Lightning dumps checkpoints on every rank,
        rank 0 writes)."""
        return {name: _whole(value) for name, value in gather_expert_state_dict(self.lightning_module).items()}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """A one-process state dict: FSDP's parameters take their shards; MoE blocks keep their experts' rows."""
        state = dict(checkpoint["state_dict"])
        for name, value in self.lightning_module.state_dict().items():
            if isinstance(value, DTensor) and name in state:
                state[name] = _shard_like(state[name], value)
        self.lightning_module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer's state as one process holds it: each expert parameter's per-parameter tensors
        (Adam's moments...) gathered over its expert-parallel group, FSDP's sharded ones made whole."""
        state = Strategy.optimizer_state(self, optimizer)
        group = self.mesh.get_group("expert")
        for index, param in self._indexed_params(optimizer):
            if index in state["state"]:
                # a new dict: state_dict() shares the per-parameter dicts with the live optimizer
                state["state"][index] = {
                    key: all_gather_rows(value, group) if is_expert_parameter(param) and _shaped_like(value, param)
                    else _whole(value) for key, value in state["state"][index].items()}
        return state

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Each expert parameter's state tensors saved whole (by R ranks or by one process) cut to this rank's
        rows, each sharded parameter's to its shard, before the optimizers load them."""
        rank = dist.get_rank(self.mesh.get_group("expert"))
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            for index, param in self._indexed_params(optimizer):
                if index in saved["state"]:
                    saved["state"][index] = {
                        key: _own_rows(value, param, rank) if is_expert_parameter(param)
                        else _shard_like(value, param) if isinstance(param, DTensor) and _shaped_like(value, param)
                        else value for key, value in saved["state"][index].items()}
        Strategy.load_optimizer_state_dict(self, checkpoint)

    @staticmethod
    def _indexed_params(optimizer) -> list[tuple[int, torch.nn.Parameter]]:
        """(index in the optimizer's state dict, parameter): torch numbers parameters over all groups in order."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        return list(enumerate(p for group in optimizer.param_groups for p in group["params"]))


class ExpertParallelStrategy(_ExpertGradientsAndCheckpoints, DDPStrategy):
    """DDP over all ranks with every MoE block's experts sharded over expert-parallel groups of ``ep_size`` ranks
    (None: all ranks, one group). ``routing``: "expert" or "data", the group whose whole batch the routing
    record, capacity and aux losses see. ``pad_to_capacity``: capacity-padded equal all-to-all splits. Other
    keyword arguments go to :class:`~lightning.pytorch.strategies.DDPStrategy`."""

    strategy_name = "expert_parallel"

    def __init__(self, ep_size: int | None = None, routing: str = "expert", pad_to_capacity: bool = False,
                 **ddp_kwargs: Any):
        super().__init__(**ddp_kwargs)
        _check_setting(ep_size, routing)
        self.ep_size, self.routing, self.pad_to_capacity = ep_size, routing, pad_to_capacity
        self.mesh: DeviceMesh | None = None

    def setup(self, trainer) -> None:
        self._shard_experts()
        super().setup(trainer)

    def _shard_experts(self) -> None:
        """Shard every MoE block not sharded yet, and tell DDP (and Lightning's broadcast of the module's
        states from rank 0) to leave the experts alone: each rank's are its own."""
        if self.mesh is None:
            self.mesh = expert_parallel_mesh(self.ep_size, self.root_device.type)
        expert_names = shard_experts_on_mesh(self.lightning_module, self.mesh, self.routing, self.pad_to_capacity)
        if expert_names:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.lightning_module, expert_names)


class ExpertParallelFSDPStrategy(_ExpertGradientsAndCheckpoints, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) for a LightningModule whose ``configure_model`` calls
    :func:`fully_shard_moe`: every rank a data-parallel rank (Lightning's ``data_parallel`` mesh dimension
    spans all ranks, no tensor parallelism), the experts' gradients reduced over ``expert_data``, and
    checkpoints in one file as one process saves them. Keyword arguments: ``process_group_backend``,
    ``timeout`` (Lightning's)."""

    strategy_name = "expert_parallel_fsdp"

    def __init__(self, **kwargs: Any):
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def mesh(self) -> DeviceMesh:
        mesh = getattr(self.lightning_module, "expert_mesh", None)
        if mesh is None:
            raise RuntimeError(f"{type(self).__name__} needs the LightningModule's configure_model to call "
                               "moezoo.training.expert_parallel.fully_shard_moe(self, ...)")
        return mesh

    def setup(self, trainer) -> None:
        self.mesh  # noqa: B018  (a clear error before any work)
        super().setup(trainer)

    # One file as one process writes (Lightning's own writes a distributed checkpoint or gathers on rank 0).
    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only)


for _strategy, _description in (
        (ExpertParallelStrategy, "DDP with the MoE experts sharded over expert-parallel groups (moezoo)"),
        (ExpertParallelFSDPStrategy, "FSDP2 (ModelParallelStrategy) with the MoE experts sharded (moezoo)")):
    StrategyRegistry.register(_strategy.strategy_name, _strategy, override=True, description=_description)


def _whole(value: Any) -> Any:
    """A DTensor's whole tensor (collective over its mesh); anything else as is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _shard_like(value: Any, like: DTensor) -> Any:
    """A whole tensor cut to ``like``'s shard (no communication: every rank holds the whole)."""
    if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _shaped_like(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _own_rows(value: Any, param: torch.Tensor, rank: int) -> Any:
    """A saved whole-experts state tensor cut to the rows of ``param`` (this rank's experts); anything else as is."""
    rows = param.shape[0]
    if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.shape[1:] == param.shape[1:] \
            and value.shape[0] != rows:
        return value[rank * rows:(rank + 1) * rows]
    return value
