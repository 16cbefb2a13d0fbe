"""steadygrad's callback in a Lightning fit: python examples/lightning_fit.py (pip install "steadygrad[lightning]").

A deep sigmoid MLP, the textbook case of vanishing gradients: the callback's findings at the end say so."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from steadygrad.integrations.lightning import SteadygradCallback


class Classifier(L.LightningModule):
    def __init__(self, depth=10, width=32):
        super().__init__()
        layers = [nn.Linear(16, width), nn.Sigmoid()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=32)
    callback = SteadygradCallback(every=4, nonfinite="stop")
    trainer = L.Trainer(
        max_epochs=1, callbacks=[callback], default_root_dir="runs/lightning", enable_progress_bar=False
    )
    trainer.fit(Classifier(), data)
    print(f"findings: {[f.kind for f in callback.findings]}; also in {callback.watch.findings_path}")
