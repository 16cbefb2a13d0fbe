"""The Monitor in a plain accelerate loop: python examples/accelerate_loop.py (pip install accelerate)."""

import accelerate
import torch
import torch.nn.functional as F
from torch import nn

import steadygrad as sg
from steadygrad.diagnose import findings_text

if __name__ == "__main__":
    accelerator = accelerate.Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=32)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with sg.Monitor(accelerator.unwrap_model(model), every=4, optimizer=optimizer) as monitor:
        for inputs, targets in loader:
            loss = F.cross_entropy(model(inputs), targets)
            accelerator.backward(loss)
            monitor.observe_loss(loss)
            optimizer.step()
            optimizer.zero_grad()
    print(f"{len(monitor.history.reports)} logged steps")
    for line in findings_text(sg.diagnose(monitor.history.reports, model=model)):
        print(line)
