import numpy as np
import pytest
import torch

from steadygrad import data
from steadygrad.data import DataError


def test_digits_is_real_standardized_and_split():
    d = data.digits()
    assert d.x_train.shape[1] == 64 and len(d.x_train) + len(d.x_test) == 1797
    assert d.task == "classification" and d.num_classes == 10 and d.y_train.dtype == torch.int64
    varying = d.x_train.std(0) > 0
    torch.testing.assert_close(d.x_train.mean(0)[varying], torch.zeros(int(varying.sum())), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.x_train.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-4, rtol=0)
    raw = data.digits(standardize=False)
    assert float(raw.x_train.min()) == 0 and float(raw.x_train.max()) == 16  # all-positive pixels


def test_shapes_for_each_kind():
    d = data.digits()
    assert d.inputs_for("cnn", d.x_train[:5]).shape == (5, 1, 8, 8)
    assert d.inputs_for("rnn", d.x_train[:5]).shape == (5, 8, 8)
    assert d.spec_sizes("cnn") == {"in_features": 1, "image_size": 8, "out_features": 10}
    with pytest.raises(DataError, match="kind='cnn' needs image data"):
        data.blobs().inputs_for("cnn", data.blobs().x_train)


@pytest.mark.parametrize(
    ("loader", "task", "classes"),
    [
        (data.two_spirals, "classification", 2),
        (data.blobs, "classification", 4),
        (data.teacher_student, "regression", None),
    ],
)
def test_generated_sets(loader, task, classes):
    d = loader(seed=3)
    assert d.task == task and d.num_classes == classes
    again = loader(seed=3)
    assert torch.equal(d.x_train, again.x_train)  # reproducible


def test_npz_and_csv_files(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    d = data.from_file(tmp_path / "d.npz")
    assert d.task == "classification" and d.num_classes == 3 and d.in_features == 3
    np.savez(tmp_path / "r.npz", X=x, y=rng.normal(size=50))
    assert data.from_file(tmp_path / "r.npz").task == "regression"
    lines = ["a,b,label"] + [f"{a:.3f},{b:.3f},{int(c)}" for (a, b, _), c in zip(x, y, strict=True)]
    (tmp_path / "d.csv").write_text("\n".join(lines))
    d = data.load(str(tmp_path / "d.csv"), target="label")
    assert d.in_features == 2 and d.num_classes == 3


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.npz", r"No data file at .*missing.npz"),
        (lambda p: _npz(p, X=np.zeros(5), y=np.zeros(5)), r"X in .* must be 2-D"),
        (lambda p: _npz(p, X=np.zeros((5, 2)), y=np.zeros(4)), r"one entry per row of X \(5\)"),
        (
            lambda p: _npz(p, X=np.array([[1.0, np.nan]] * 5), y=np.arange(5)),
            r"NaN or infinite values \(first at row 0",
        ),
        (lambda p: _npz(p, X=np.zeros((5, 2)), y=np.array([0, 1, -1, 0, 1])), r"must be 0 \.\. C-1; found -1"),
        (lambda p: _npz(p, A=np.zeros((5, 2))), r"must hold arrays named X and y"),
        (lambda p: _write(p / "d.txt", "1,2"), r"unknown data format .txt"),
        (lambda p: _write(p / "d.csv", "a,b\n1,x\n"), r"line 2, column 'b': 'x' is not a number"),
        (lambda p: _write(p / "bad.npz", "not a zip"), r"not a readable .npz"),
    ],
    ids=["missing", "x_1d", "y_length", "nan", "negative_label", "no_arrays", "format", "csv_text", "corrupt"],
)
def test_bad_files_get_clear_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        data.from_file(make(tmp_path), target="b")


def test_csv_needs_a_named_target(tmp_path):
    path = _write(tmp_path / "d.csv", "a,b\n1,2\n3,4\n")
    with pytest.raises(DataError, match=r"Name the target column .* --target b"):
        data.from_file(path)
    with pytest.raises(DataError, match=r"has no column 'c'; its columns: a, b"):
        data.from_file(path, target="c")


def _npz(folder, **arrays):
    path = folder / "d.npz"
    np.savez(path, **arrays)
    return path


def _write(path, text):
    path.write_text(text)
    return path
