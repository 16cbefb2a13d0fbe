"""``steadygrad probe``: build networks from options and probe them; comma lists compare side by side."""

import dataclasses
import math
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from steadygrad import theory
from steadygrad.cli._errors import UsageError, handle_errors
from steadygrad.cli._options import network_options
from steadygrad.cli._output import console, write_json
from steadygrad.measure import FlowReport, probe
from steadygrad.nets import NetSpec, build, expand_specs


def varying_fields(specs: list[NetSpec]) -> list[str]:
    return [f.name for f in dataclasses.fields(NetSpec) if len({getattr(s, f.name) for s in specs}) > 1]


def theory_lines(spec: NetSpec, report: FlowReport, net) -> list[str]:
    """What mean-field theory says about this spec, beside what was measured."""
    if spec.kind != "mlp" or spec.norm != "none":
        return [
            "Mean-field theory here covers plain MLPs without normalization (this spec has "
            f"kind={spec.kind}, norm={spec.norm})."
        ]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    hidden = linears[1:-1] or linears[:1]  # leave out the stem (input-sized) and the head
    sigma_w2 = sum(float(m.weight.detach().double().var()) * m.in_features for m in hidden) / len(hidden)
    lines = [f"Measured weight scale sigma_w^2 = Var[W] * fan_in = {sigma_w2:.3g} (sigma_b^2 = 0 at init)."]
    if spec.skip == "residual":
        grow = theory.residual_variance(spec.depth - 1, spec.residual_scale)
        lines.append(
            f"Residual stream without normalization: variance grows as (1 + s^2)^L = {grow:.3g} over "
            f"{spec.depth - 1} blocks (s = {spec.residual_scale:g}); s = L^-1/2 would bound it by e."
        )
        return lines
    if spec.skip == "dense":
        return [*lines, "Dense skips: no mean-field closed form here; see the measurement."]
    if spec.activation in ("relu", "leaky_relu", "identity"):
        factor = theory.moments(spec.activation, 1.0).dphi2 * sigma_w2
        lines.append(
            f"Closed form: the second moment and the squared gradient scale by {factor:.3g} per layer "
            f"({'steady' if abs(factor - 1) < 0.05 else 'vanishing' if factor < 1 else 'exploding'})."
        )
    else:
        try:
            scales = theory.depth_scales(sigma_w2, 0.0, spec.activation)
            critical = theory.critical_sigma_w2(0.0, spec.activation)
            if abs(scales.chi_1 - 1) < 0.02:
                phase = "at the edge of chaos: gradients neither vanish nor explode exponentially"
            else:
                phase = "ordered: gradients vanish" if scales.chi_1 < 1 else "chaotic: gradients explode"
            lines.append(
                f"Fixed point q* = {scales.q_star:.3g}, chi_1 = {scales.chi_1:.3g} ({phase}); depth scale "
                f"xi_c = {scales.xi_c:.3g} layers; the edge of chaos is at sigma_w^2 = {critical:.3g}."
            )
        except ValueError as error:
            lines.append(str(error))
    blocks = [r for r in report.records if math.isfinite(r.predicted_grad_norm)]
    if len(blocks) >= 2:

        def ratio(first: float, last: float) -> float:
            return first / last if last else math.inf  # a last block with no gradient at all

        predicted = ratio(blocks[0].predicted_grad_norm, blocks[-1].predicted_grad_norm)
        measured = ratio(blocks[0].grad_norm, blocks[-1].grad_norm)
        lines.append(f"Gradient ratio first/last block: predicted {predicted:.3g}, measured {measured:.3g}.")
    return lines


