"""Data parallelism with 2 CPU processes (gloo): synchronized BatchNorm, global monitor figures, torchrun training."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from steadygrad.distributed import teardown
from steadygrad.measure import Monitor
from steadygrad.nets import NetSpec, build
from steadygrad.norm import BatchNorm1d, BatchNorm2d
from steadygrad.train import load_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
WORLD = 2


def _init(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)


def _batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g)


def _sync_bn_worker(rank, init_file, out_dir, cls, shape):
    _init(rank, init_file)
    x, dy = _batch(shape)
    share = x.shape[0] // WORLD
    bn = cls(shape[1], sync=True)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        bn.bias.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # two steps: the running averages move twice
        xi = x[rank * share : (rank + 1) * share].clone().requires_grad_(True)
        bn.zero_grad()
        y = bn(xi)
        y.backward(dy[rank * share : (rank + 1) * share])
    torch.save(
        {
            "y": y.detach(),
            "dx": xi.grad,
            "dw": bn.weight.grad,
            "db": bn.bias.grad,
            "rm": bn.running_mean,
            "rv": bn.running_var,
        },
        f"{out_dir}/{rank}.pt",
    )
    teardown()


@pytest.mark.parametrize(("cls", "shape"), [(BatchNorm1d, (8, 5)), (BatchNorm2d, (6, 3, 4, 4))], ids=["1d", "2d"])
def test_sync_batchnorm_equals_batchnorm_on_the_concatenated_batch(tmp_path, cls, shape):
    mp.spawn(_sync_bn_worker, args=(str(tmp_path / "init"), str(tmp_path), cls, shape), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    x, dy = _batch(shape)
    reference = cls(shape[1])
    reference.load_state_dict({k: v for k, v in cls(shape[1]).state_dict().items()})
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        reference.bias.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        xr = x.clone().requires_grad_(True)
        reference.zero_grad()
        y = reference(xr)
        y.backward(dy)
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[0]["dw"] + parts[1]["dw"], reference.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[0]["db"] + parts[1]["db"], reference.bias.grad, rtol=1e-5, atol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["rm"], reference.running_mean)
        torch.testing.assert_close(p["rv"], reference.running_var)


def _monitor_worker(rank, init_file, out_dir):
    _init(rank, init_file)
    from torch.nn.parallel import DistributedDataParallel

    net = build(NetSpec(depth=3, width=16, in_features=8, activation="tanh"), torch.Generator().manual_seed(0))
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    with Monitor(net, optimizer=opt) as monitor:
        opt.zero_grad()
        F.cross_entropy(model(x[rank::WORLD]), y[rank::WORLD]).backward()
        opt.step()
    torch.save([r.to_dict() for r in monitor.history.reports[0].records], f"{out_dir}/m{rank}.pt")
    del model  # DDP holds the group and gloo work: let it go while the group is alive
    teardown()


def test_monitor_reports_global_figures_under_ddp(tmp_path):
    mp.spawn(_monitor_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    net = build(NetSpec(depth=3, width=16, in_features=8, activation="tanh"), torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    with Monitor(net, optimizer=opt) as monitor:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    expected = [r.to_dict() for r in monitor.history.reports[0].records]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"m{rank}.pt")
        for a, b in zip(got, expected, strict=True):
            for field in ("act_mean", "act_std", "act_min", "act_max", "grad_norm", "weight_grad_norm", "update_ratio"):
                assert a[field] == pytest.approx(b[field], rel=1e-4, abs=1e-7), (a["name"], field)


# SGD, not Adam: Adam divides each gradient by its own running scale, so rounding-level gradients (the
# bias right before a BatchNorm has a true gradient of 0 and a computed one of ~1e-9) become full-size steps
# whose signs depend on summation order, and two correct runs drift apart. SGD keeps rounding at rounding.
TRAIN = [
    "-m",
    "steadygrad",
    "train",
    "--depth",
    "3",
    "--width",
    "32",
    "--norm",
    "batch",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--no-progress",
    "--monitor-every",
    "5",
    "--optimizer",
    "sgd",
    "--lr",
    "0.1",
    "--clip",  # clipping under DDP sees the all-reduced gradients: its norm is the whole model's
    "norm:0.5",
]


def test_torchrun_training_equals_one_process_and_only_rank_0_writes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, *TRAIN, "--logdir", str(single)], check=True, capture_output=True, env=env, timeout=300
    )
    double = tmp_path / "double"
    mlflow = importlib.util.find_spec("mlflow") is not None  # then the one MLflow run is rank 0's too
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port chosen by torchrun itself: no race for one picked here
            "--nproc_per_node",
            "2",
            *TRAIN,
            "--logdir",
            str(double),
            *(["--mlflow"] if mlflow else []),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_checkpoint(single / "checkpoint.pt"), load_checkpoint(double / "checkpoint.pt")
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    summary = json.loads((double / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert done.stdout.count("Held-out metrics per epoch") == 2  # each rank prints; only rank 0 writes files
    assert len((double / "history.jsonl").read_text().splitlines()) == 1
    if mlflow:
        from mlflow import MlflowClient

        client = MlflowClient(summary["mlflow"]["tracking_uri"])
        runs = client.search_runs([client.get_experiment_by_name("steadygrad").experiment_id])
        assert [run.info.run_id for run in runs] == [summary["mlflow"]["run_id"]]  # one run: rank 0's


def test_torchrun_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two_epochs = [a if a != "1" else "2" for a in TRAIN]  # --epochs 2
    whole, split = tmp_path / "whole", tmp_path / "split"
    for args in (
        [*two_epochs, "--logdir", str(whole)],
        [*TRAIN, "--logdir", str(split)],
        [*two_epochs, "--logdir", str(split), "--resume"],
    ):
        done = subprocess.run([*launch, *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def _fsdp_model() -> torch.nn.Module:
    # fully_shard splits dim 0: 16 rows go 8 + 8, 5 go 3 + 2 (uneven), 1 goes 1 + 0 (one process holds nothing)
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 1),
    )


def _fsdp_train(model, rank=None, counted=None) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # momentum: step 2's update is not the gradient
    with Monitor(model) as monitor:  # its steps found through torch's global optimizer hooks
        for step in range(2):
            g = torch.Generator().manual_seed(5 + step)
            x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
            if rank is not None:
                x, y = x[rank::WORLD], y[rank::WORLD]
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            if counted is not None:
                counted.clear()
            opt.step()
    return [[r.to_dict() for r in report.records] for report in monitor.history.reports]


def _fsdp_worker(rank, init_file, out_dir):
    _init(rank, init_file)
    from torch.distributed.fsdp import fully_shard

    model = _fsdp_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    calls = []  # the parameters' sums: one all_reduce per logged step, whatever the number of layers
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        records = _fsdp_train(model, rank, counted=calls)
    finally:
        dist.all_reduce = real
    torch.save({"records": records, "calls": calls}, f"{out_dir}/f{rank}.pt")
    del model
    teardown()
    # Under load, FSDP's gloo threads have aborted the interpreter's shutdown ("terminate called without an active
    # exception") after everything above had finished and was saved: leave without running the C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_monitor_reports_whole_model_figures_under_fsdp(tmp_path):
    """FSDP's fully_shard leaves each process a shard of every weight and gradient (DTensors): the Monitor's
    weight, gradient and update figures must be the whole model's, equal to one process on the whole batch."""
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    expected = _fsdp_train(_fsdp_model())
    fields = ("act_mean", "act_std", "grad_norm", "weight_grad_norm", "bias_grad_norm", "weight_var", "update_ratio")
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"f{rank}.pt")
        assert len(got["records"]) == len(expected) == 2
        for step_got, step_expected in zip(got["records"], expected, strict=True):
            for a, b in zip(step_got, step_expected, strict=True):
                for field in fields:
                    if b[field] is None or b[field] != b[field]:
                        continue  # the activations' rows have no weight
                    assert a[field] == pytest.approx(b[field], rel=1e-5, abs=1e-8), (a["name"], field)
        # the last step's optimizer.step(): the Monitor's one all_reduce of every layer's sums (layers x 7)
        assert got["calls"] == [(7, 7)]
