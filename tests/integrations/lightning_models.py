"""Tiny Lightning modules and data for the integration tests (importable by the DDP script too)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


class Classifier(L.LightningModule):
    def __init__(self, depth: int = 3, width: int = 16, activation=nn.Tanh, lr: float = 0.1, nan_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        layers = []
        for i in range(depth):
            layers += [nn.Linear(8 if i == 0 else width, width), activation()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 4))
        self.lr = lr
        self.nan_at = nan_at  # a batch index whose inputs hold a NaN

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.nan_at is not None and batch_idx >= self.nan_at:
            x = x.clone()
            x[0, 0] = float("nan")
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def dataset(n: int = 256) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :4].argmax(1)))


def loader(batch_size: int = 32, n: int = 256) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset(n), batch_size=batch_size)


def quiet_trainer(root, **kwargs) -> L.Trainer:
    options = {
        "max_epochs": 1,
        "default_root_dir": str(root),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    return L.Trainer(**options)
