"""The user's code and data on the command line: ``FILE.py:FUNC`` factories, ``--data`` specs, synthetic inputs,
and the lines of a traceback that are the user's (``doctor`` and ``probe`` share them)."""

import ast
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from steadygrad import data as sg_data
from steadygrad.cli._errors import UsageError

__all__ = ["build_user_model", "load_factory", "load_user_data", "parse_factory_args", "synthetic_inputs", "user_lines"]


def user_lines(error: BaseException, user_file: str | None) -> str:
    """The frames of the traceback that are in the user's code (not steadygrad's, torch's or Python's)."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [
        f
        for f in frames
        if (user_file and Path(f.filename).resolve() == Path(user_file).resolve())
        or (
            "site-packages" not in f.filename
            and "steadygrad" not in f.filename
            and "importlib" not in f.filename
            and not f.filename.startswith("<")
        )
    ]
    text = "".join(traceback.format_list(mine[-4:])) if mine else ""
    return text + f"{type(error).__name__}: {error}"


def load_factory(target: str):
    """``path/to/file.py:make_model`` or ``package.module:make_model`` -> (the callable, the file or None)."""
    module_part, sep, name = target.rpartition(":")
    if not sep or not module_part or not name:
        raise UsageError(f"Give the model factory as FILE.py:FUNCTION or package.module:FUNCTION; got {target!r}.")
    user_file = None
    try:
        if module_part.endswith(".py") or "/" in module_part:
            path = Path(module_part)
            if not path.is_file():
                raise UsageError(f"No file {path}: give the path of the .py file that defines {name}.")
            user_file = str(path.resolve())
            spec = importlib.util.spec_from_file_location(f"_steadygrad_user_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(path.resolve().parent))  # its own imports of neighbouring files
            try:
                spec.loader.exec_module(module)
            finally:
                sys.path.pop(0)
        else:
            module = importlib.import_module(module_part)
    except ValueError:
        raise
    except ModuleNotFoundError as error:
        raise UsageError(
            f"Cannot import {module_part}: {error}. Give FILE.py:FUNCTION or an importable package.module:FUNCTION."
        ) from None
    except Exception as error:
        raise UsageError(f"Importing {module_part} failed:\n{user_lines(error, user_file)}") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        available = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise UsageError(f"{module_part} has no callable {name!r}. Callables there: {', '.join(available) or 'none'}.")
    return factory, user_file


def parse_factory_args(pairs: list[str]) -> dict:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--arg takes KEY=VALUE with a Python identifier as KEY; got {pair!r}.")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a plain string
    return kwargs


def synthetic_inputs(samples, input_shape, input_dtype, vocab, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    if input_dtype == "long":
        if vocab is None or seq_len is None:
            raise UsageError("--input-dtype long makes token ids: give --vocab N and --seq-len T as well.")
        return torch.randint(0, vocab, (samples, seq_len), generator=g)
    if input_dtype != "float":
        raise UsageError(f"--input-dtype takes float or long; got {input_dtype!r}.")
    if input_shape is None:
        raise UsageError(
            "Give the data: --data digits (or FILE.npz, FILE.csv, FILE.py:FUNC), --input-shape 3,32,32 [--classes 10] "
            "for synthetic inputs, or --input-dtype long --vocab N --seq-len T for synthetic token ids."
        )
    try:
        shape = tuple(int(part) for part in input_shape.split(","))
    except ValueError:
        raise UsageError(f"--input-shape takes sizes separated by commas, e.g. 3,32,32; got {input_shape!r}.") from None
    if not shape or min(shape) < 1:
        raise UsageError(f"--input-shape sizes must be positive; got {input_shape!r}.")
    return torch.randn(samples, *shape, generator=g)


def load_user_data(spec: str, target_column, samples: int, seed: int):
    """``--data``: a built-in set or a .npz/.csv file as (x, y) tensors (integer arrays stay integers), or
    FILE.py:FUNC / module:FUNC returning a batch, a Dataset, a DataLoader or an iterable."""
    if ":" in spec and not Path(spec).exists():
        function, user_file = load_factory(spec)
        try:
            return function(), user_file
        except Exception as error:
            raise UsageError(f"The data function {spec} raised:\n{user_lines(error, user_file)}") from None
    if spec.lower().endswith(".npz"):
        return _npz(Path(spec), samples), None
    dataset = sg_data.load(spec, target=target_column, standardize=False, seed=seed)
    return (dataset.x_train[:samples], dataset.y_train[:samples]), None


def _npz(path: Path, samples: int):
    """X (any shape; integer arrays such as token ids stay int64) and, when present, y."""
    if not path.is_file():
        raise UsageError(f"No data file at {path}. Give a .npz with arrays X (and y), a .csv, or a built-in set.")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is not a readable .npz archive ({error}).") from None
    keys = {k.lower(): k for k in archive.files}
    name_x = next((keys[k] for k in ("x", "inputs", "input_ids") if k in keys), None)
    if name_x is None:
        raise UsageError(
            f"{path} must hold an array named X (or inputs, input_ids); it holds {', '.join(archive.files)}."
        )

    def tensor(array):
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.integer):
            return torch.from_numpy(array.astype(np.int64))[:samples]
        if np.issubdtype(array.dtype, np.floating):
            return torch.from_numpy(array.astype(np.float32))[:samples]
        raise UsageError(f"Arrays in {path} must be numeric; got dtype {array.dtype}.")

    x = tensor(archive[name_x])
    name_y = next((keys[k] for k in ("y", "targets", "labels") if k in keys), None)
    return x if name_y is None else (x, tensor(archive[name_y]))


def build_user_model(factory, target: str, user_file: str | None, kwargs: dict) -> torch.nn.Module:
    """``factory(**kwargs)``, with a factory that raises or returns no module as a usage error naming ``target``."""
    try:
        model = factory(**kwargs)
    except Exception as error:
        raise UsageError(f"The model factory {target} raised:\n{user_lines(error, user_file)}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"The model factory {target} returned {type(model).__name__}, not an nn.Module.")
    return model
