"""A tiny MoE model trained by Lightning, for tests/training/test_expert_parallel_training.py.

``python ep_lightning_run.py RANKS STEPS OUT_DIR [CKPT]``: RANKS 1 trains in one process (Lightning's single
device), RANKS 2 on two CPU ranks with ``ExpertParallelStrategy`` (Lightning's own launcher starts rank 1 by
running this script again); STEPS optimizer steps of SGD with momentum, a checkpoint every 3 steps into
OUT_DIR, resuming from CKPT if given. One process's batch is the two ranks' batches together, so both settings
train the same model on the same data.
"""

from __future__ import annotations

import os
import sys

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
    # rank r takes the samples r, r + 2, ... in order, so one step of the two ranks sees the samples of one
    # step of one process (Lightning's own sampler shuffles; this one is given to it instead)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher for the rank it starts
    sampler = DistributedSampler(dataset, num_replicas=ranks, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=BATCH_PER_RANK, sampler=sampler)


def main(ranks: int, steps: int, out_dir: str, ckpt: str | None) -> None:
    from moezoo.training.expert_parallel import ExpertParallelStrategy

    strategy = ExpertParallelStrategy(routing="data") if ranks > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=ranks, strategy=strategy, max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=out_dir, every_n_train_steps=3,
                                                                 save_top_k=-1, filename="{step}")])
    trainer.fit(TinyMoEModule(), data(ranks), ckpt_path=ckpt)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
