"""Expert parallelism (moezoo.kernels.expert_parallel, MoE.shard_experts) against one process.

R gloo ranks on 127.0.0.1 (forked by one ``ep_worker.py`` subprocess, one thread each, bounded in time and killed
on failure) each route their share of a global batch through a MoE block whose experts are sharded over them; the
same block runs in this process on the whole batch. Compared: the output, the input gradient, every parameter's
gradient after ``reduce_gradients`` (the experts' on every rank that holds them), the routing record and the aux
losses, for top-k, top-p, expert-choice, noisy and GShard top-2 routers, shared, null, copy and constant
experts, a capacity that drops slots, an expert (and with 4 ranks a whole rank) that receives no tokens, exact
and capacity-padded splits, and with 4 ranks a 2 x 2 mesh (expert-parallel groups of 2, expert-data-parallel
groups of 2), routing over all ranks or over each expert-parallel group (then one process per group's batch,
the data-parallel gradients the mean of theirs), and ranks holding different numbers of tokens (samples or flat
tokens cut unevenly, e.g. 5 and 7 tokens; a rank with none). Plus Megatron's round trip: dispatch + combine with
weights 1/k returns the input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moezoo.kernels.expert_parallel import local_experts
from moezoo.zoo.layers import MoE
from helpers import rendezvous_ports
from tolerance import fp_tolerance

WORKER = Path(__file__).with_name("ep_worker.py")
TIMEOUT_S = 120  # the whole group; a hung collective fails the test instead of hanging it
DIM, HIDDEN, EXPERTS = 8, 12, 4
BATCH, SEQ = 2, 3  # samples and tokens per sample on each rank
EXPERT_PARAMS = ("w_in", "w_out", "b_in", "b_out")

# name -> MoE keyword arguments and the parallel setting (ep_size None: every rank; routing "world": routing
# over all ranks, else over the expert-parallel group; pad: capacity-padded splits; train: training mode)
CASES = {
    "top_k": dict(kwargs=dict(top_k=2, renormalize=True, aux_loss_coefs={
        "load_balance": 0.1, "global_load_balance": 0.1, "z_loss": 0.01, "expert_balance": 0.1, "cv2": 0.1,
        "entropy": 0.01, "top1_balance": 0.1, "sample_top1_balance": 0.1, "chosen_balance": 0.1})),
    "top_p": dict(kwargs=dict(top_k=3, router="top_p", top_p=0.6,
                              aux_loss_coefs={"chosen_balance": 0.1, "load_balance": 0.1})),
    "expert_choice": dict(kwargs=dict(top_k=2, router="expert_choice", aux_loss_coefs={"z_loss": 0.01})),
    "noisy_eval": dict(kwargs=dict(top_k=2, router="noisy", aux_loss_coefs={"cv2": 0.1}), train=False),
    "gshard_top2_eval": dict(kwargs=dict(top_k=2, router="gshard_top2", capacity_factor=0.75,
                                         aux_loss_coefs={"top1_balance": 0.1}), train=False),
    "shared_null_copy_constant": dict(kwargs=dict(
        top_k=2, expert="geglu", num_shared_experts=1, shared_gate=True, num_null_experts=1, num_copy_experts=1,
        num_constant_experts=1, aux_loss_coefs={"load_balance": 0.1})),
    "capacity_drops": dict(kwargs=dict(top_k=2, expert="mlp", bias=True, capacity_factor=0.5,
                                       aux_loss_coefs={"load_balance": 0.1})),
    "empty_expert": dict(kwargs=dict(top_k=2, router_bias=True, aux_loss_coefs={"load_balance": 0.1}), empty_last=True),
    "padded": dict(kwargs=dict(top_k=2, expert="ternary", aux_loss_coefs={"load_balance": 0.1}), pad=True),
    "padded_capacity": dict(kwargs=dict(top_k=2, bias=True, capacity_factor=1.0), pad=True),
    "reference_backend": dict(kwargs=dict(top_k=2, backend="reference")),
}
MESH_CASES = {  # 4 ranks: expert-parallel groups {0, 1}, {2, 3}; expert-data-parallel groups {0, 2}, {1, 3}
    "mesh_top_k": dict(kwargs=CASES["top_k"]["kwargs"], ep_size=2, routing="world"),
    "mesh_capacity_drops": dict(kwargs=CASES["capacity_drops"]["kwargs"], ep_size=2, routing="world"),
    "mesh_expert_choice": dict(kwargs=CASES["expert_choice"]["kwargs"], ep_size=2, routing="world"),
    "mesh_empty_expert_padded": dict(kwargs=CASES["empty_expert"]["kwargs"], ep_size=2, routing="world",
                                     empty_last=True, pad=True),
    # routing over each expert-parallel group (the default): each group is one process on its own batch, except
    # for global_load_balance, which counts over all data-parallel ranks by definition (left out here)
    "mesh_top_k_group_routing": dict(kwargs={**CASES["top_k"]["kwargs"], "aux_loss_coefs": {
        n: c for n, c in CASES["top_k"]["kwargs"]["aux_loss_coefs"].items() if n != "global_load_balance"}},
        ep_size=2),
    "mesh_capacity_group_routing": dict(kwargs=CASES["capacity_drops"]["kwargs"], ep_size=2),
    "mesh_uneven_top_k": dict(kwargs=CASES["top_k"]["kwargs"], ep_size=2, routing="world", split="uneven"),
}
# Ranks holding different numbers of tokens, one of them none: the global batch cut unevenly. "uneven" and
# "empty_rank": samples per rank of the [R * BATCH, SEQ] batch; "flat": tokens per rank of it flattened to
# [R * BATCH * SEQ] (e.g. 5 and 7 tokens).
SPLITS = {
    2: {"uneven": [1, 3], "empty_rank": [0, 4], "flat": [5, 7]},
    4: {"uneven": [3, 1, 2, 2], "empty_rank": [0, 5, 0, 3], "flat": [5, 11, 0, 8]},
}
UNEVEN_CASES = {
    "uneven_top_k": dict(kwargs=CASES["top_k"]["kwargs"], split="uneven"),
    "empty_rank_top_k": dict(kwargs=CASES["top_k"]["kwargs"], split="empty_rank"),
    "uneven_expert_choice": dict(kwargs=CASES["expert_choice"]["kwargs"], split="uneven"),
    "empty_rank_expert_choice": dict(kwargs=CASES["expert_choice"]["kwargs"], split="empty_rank"),
    "empty_rank_capacity_padded": dict(kwargs=CASES["capacity_drops"]["kwargs"], split="empty_rank", pad=True),
    "uneven_shared_special": dict(kwargs=CASES["shared_null_copy_constant"]["kwargs"], split="uneven"),
    "flat_top_p": dict(kwargs=CASES["top_p"]["kwargs"], split="flat"),
    "flat_capacity_drops": dict(kwargs=CASES["capacity_drops"]["kwargs"], split="flat"),
}


def cases_for(world_size: int) -> dict:
    return {**CASES, **UNEVEN_CASES, **(MESH_CASES if world_size == 4 else {})}


def layout(case: dict, world_size: int) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """``(x, g, rows)``: the case's global batch and each rank's rows of it (equal, or the case's split)."""
    x, g = batch(world_size)
    split = case.get("split")
    if split == "flat":
        x, g = x.reshape(-1, DIM), g.reshape(-1, DIM)
    counts = SPLITS[world_size][split] if split else [x.shape[0] // world_size] * world_size
    assert sum(counts) == x.shape[0]
    starts = [sum(counts[:rank]) for rank in range(world_size)]
    return x, g, [slice(start, start + count) for start, count in zip(starts, counts)]


def routing_size(case: dict, world_size: int) -> int:
    """The ranks of one routing group: all of them, or the case's expert-parallel group."""
    return world_size if case.get("routing") == "world" else case.get("ep_size") or world_size


def tolerance(world_size: int) -> dict:
    # The slowest-converging sums: an expert's weight gradient over all the batch's slots; router, two expert
    # products and the combine chained.
    return fp_tolerance(torch.float32, world_size * BATCH * SEQ * 2, layers=4)


# ----------------------------------------------------------------------------------------------- one process


def build(case: dict) -> MoE:
    """The block with every parameter random (zeros would hide mistakes); ``empty_last``: the last expert's
    router bias so low no token picks it."""
    torch.manual_seed(0)
    moe = MoE(DIM, HIDDEN, EXPERTS, **case["kwargs"])
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.5)
        if case.get("empty_last"):
            moe.router.bias[-1] = -1e4
    moe.train(case.get("train", True))
    return moe


def batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(world_size * BATCH, SEQ, DIM, generator=gen),
            torch.randn(world_size * BATCH, SEQ, DIM, generator=gen))


