"""A tiny MoE model trained by Lightning, for tests/training/test_expert_parallel_training.py.

``python ep_lightning_run.py RANKS STEPS OUT_DIR [--ckpt CKPT] [--strategy ddp|fsdp] [--stall-after N] [--clip C]
[--ep-size N]``: RANKS
1 trains in one process (Lightning's single device), RANKS 2 on two CPU ranks with ``ExpertParallelStrategy``
(``ddp``) or ``ExpertParallelFSDPStrategy`` (``fsdp``: the module's ``configure_model`` calls
``fully_shard_moe``), Lightning's own launcher starting rank 1 by running this script again; STEPS optimizer
steps of SGD with momentum, a checkpoint every 3 steps into OUT_DIR, resuming from CKPT if given. One process's
batch is the two ranks' batches together, so every setting trains the same model on the same data.
``--stall-after N``: rank 0 writes the step reached to OUT_DIR/progress after every step, and every step after
step N takes a second more (a run to kill mid-training). ``--clip C``: Lightning's gradient clipping by norm at C. RANKS 4 with ``--ep-size 2``:
a 2 x 2 mesh, experts sharded over pairs of ranks and replicated over the pairs (HSDP under ``fsdp``), each rank
a quarter of the global batch.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from moezoo.zoo.layers import MoE

torch.set_num_threads(1)
SAMPLES, TOKENS, DIM, BATCH_PER_RANK = 12, 3, 8, 2  # 3 steps an epoch: the checkpoint at step 3 ends one


class TinyMoEModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(DIM, DIM)
        # routing over all ranks: the aux loss and record are one process's, so the training is the same
        self.moe = MoE(DIM, 12, 4, 2, num_shared_experts=1, aux_loss_coefs={"load_balance": 0.1})

    def training_step(self, batch, _):
        x, target = batch
        y = self.moe(self.embed(x))
        return (y - target).square().mean() + self.moe.routing.aux_loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data(ranks: int) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(SAMPLES, TOKENS, DIM, generator=gen), torch.randn(SAMPLES, TOKENS, DIM, generator=gen)
    dataset = TensorDataset(x, target)
    if ranks == 1:
        return DataLoader(dataset, batch_size=BATCH_PER_RANK * 2, shuffle=False)
    per_rank = BATCH_PER_RANK * 2 // ranks  # the same global batch on 2 or 4 ranks
    # rank r takes the samples r, r + R, ... in order, so one step of the R ranks sees the samples of one
    # step of one process (Lightning's own sampler shuffles; this one is given to it instead)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher for the rank it starts
    sampler = DistributedSampler(dataset, num_replicas=ranks, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler)


class TinyMoEFSDPModule(TinyMoEModule):
    """The same model, parallelised by itself as Lightning's ModelParallelStrategy asks."""

    def __init__(self, ep_size: int | None = None):
        super().__init__()
        self.ep_size = ep_size

    def configure_model(self):
        from moezoo.training.expert_parallel import fully_shard_moe

        fully_shard_moe(self, ep_size=self.ep_size, routing="data")


class Stall(pl.Callback):
    """After every step rank 0 writes the step reached to ``progress`` (atomically); steps after ``after`` take
    a second more, so a run can be killed while it trains."""

    def __init__(self, out_dir: str, after: int):
        self.path, self.after = Path(out_dir) / "progress", after

    def on_train_batch_end(self, trainer, *_):
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.with_suffix(".tmp").write_text(str(trainer.global_step))
            self.path.with_suffix(".tmp").replace(self.path)
        if trainer.global_step > self.after:
            time.sleep(1.0)


def main(ranks: int, steps: int, out_dir: str, ckpt: str | None, strategy: str, stall_after: int | None,
         clip: float | None, ep_size: int | None) -> None:
    from moezoo.training.expert_parallel import ExpertParallelFSDPStrategy, ExpertParallelStrategy

    module = TinyMoEFSDPModule(ep_size) if strategy == "fsdp" else TinyMoEModule()
    if ranks == 1:
        strategy = "auto"
    elif strategy == "fsdp":
        strategy = ExpertParallelFSDPStrategy()
    else:
        strategy = ExpertParallelStrategy(ep_size=ep_size, routing="data")
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=out_dir, every_n_train_steps=3, save_top_k=-1,
                                              filename="{step}")]
    if stall_after is not None:
        callbacks.append(Stall(out_dir, stall_after))
    trainer = pl.Trainer(accelerator="cpu", devices=ranks, strategy=strategy, max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=callbacks, gradient_clip_val=clip)
    trainer.fit(module, data(ranks), ckpt_path=ckpt)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("ranks", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("out_dir")
    parser.add_argument("--ckpt")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--stall-after", type=int)
    parser.add_argument("--clip", type=float)
    parser.add_argument("--ep-size", type=int, help="ranks per expert-parallel group (default: all)")
    args = parser.parse_args()
    main(args.ranks, args.steps, args.out_dir, args.ckpt, args.strategy, args.stall_after, args.clip, args.ep_size)