def comparison_table(specs: list[NetSpec], reports: list[FlowReport]) -> Table:
    fields = varying_fields(specs) or ["kind"]
    table = Table(title="Side by side", title_justify="left")
    for f in fields:
        table.add_column(f)
    for column in (
        "input grad",
        "grad first/last",
        "per layer",
        "last act std",
        "max sat",
        "max dead",
        "non-finite",
    ):
        table.add_column(column, justify="right")

    def worst(report, attr):
        values = [getattr(r, attr) for r in report.records if math.isfinite(getattr(r, attr))]
        return f"{100 * max(values):.0f}%" if values else "-"

    for spec, report in zip(specs, reports, strict=True):
        finite_std = [r.act_std for r in report.records if math.isfinite(r.act_std)]
        nonfinite = sum(r.nonfinite_act + r.nonfinite_grad for r in report.records)
        table.add_row(
            *[str(getattr(spec, f)) for f in fields],
            f"{report.input_grad_norm:.3g}",
            f"{report.gradient_ratio:.3g}",
            f"{report.gradient_factor_per_layer:.3g}",
            f"{finite_std[-1]:.3g}" if finite_std else "-",
            worst(report, "saturated"),
            worst(report, "dead"),
            str(nonfinite),
        )
    return table


@handle_errors
@network_options(comma_lists=True, from_data=True)
def probe_command(
    network: dict[str, str | None] | None = None,  # the network options (see cli._options)
    batch: Annotated[
        int,
        typer.Option(
            min=2,
            help="Examples in the probing batch (standard normal inputs and random class labels; for kind "
            "transformer random token rows and their next tokens; cross-entropy).",
        ),
    ] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the weights and the batch.")] = 0,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Record only modules whose names match these comma-separated glob patterns, e.g. 'block*.linear'."
        ),
    ] = None,
    show_theory: Annotated[
        bool, typer.Option("--theory", help="Print the mean-field prediction beside the measurement.")
    ] = False,
    mode: Annotated[
        str,
        typer.Option(
            help="'train' (batch statistics; dropout would be off) or 'eval' (BatchNorm's running statistics, "
            "which are 0 and 1 at initialization)."
        ),
    ] = "train",
    details: Annotated[bool, typer.Option(help="Print every network's per-layer table when comparing.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", dir_okay=False, help="Write the reports as JSON.")] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", dir_okay=False, help="Write the per-layer plot (PNG).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Probe your own model instead of a built one: FILE.py:FUNC or package.module:FUNC returning an "
            "nn.Module (with --data, or synthetic --input-shape / --input-dtype long --vocab --seq-len).",
        ),
    ] = None,
    arg: Annotated[list[str] | None, typer.Option(help="With --model: KEY=VALUE for the factory (repeatable).")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="With --model: a built-in set (digits, ...), a .npz/.csv file, or FILE.py:FUNC returning a batch, "
            "a Dataset, a DataLoader or an iterable (its first batch is probed)."
        ),
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="With --model and no --data: synthetic float inputs of this shape, e.g. 3,32,32.")
    ] = None,
    input_dtype: Annotated[
        str, typer.Option(help="With --model and no --data: float, or long for token ids (--vocab, --seq-len).")
    ] = "float",
) -> None:
    """Measure how signal and gradient travel through a deep network at initialization.

    One forward and backward pass per network; per layer: activation statistics, saturated and dead
    units, the gradient norm and its ratio to the next layer's. Any option takes a comma-separated
    list, and every combination is built and compared side by side.

    Examples:

      steadygrad probe --depth 50 --width 256 --act tanh --init glorot_uniform --theory

      steadygrad probe --depth 4 --width 32 --act sigmoid --skip none,residual,dense

      steadygrad probe --act relu --init he_uniform,glorot_uniform --depth 30 --plot flow.png

      steadygrad probe --model my_model.py:build --data digits

      steadygrad probe --model lm.py:make_gpt2 --input-dtype long --vocab 256 --seq-len 64 --batch 8

      steadygrad probe --kind transformer --depth 6 --width 64 --heads 4 --norm-position pre,post
    """
    if mode not in ("train", "eval"):  # the probe's third mode, None (as the model is), is train for a fresh net
        raise UsageError(f"--mode must be train or eval; got {mode!r}.")
    if model is not None:
        # the built networks' options, reused for the user's model's synthetic token ids
        seq_len, vocab = (network or {}).get("seq-len"), (network or {}).get("vocab")
        if vocab is not None:
            try:
                vocab = int(vocab)
            except ValueError:
                raise UsageError(
                    f"--vocab takes one integer (the vocabulary size) with --model; got {vocab!r}."
                ) from None
        _probe_users_model(
            model,
            arg,
            data,
            input_shape,
            input_dtype,
            vocab,
            int(seq_len) if seq_len else None,
            batch,
            seed,
            layers,
            mode,
            json_path,
            plot_path,
        )
        return
    specs = expand_specs(network)
    patterns = [p.strip() for p in layers.split(",")] if layers else None
    reports, nets = [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Probing", total=len(specs))
        for spec in specs:
            generator = torch.Generator().manual_seed(seed)
            net = build(spec, generator)
            x, y = spec.example_batch(batch, generator)
            reports.append(probe(net, x, y, layers=patterns, mode=mode, seed=seed, theory_prediction=show_theory))
            nets.append(net)
            progress.advance(task)
    single = len(specs) == 1
    for spec, report, net in zip(specs, reports, nets, strict=True):
        if single or details:
            console.print(report.table())
        if not single:
            console.print(f"[bold]{escape(spec.label())}[/]")
        console.print(escape(report.summary()))
        if show_theory:
            for line in theory_lines(spec, report, net):
                console.print(f"[cyan]theory:[/] {escape(line)}")
        console.print()
    if not single:
        console.print(comparison_table(specs, reports))
    if json_path is not None:
        write_json(
            json_path,
            {
                "batch": batch,
                "seed": seed,
                "mode": mode,
                "reports": [
                    {"spec": spec.to_dict(), **report.to_dict()} for spec, report in zip(specs, reports, strict=True)
                ],
            },
        )
    if plot_path is not None:
        from steadygrad.measure.plot import plot_flow

        try:
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            plot_flow(reports, plot_path)
        except (OSError, ValueError) as error:
            raise UsageError(
                f"Could not write the plot to {plot_path}: {error}. Use a writable path ending in .png."
            ) from None
        console.print(f"Wrote {plot_path}")


def _first_batch(dataset):
    """(inputs, targets) of the first batch of whatever ``--data`` gave (``steadygrad.doctor``'s batch forms)."""
    from steadygrad.doctor import first_batch

    try:
        batch = first_batch(dataset)
    except TypeError as error:
        raise UsageError(f"--data: {error}") from None
    if batch is None:
        raise UsageError("--data yielded no batch: the probe needs one batch of inputs.")
    return batch.inputs, batch.targets


def _probe_users_model(
    target, arg, data, input_shape, input_dtype, vocab, seq_len, batch, seed, layers, mode, json_path, plot_path
) -> None:
    from steadygrad.cli._user import (
        build_user_model,
        load_factory,
        load_user_data,
        parse_factory_args,
        synthetic_inputs,
        user_lines,
    )
    from steadygrad.diagnose import diagnose

    factory, user_file = load_factory(target)
    kwargs = parse_factory_args(arg or [])
    if data is not None:
        dataset, _ = load_user_data(data, None, batch, seed)
        inputs, targets = _first_batch(dataset)
    else:
        inputs, targets = synthetic_inputs(batch, input_shape, input_dtype, vocab, seq_len, seed), None
    torch.manual_seed(seed)
    net = build_user_model(factory, target, user_file, kwargs)
    patterns = [p.strip() for p in layers.split(",")] if layers else None
    try:
        report = probe(net, inputs, targets, layers=patterns, mode=mode, seed=seed)
    except ValueError:
        raise
    except Exception as error:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise UsageError(f"Probing {target} on inputs {shape} failed:\n{user_lines(error, user_file)}") from None
    report.show(console)
    findings = diagnose(report, model=net, inputs=inputs)
    console.print("[bold]Findings[/]")
    for finding in findings:
        console.print(f"- {escape(str(finding))}")
    if not findings:
        console.print("- none: the gradient flow looks healthy.")
    if json_path is not None:
        write_json(json_path, {**report.to_dict(), "findings": [f.to_dict() for f in findings]})
    if plot_path is not None:
        from steadygrad.measure.plot import plot_flow

        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_flow([report], plot_path)
        console.print(f"Wrote {plot_path}")