def one_process(case: dict, x: torch.Tensor, g: torch.Tensor) -> dict:
    """The reference: the unsharded block on the whole batch, loss = mean over all tokens + aux loss."""
    moe = build(case)
    x = x.clone().requires_grad_()
    y = moe(x)
    ((y * g).sum() / y[..., 0].numel() + moe.routing.aux_loss).backward()
    return {"moe": moe, "y": y.detach(), "x_grad": x.grad, "grads": {n: p.grad for n, p in moe.named_parameters()}}


# ----------------------------------------------------------------------------------------------- R processes


def loss_scales(case: dict, world_size: int) -> list[float]:
    """Each rank's loss is the sum over its tokens times this: its routing group's size over the group's tokens
    (with equal splits 1 / its own tokens, the DDP convention), so that the ranks' losses averaged over the
    group, as reduce_gradients does, are one process's mean over the group's tokens."""
    x, _, rows = layout(case, world_size)
    size, per_token = routing_size(case, world_size), x[0, ..., 0].numel()
    group_tokens = [sum(r.stop - r.start for r in rows[first:first + size]) * per_token
                    for first in range(0, world_size, size)]
    return [size / group_tokens[rank // size] for rank in range(world_size)]


def run_ranks(world_size: int, tmp_path: Path) -> list[dict]:
    """Run ``world_size`` ranks on the cases (at most TIMEOUT_S; on a timeout every rank is killed) and return
    each rank's results."""
    spec = []
    for name, case in cases_for(world_size).items():
        x, g, rows = layout(case, world_size)
        spec.append(dict(name=name, kwargs=dict(dim=DIM, hidden_dim=HIDDEN, num_experts=EXPERTS, **case["kwargs"]),
                         state=build(case).state_dict(), train=case.get("train", True), ep_size=case.get("ep_size"),
                         routing=case.get("routing", "ep"), pad=case.get("pad", False), x=x, g=g, rows=rows,
                         loss_scale=loss_scales(case, world_size)))
    torch.save({"cases": spec}, tmp_path / "cases.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # One launcher that forks the ranks, in its own session: on a timeout the whole group is killed.
    launcher = subprocess.Popen([sys.executable, str(WORKER), str(world_size), str(rendezvous_ports(1)[0]),
                                 str(tmp_path / "cases.pt"), str(tmp_path)], env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = launcher.communicate(timeout=TIMEOUT_S)[0]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, f"the {world_size} ranks failed (exit {launcher.returncode}):\n{output}"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@pytest.fixture(scope="module", params=[2, 4], ids=["2_ranks", "4_ranks"])
def parallel_run(request, tmp_path_factory):
    world_size = request.param
    return world_size, run_ranks(world_size, tmp_path_factory.mktemp(f"ep{world_size}"))


# ----------------------------------------------------------------------------------------------- tests


def test_experts_not_divisible_by_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match=r"6 experts cannot be split over 4 ranks.*\[1, 2, 3, 6\]"):
        local_experts(6, 0, 4)
    assert local_experts(8, 3, 4) == range(6, 8)


def test_sharding_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        MoE(DIM, HIDDEN, EXPERTS).shard_experts()


def references(case: dict, world_size: int) -> tuple[int, list[dict]]:
    """``(ranks per routing group, one process's run of each routing group's batch)``. Routing over all ranks:
    one run of the whole batch; over expert-parallel groups smaller than the world: one run per group, whose
    data-parallel gradients are then the mean of the runs'."""
    x, g, rows = layout(case, world_size)
    size = routing_size(case, world_size)
    groups = [slice(rows[first].start, rows[first + size - 1].stop) for first in range(0, world_size, size)]
    return size, [one_process(case, x[group], g[group]) for group in groups]


def test_matches_one_process(parallel_run):
    world_size, ranks = parallel_run
    tol = tolerance(world_size)
    for name, case in cases_for(world_size).items():
        group_size, refs = references(case, world_size)
        mean_grads = {n: None if refs[0]["grads"][n] is None else torch.stack([r["grads"][n] for r in refs]).mean(0)
                      for n in refs[0]["grads"]}  # None: a parameter the loss does not reach (noisy router in eval)
        ep_size = case.get("ep_size") or world_size
        rows = layout(case, world_size)[2]
        for rank, result in enumerate(ranks):
            got, ref = result["cases"][name], refs[rank // group_size]
            start = rows[rank - rank % group_size].start  # the first row of this rank's routing group
            mine = slice(rows[rank].start - start, rows[rank].stop - start)
            where = f"{name}, rank {rank} of {world_size}"
            assert got["y"].shape == ref["y"][mine].shape, where
            torch.testing.assert_close(got["y"], ref["y"][mine], **tol, msg=lambda m: f"{where}: output\n{m}")
            # x's gradient is of the sum of its routing group's losses, and one process's loss is their mean
            torch.testing.assert_close(got["x_grad"] / group_size, ref["x_grad"][mine], **tol,
                                       msg=lambda m: f"{where}: input gradient\n{m}")
            experts = local_experts(EXPERTS, got["ep_rank"], ep_size)
            assert set(got["grads"]) == set(mean_grads), where
            for pname, grad in got["grads"].items():
                want = mean_grads[pname]
                if pname in EXPERT_PARAMS:
                    want = want[experts.start:experts.stop]
                assert (grad is None) == (want is None), f"{where}: gradient of {pname}"
                torch.testing.assert_close(grad, want, **tol, msg=lambda m: f"{where}: gradient of {pname}\n{m}")
            check_record(got["record"], ref["moe"], tol, where)
            for norm_type, norm in got["norms"].items():  # what clipping by norm scales by: the whole model's
                want = torch.nn.utils.get_total_norm([g for g in mean_grads.values() if g is not None], norm_type)
                torch.testing.assert_close(norm, want, **tol, msg=lambda m: f"{where}: {norm_type}-norm\n{m}")


def check_record(got: dict, moe: MoE, tol: dict, where: str) -> None:
    """The routing record every rank keeps is one process's record of the whole batch."""
    want = moe.routing
    assert torch.equal(got["ids_TK"], want.ids_TK), f"{where}: routed ids"
    assert got["dropped"] == want.dropped and got["tokens_shape"] == want.tokens_shape, where
    torch.testing.assert_close(got["load_E"], want.load_E, msg=lambda m: f"{where}: load\n{m}")
    for field in ("weights_TK", "probs_TE"):
        torch.testing.assert_close(got[field], getattr(want, field), **tol, msg=lambda m: f"{where}: {field}\n{m}")
    torch.testing.assert_close(got["aux_loss"], want.aux_loss.detach(), **tol, msg=lambda m: f"{where}: aux loss\n{m}")
    assert got["aux_terms"].keys() == want.aux_terms.keys(), where
    for term, value in want.aux_terms.items():
        torch.testing.assert_close(got["aux_terms"][term], value, **tol, msg=lambda m: f"{where}: aux {term}\n{m}")


def test_cases_cover_what_they_claim(parallel_run):
    """Drops happened where capacity is set, the empty expert got nothing, and with 4 ranks of one expert each
    a whole rank received no rows."""
    world_size, ranks = parallel_run
    for name in ("capacity_drops", "gshard_top2_eval", "empty_rank_capacity_padded", "flat_capacity_drops"):
        assert ranks[0]["cases"][name]["record"]["dropped"] > 0, name
    assert ranks[0]["cases"]["empty_expert"]["record"]["load_E"][EXPERTS - 1] == 0
    assert ranks[0]["cases"]["top_p"]["record"]["ids_TK"].eq(-1).any()  # top-p used fewer than 3 experts somewhere
    for name, case in cases_for(world_size).items():  # the uneven cases' ranks did hold what the split says
        if case.get("split"):
            got = [len(result["cases"][name]["y"]) for result in ranks]
            assert got == SPLITS[world_size][case["split"]] and len(set(got)) > 1, name
            assert case["split"] != "empty_rank" or 0 in got, name


def test_round_trip_returns_the_input(parallel_run):
    """Dispatch + return + combine with identity experts and weights 1/k gives back every rank's tokens (the last
    rank has none), and the gradient of their sum is one everywhere."""
    world_size, ranks = parallel_run
    for pad in (False, True):
        for rank, result in enumerate(ranks):
            trip = result["round_trip"][pad]
            assert trip["x"].shape[0] == (0 if rank == world_size - 1 else 7)
            tol = fp_tolerance(torch.float32, 2)
            torch.testing.assert_close(trip["out"], trip["x"], **tol)
            torch.testing.assert_close(trip["x_grad"], torch.ones_like(trip["x"]), **tol)
    assert sum(r["round_trip"][False]["received"] for r in ranks) == 7 * 2 * (world_size - 1)


def test_only_routed_experts_are_marked(parallel_run):
    """reduce_gradients tells experts from the rest by the mark shard_experts puts on the kept expert weights:
    exactly the routed experts' weights and biases, not the router, shared or constant experts."""
    _, ranks = parallel_run
    for name, result in ranks[0]["cases"].items():
        want = [p for p in EXPERT_PARAMS if p in result["grads"]]
        assert result["marked"] == want, name


def test_checkpoints_gather_and_reshard(parallel_run):
    """gather_expert_state_dict gives one process's state dict (every expert, exactly), and a sharded block
    loading it keeps its own experts' rows."""
    world_size, ranks = parallel_run
    for name, case in cases_for(world_size).items():
        if name not in ranks[0]["checkpoint"]:
            continue
        full = build(case).state_dict()
        for result in ranks:
            got = result["checkpoint"][name]
            assert got["gathered"].keys() == full.keys()
            for key, tensor in full.items():
                assert torch.equal(got["gathered"][key], tensor), f"{name}: gathered {key}"
                mine = tensor
                if key in EXPERT_PARAMS:
                    experts = local_experts(EXPERTS, got["ep_rank"], case.get("ep_size") or world_size)
                    mine = tensor[experts.start:experts.stop]
                assert torch.equal(got["reloaded"][key], mine), f"{name}: reloaded {key}"


def test_clip_grad_norm_in_one_process_is_torchs():
    """Without torch.distributed nothing is sharded: the norm and the clipped gradients are
    torch.nn.utils.clip_grad_norm_'s, for the 2-norm and the inf-norm; a non-finite norm is refused when asked."""
    from moezoo.kernels.expert_parallel import clip_grad_norm_

    for norm_type in (2.0, float("inf")):
        ours, theirs = MoE(DIM, HIDDEN, EXPERTS, 2), MoE(DIM, HIDDEN, EXPERTS, 2)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(3, SEQ, DIM, generator=torch.Generator().manual_seed(2))
        for moe in (ours, theirs):
            (moe(x).square().sum() + moe.routing.aux_loss).backward()
        want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1, norm_type)
        got = clip_grad_norm_(ours.parameters(), 0.1, norm_type)
        tol = fp_tolerance(torch.float32, x[..., 0].numel())
        torch.testing.assert_close(got, want, **tol)
        assert want > 0.1  # the gradients were scaled
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{norm_type}-norm, {name}\n{m}")
    next(ours.parameters()).grad[0] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        clip_grad_norm_(ours.parameters(), 0.1, error_if_nonfinite=True)
