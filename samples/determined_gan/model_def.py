"""A GAN in Determined's trial API on scikit-learn's digits: two models and two optimizers wrapped in
__init__, each stepped in train_batch through the context, an LR scheduler on the generator's optimizer."""

from typing import Any, Dict

import data
import torch
from determined.pytorch import DataLoader, LRScheduler, PyTorchTrial, PyTorchTrialContext
from torch import nn


class DigitsGAN(PyTorchTrial):
    def __init__(self, context: PyTorchTrialContext) -> None:
        self.context = context
        latent, hidden = context.get_hparam("latent_dim"), context.get_hparam("hidden")
        self.generator = context.wrap_model(
            nn.Sequential(nn.Linear(latent, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 64), nn.Sigmoid())
        )
        self.discriminator = context.wrap_model(
            nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        )
        lr, betas = context.get_hparam("lr"), (context.get_hparam("b1"), 0.999)
        self.opt_g = context.wrap_optimizer(torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas))
        self.opt_d = context.wrap_optimizer(
            torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        )
        self.lr_g = context.wrap_lr_scheduler(
            torch.optim.lr_scheduler.LambdaLR(self.opt_g, lr_lambda=lambda epoch: 0.95**epoch),
            step_mode=LRScheduler.StepMode.STEP_EVERY_EPOCH,
        )
        self.train_set, self.val_set = data.get_datasets(
            context.get_data_config().get("validation_records", 360)
        )

    def build_training_data_loader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

    def build_validation_data_loader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.context.get_per_slot_batch_size())

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> Dict[str, Any]:
        images, _ = batch
        real = images.flatten(1)
        bce = nn.functional.binary_cross_entropy_with_logits
        ones = self.context.to_device(torch.ones(len(real), 1))
        zeros = self.context.to_device(torch.zeros(len(real), 1))

        # The generator: only its parameters get gradients.
        self.generator.requires_grad_(True)
        self.discriminator.requires_grad_(False)
        z = self.context.to_device(torch.randn(len(real), self.context.get_hparam("latent_dim")))
        fake = self.generator(z)
        g_loss = bce(self.discriminator(fake), ones)
        self.context.backward(g_loss)
        self.context.step_optimizer(self.opt_g)

        # The discriminator, on real images and the generator's (detached).
        self.generator.requires_grad_(False)
        self.discriminator.requires_grad_(True)
        d_loss = (bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros)) / 2
        self.context.backward(d_loss)
        self.context.step_optimizer(self.opt_d)
        return {"g_loss": g_loss, "d_loss": d_loss}

    def evaluate_batch(self, batch: Any) -> Dict[str, Any]:
        images, _ = batch
        logits = self.discriminator(images.flatten(1))
        ones = torch.ones_like(logits)
        return {
            "real_loss": nn.functional.binary_cross_entropy_with_logits(logits, ones),
            "real_accuracy": (logits > 0).float().mean(),
        }
