"""Run by test_lightning: a Lightning fit under the DDP strategy on 2 CPU processes (Lightning re-runs this script
for the second one), saving each rank's first logged records."""

import sys

import torch

from steadygrad.integrations.lightning import SteadygradCallback
from tests.integrations.lightning_models import Classifier, loader, quiet_trainer

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    callback = SteadygradCallback(every=1, print_findings=False)
    trainer = quiet_trainer(out, callbacks=[callback], logger=False, max_steps=1, devices=2, strategy="ddp")
    # each rank takes a batch of 32 of its DistributedSampler's share (shuffled, seed 0)
    trainer.fit(Classifier(), loader(batch_size=32))
    records = [r.to_dict() for r in callback.reports[0].records]
    torch.save(records, f"{out}/rank{trainer.global_rank}.pt")
    # Lightning leaves the gloo process group up: torn down by the interpreter's exit, its threads sometimes abort the
    # process ("terminate called without an active exception", exit -6) after the records are saved
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
