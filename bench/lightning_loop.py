"""PyTorch Lightning's Trainer (DDP strategy, CPU, Gloo), launched by torchrun like bench/ddp_loop.py.

Lightning sees torchrun's environment and starts no processes of its own; it replaces the training loader's
sampler with a DistributedSampler (seeded by ``seed_everything``), wraps the model in DDP and validates once,
after the last training batch (``val_check_interval=batches``). Progress bar, logger, checkpoints, model
summary and the sanity-check validation are off. Validation metrics are logged the idiomatic way,
``self.log(..., sync_dist=True)`` (per-rank means weighted by batch size, then averaged over ranks).

    torchrun --standalone --nproc_per_node 2 bench/lightning_loop.py --workload conv --batches 300
"""

import argparse
import logging
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads"))
import common  # noqa: E402


class BenchModule(pl.LightningModule):
    def __init__(self, workload: str, log_every: int):
        super().__init__()
        self.workload = workload
        self.log_every = log_every
        self.batches = 0
        torch.manual_seed(common.SEED)
        self.net = common.build_model(workload)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.batches += 1
        if self.batches % self.log_every == 0 and self.global_rank == 0:
            print(f"batch {self.batches} loss {loss.item():.4f}", flush=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        n = len(y)
        self.log("loss", F.cross_entropy(out, y), batch_size=n, sync_dist=True)
        self.log("accuracy", (out.argmax(1) == y).float().mean(), batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        return common.build_optimizer(self.workload, self.net)


class ValidationDone(pl.Callback):
    """Stamps the end of validation: Lightning has reduced the logged metrics across ranks by now."""

    def on_validation_end(self, trainer, pl_module):
        common.PROBE.validation_done({k: float(v) for k, v in trainer.callback_metrics.items()})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", choices=sorted(common.WORKLOADS), required=True)
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args()
    common.PROBE.install()
    warnings.filterwarnings("ignore")  # Lightning's advice about num_workers etc.
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(common.threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", size))))
    pl.seed_everything(common.SEED, verbose=False)
    w = common.WORKLOADS[args.workload]
    train_set, val_set = common.datasets()
    per_rank = w.global_batch // size
    train_loader = DataLoader(train_set, batch_size=per_rank, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=common.VAL_BATCH)

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", size)),
        num_nodes=max(1, size // int(os.environ.get("LOCAL_WORLD_SIZE", size))),
        strategy="ddp",
        max_steps=args.batches,
        max_epochs=-1,
        val_check_interval=args.batches,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[ValidationDone()],
    )
    trainer.fit(BenchModule(args.workload, args.log_every), train_loader, val_loader)
    if trainer.global_rank == 0:
        print(f"validation {common.PROBE.extra.get('validation')}", flush=True)
    common.PROBE.write()


if __name__ == "__main__":
    main()
