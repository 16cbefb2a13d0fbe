"""The framework callbacks' cost: a small Lightning fit and a small HF Trainer run, each bare and with steadygrad's
callback logging every 10th optimizer step, interleaved round by round (target: at most 1.03x).

Run: .venv/bin/python benchmarks/integrations.py
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare, machine

STEPS, BATCH, WIDTH, DEPTH = 300, 64, 256, 8


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for i in range(DEPTH):
        layers += [nn.Linear(32 if i == 0 else WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def _rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 32, generator=g)
    return x, torch.randint(0, 10, (len(x),), generator=g)


def lightning_fit(with_callback: bool):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from steadygrad.integrations.lightning import SteadygradCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x, y = _rows()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    root = tempfile.mkdtemp()

    def run():
        callbacks = [SteadygradCallback(every=10, print_findings=False)] if with_callback else []
        trainer = L.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=CSVLogger(root),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=10,
        )
        trainer.fit(Module(), loader)

    return run


def trainer_run(with_callback: bool):
    import transformers

    from steadygrad.integrations.transformers import SteadygradCallback

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x, labels=None):
            return {"loss": F.cross_entropy(self.net(x), labels)}

    x, y = _rows()

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    root = tempfile.mkdtemp()

    def run():
        args = transformers.TrainingArguments(
            output_dir=root,
            per_device_train_batch_size=BATCH,
            max_steps=STEPS,
            logging_steps=10,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            learning_rate=1e-3,
            seed=0,
        )
        callbacks = [SteadygradCallback(every=10, print_findings=False)] if with_callback else []
        trainer = transformers.Trainer(model=Model(), args=args, train_dataset=Rows(), callbacks=callbacks)
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # its log lines, not the timing
        trainer.train()

    return run


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(f"Machine: {machine()}")
    print(f"{STEPS} optimizer steps of a {DEPTH}-layer ReLU MLP, width {WIDTH}, batch {BATCH}; the callback logs every")
    print("10th step. Whole fits, bare and with the callback alternating round by round; median of 7 rounds.\n")
    print(f"{'run':<34}{'bare':>22}{'with callback':>22}{'ratio':>8}")
    from steadygrad import fast

    for taps in ("eager", "compiled"):
        if taps == "compiled" and not fast.enable():
            print("compiled taps: no steadygrad.fast backend could be built here")
            break
        for name, make in (("Lightning fit", lightning_fit), ("HF Trainer.train", trainer_run)):
            bare, watched, ratio = compare(make(False), make(True), repeats=7, warmup=1)
            print(f"{f'{name}, {taps} taps':<34}{bare!s:>22}{watched!s:>22}{ratio:>7.3f}x")
    fast.disable()


if __name__ == "__main__":
    main()
