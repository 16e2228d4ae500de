"""One rank of the expert-parallel tests (tests/kernels/test_expert_parallel.py starts R of these).

``python ep_worker.py WORLD_SIZE PORT CASES OUT_DIR`` forks WORLD_SIZE ranks; each joins a gloo group on
127.0.0.1:PORT, runs every case
of the ``CASES`` file (written by the test: the block's config and full weights, the global batch) with the
experts sharded, and saves what it computed to ``OUT_DIR/rank{RANK}.pt``. It asserts nothing: the test compares
the files with one process's run of the same global batch.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

torch.set_num_threads(1)  # 2 cores, R processes and other work on the machine


def run_case(case: dict, groups: dict) -> dict:
    from moezoo.kernels.expert_parallel import clip_grad_norm_, is_expert_parameter, reduce_gradients
    from moezoo.zoo.layers import MoE

    rank, world_size = dist.get_rank(), dist.get_world_size()
    ep_size = case["ep_size"] or world_size
    if ep_size not in groups:
        groups[ep_size] = (None, None) if ep_size == world_size else _mesh_groups(ep_size)
    ep_group, edp_group = groups[ep_size]
    moe = MoE(**case["kwargs"])
    moe.load_state_dict(case["state"])
    moe.train(case["train"])
    routing_group = dist.group.WORLD if case["routing"] == "world" else None
    moe.shard_experts(ep_group, routing_group=routing_group, pad_to_capacity=case["pad"])
    mine = case["rows"][rank]  # this rank's rows of the global batch (the test's split; maybe none)
    x = case["x"][mine].clone().requires_grad_()
    y = moe(x)
    # Each rank's loss is its share of its routing group's mean (with equal splits: the mean over its own
    # tokens, the DDP convention) plus the layer's aux loss, which already is the routing group's;
    # reduce_gradients averages, so the reduced gradients are one process's.
    loss = (y * case["g"][mine]).sum() * case["loss_scale"][rank] + moe.routing.aux_loss
    loss.backward()
    reduce_gradients(moe.parameters(), expert_data_group=edp_group)
    record = moe.routing
    # the whole block's gradient norm (max_norm inf: nothing is scaled), as gradient clipping computes it
    norms = {p: clip_grad_norm_(moe.parameters(), float("inf"), p, expert_group=ep_group) for p in (2.0, float("inf"))}
    return {
        "norms": norms,
        "y": y.detach(), "x_grad": x.grad, "ep_rank": dist.get_rank(ep_group),
        "grads": {name: p.grad for name, p in moe.named_parameters()},
        "marked": [name for name, p in moe.named_parameters() if is_expert_parameter(p)],
        "record": {"ids_TK": record.ids_TK, "weights_TK": record.weights_TK, "probs_TE": record.probs_TE,
                   "load_E": record.load_E, "dropped": record.dropped, "aux_loss": record.aux_loss.detach(),
                   "aux_terms": record.aux_terms, "tokens_shape": record.tokens_shape},
    }


def checkpoint_round_trip(case: dict, groups: dict) -> dict:
    """A sharded block's gathered state dict (what one process saves), and a fresh sharded block's weights after
    loading that full state dict (the re-shard)."""
    from moezoo.zoo.layers import MoE, gather_expert_state_dict

    ep_group = groups[case["ep_size"] or dist.get_world_size()][0]
    moe = MoE(**case["kwargs"])
    moe.load_state_dict(case["state"])
    moe.shard_experts(ep_group)
    full = gather_expert_state_dict(moe)
    fresh = MoE(**case["kwargs"]).shard_experts(ep_group)
    fresh.load_state_dict(full)
    return {"gathered": full, "reloaded": {n: t.detach() for n, t in fresh.state_dict().items()},
            "ep_rank": dist.get_rank(ep_group)}


def _mesh_groups(ep_size: int):
    from moezoo.kernels.expert_parallel import expert_parallel_groups

    return expert_parallel_groups(ep_size)


def round_trip(num_tokens: int, top_k: int, dim: int, pad: bool) -> dict:
    """dispatch + return + combine with identity experts and weights 1/k: the input again (Megatron's test).
    The last rank has no tokens at all."""
    from moezoo.kernels import build_plan, combine
    from moezoo.kernels.expert_parallel import dispatch, expert_shard, largest_count, return_results

    rank, world_size = dist.get_rank(), dist.get_world_size()
    num_experts = 2 * world_size
    shard = expert_shard(num_experts)
    gen = torch.Generator().manual_seed(100 + rank)
    tokens = 0 if rank == world_size - 1 else num_tokens
    x_TD = torch.randn(tokens, dim, generator=gen, requires_grad=True)
    ids_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]) \
        if tokens else torch.zeros(0, top_k, dtype=torch.long)
    plan = build_plan(ids_TK, num_experts)
    pad_to = largest_count(plan) if pad else None
    rows_ND, exchange = dispatch(x_TD, plan, shard, pad_to=pad_to)
    out_TD = combine(return_results(rows_ND, exchange), torch.full((tokens, top_k), 1.0 / top_k), plan)
    out_TD.sum().backward()
    return {"x": x_TD.detach(), "out": out_TD.detach(), "x_grad": x_TD.grad, "received": rows_ND.shape[0]}


def main(rank: int, world_size: int, port: int, cases_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                           timeout=timedelta(seconds=60))
    try:
        spec = torch.load(cases_path, weights_only=False)
        groups = {}
        results = {"cases": {case["name"]: run_case(case, groups) for case in spec["cases"]},
                   "round_trip": {pad: round_trip(7, 2, 5, pad) for pad in (False, True)}}
        results["checkpoint"] = {case["name"]: checkpoint_round_trip(case, groups) for case in spec["cases"]
                                 if case["name"] in ("capacity_drops", "mesh_top_k")}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(world_size: int, port: int, cases_path: str, out_dir: str) -> int:
    """Import once, then fork the ranks (importing moezoo costs seconds per process on a busy 2-core machine);
    the exit code is the first failed rank's, and a failure ends the ranks still waiting in a collective."""
    import multiprocessing

    import moezoo.zoo.layers  # noqa: F401  (imported before the fork, once for all ranks)
    from moezoo.kernels.expert_parallel import run_ranks

    context = multiprocessing.get_context("fork")
    codes = run_ranks([context.Process(target=main, args=(rank, world_size, port, cases_path, out_dir))
                       for rank in range(world_size)])
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(launch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
