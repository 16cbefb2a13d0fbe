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


# --- synthetic sequence tasks ---------------------------------------------------------------------------------

IGNORED = -100  # written out: the tests check the module's constant against it and against losses'


def _expected_copy_row(first: list[int], separator: int, reverse: bool) -> tuple[list[int], list[int]]:
    """The row written out by hand: content, separator, the (reversed) content; targets are the next token."""
    row = [*first, separator, *(first[::-1] if reverse else first)]
    k = len(first)
    return row[:-1], [IGNORED] * k + row[k + 1 :]


@pytest.mark.parametrize("name", ["copy", "reverse"])
def test_copy_and_reverse_rows_are_content_separator_content(name):
    vocab, seq_len = 10, 12
    task = data.sequence_task(name, n=50, seq_len=seq_len, vocab=vocab, seed=4)
    assert task.inputs.shape == task.targets.shape == (50, seq_len)
    assert task.inputs.dtype == task.targets.dtype == torch.int64
    k = seq_len // 2
    for inputs, targets in zip(task.inputs.tolist(), task.targets.tolist(), strict=True):
        first = inputs[:k]
        assert all(0 <= token < vocab - 1 for token in first)  # the top id is never content
        assert (inputs, targets) == _expected_copy_row(first, vocab - 1, reverse=name == "reverse")
    # the scored targets are the first half (reversed): exactly the last k positions are scored
    half = task.inputs[:, :k]
    assert torch.equal(task.targets[:, k:], half.flip(1) if name == "reverse" else half)
    assert torch.equal(task.scored, torch.arange(seq_len).expand(50, -1) >= k)
    assert len(set(map(tuple, half.tolist()))) > 45  # rows are drawn, not repeated


def test_recall_rows_are_key_value_pairs_then_a_query_for_one_value():
    vocab, seq_len = 16, 12
    pairs, key_ids = seq_len // 2 - 1, (vocab - 1) // 2
    task = data.sequence_task("recall", n=200, seq_len=seq_len, vocab=vocab, seed=2)
    asked = []
    for inputs, targets in zip(task.inputs.tolist(), task.targets.tolist(), strict=True):
        keys, values = inputs[0 : 2 * pairs : 2], inputs[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(0 <= key < key_ids for key in keys)
        assert all(key_ids <= value < vocab - 1 for value in values)
        assert inputs[-2] == vocab - 1  # the query marker
        query = inputs[-1]
        assert query in keys
        position = inputs.index(query)  # its first occurrence: the key slot, as keys and values never collide
        assert targets == [IGNORED] * (seq_len - 1) + [inputs[position + 1]]
        asked.append(keys.index(query))
    assert set(asked) == set(range(pairs))  # every pair gets asked about


def test_masked_positions_are_left_out_of_the_loss():
    import torch.nn.functional as F

    from steadygrad import losses

    assert data.IGNORE_INDEX == losses.IGNORE_INDEX == IGNORED
    for name in data.SEQUENCE_TASKS:
        task = data.sequence_task(name, n=8, seq_len=8, vocab=10)
        logits = torch.randn(8, 8, 10, generator=torch.Generator().manual_seed(0))
        scored = task.scored
        expected = F.cross_entropy(logits[scored], task.targets[scored])
        torch.testing.assert_close(losses.task_loss(logits, task.targets), expected)
        assert int(scored.sum()) == 8 * (1 if name == "recall" else 4)


def test_sequence_tasks_are_reproducible_by_seed_and_batches_are_rows():
    a, b = data.sequence_task("recall", seed=5), data.sequence_task("recall", seed=5)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, data.sequence_task("recall", seed=6).inputs)
    task = data.sequence_task("copy", n=20, seq_len=6, vocab=5, seed=1)
    x, y = task.batch(32, torch.Generator().manual_seed(3))
    again = task.batch(32, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (32, 6) and torch.equal(x, again[0]) and torch.equal(y, again[1])
    rows = {(tuple(i), tuple(t)) for i, t in zip(task.inputs.tolist(), task.targets.tolist(), strict=True)}
    assert all((tuple(i), tuple(t)) in rows for i, t in zip(x.tolist(), y.tolist(), strict=True))


def test_a_sequence_task_reads_in_one_line_and_is_frozen():
    import dataclasses

    task = data.sequence_task("copy", n=5, seq_len=8, vocab=10)
    line = "SequenceTask copy: 5 sequences x 8 tokens, vocab 10, 4 scored positions per row"
    assert str(task) == repr(task) == line
    assert str(data.sequence_task("recall", n=3, seq_len=8, vocab=10)).endswith("1 scored position per row")
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.vocab = 11


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"name": "sort"}, r"Unknown sequence task 'sort'\. Accepted: copy, reverse, recall"),
        ({"name": "copy", "n": 0}, r"n must be a whole number >= 1; got 0"),
        ({"name": "copy", "seq_len": 7}, r"seq_len must be even for 'copy'.*got 7\. Use 6 or 8"),
        ({"name": "reverse", "seq_len": 0}, r"seq_len must be a whole number >= 2; got 0"),
        ({"name": "recall", "seq_len": 2}, r"seq_len must be a whole number >= 4; got 2"),
        ({"name": "copy", "vocab": 2}, r"vocab 2 is too small for 'copy'.*vocab >= 3\. Raise vocab"),
        (
            {"name": "recall", "seq_len": 16, "vocab": 10},
            r"vocab 10 is too small for 'recall' with seq_len 16: it needs 7 distinct keys.*vocab >= 15.*lower seq_len",
        ),
    ],
    ids=["name", "n", "odd_length", "short_copy", "short_recall", "small_vocab", "few_keys"],
)
def test_bad_sequence_task_arguments_say_what_is_accepted(arguments, message):
    with pytest.raises(DataError, match=message):
        data.sequence_task(**arguments)


def test_the_smallest_accepted_sizes_work_and_bad_batch_sizes_are_named():
    assert data.sequence_task("recall", seq_len=4, vocab=4).inputs.shape == (1024, 4)
    assert data.sequence_task("recall", seq_len=16, vocab=15).inputs.shape == (1024, 16)
    assert data.sequence_task("copy", n=1, seq_len=2, vocab=3).inputs.shape == (1, 2)
    with pytest.raises(DataError, match="batch_size must be a whole number >= 1; got 0"):
        data.sequence_task("copy").batch(0)


def test_a_tiny_transformer_learns_the_copy_task_from_the_loader():
    from steadygrad.losses import task_loss
    from steadygrad.nets import NetSpec, build

    seq_len, vocab = 8, 8
    train = data.sequence_task("copy", n=2048, seq_len=seq_len, vocab=vocab, seed=0)
    held_out = data.sequence_task("copy", n=256, seq_len=seq_len, vocab=vocab, seed=1)
    net = build(
        NetSpec(kind="transformer", depth=2, width=32, heads=2, seq_len=seq_len, vocab=vocab),
        torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    draws = torch.Generator().manual_seed(0)
    for _ in range(150):
        x, y = train.batch(64, draws)
        loss = task_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = net(held_out.inputs).argmax(-1)
    scored = held_out.scored
    accuracy = (predicted[scored] == held_out.targets[scored]).float().mean().item()
    chance = 1 / (vocab - 1)  # content tokens are uniform over the ids below the separator
    assert accuracy > 0.9 > 5 * chance, f"held-out copy accuracy {accuracy:.2f} (chance {chance:.2f})"


@pytest.mark.parametrize("name", ["copy", "reverse", "recall", "pysource"])
def test_token_datasets_split_rows_for_a_transformer(name):
    d = data.token_dataset(name, n=100, seq_len=8, seed=3)
    assert d.tokens and d.task == "classification" and d.x_train.dtype == torch.long
    assert len(d.x_train) == 80 and len(d.x_test) == 20 and d.x_train.shape[1] == 8
    assert d.spec_sizes("transformer") == {"vocab": d.num_classes, "seq_len": 8}
    assert int(d.x_train.max()) < d.num_classes
    rows = {tuple(r) for r in d.x_train.tolist()}
    assert rows.isdisjoint({tuple(r) for r in d.x_test.tolist()}) or name == "pysource"  # a split of the rows
    again = data.load(name, seed=3)
    assert again.name == name and again.tokens
    if name == "pysource":  # every position is scored: the next character
        torch.testing.assert_close(d.x_train[:, 1:], d.y_train[:, :-1])
    else:
        assert (d.y_train == data.IGNORE_INDEX).any()
    with pytest.raises(DataError, match="for kind='transformer'"):
        d.inputs_for("mlp", d.x_train)
    with pytest.raises(DataError, match="reads token sequences"):
        data.digits().spec_sizes("transformer")


def test_the_trainer_scores_token_accuracy_on_the_scored_positions_only():
    from steadygrad.nets import NetSpec, build
    from steadygrad.train import TrainConfig, Trainer

    d = data.token_dataset("copy", n=64, seq_len=8, seed=0)
    net = build(NetSpec(kind="transformer", depth=1, width=16, heads=2, **d.spec_sizes("transformer")))
    metrics = Trainer(net, d, TrainConfig(epochs=1, progress=False)).evaluate()
    with torch.no_grad():
        predicted = net.eval()(d.x_test).argmax(-1)
    scored = d.y_test != -100
    assert metrics["test_accuracy"] == pytest.approx(float((predicted == d.y_test)[scored].float().mean()))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(net(d.x_test).transpose(1, 2), d.y_test, ignore_index=-100)
    assert metrics["test_loss"] == pytest.approx(float(loss), rel=1e-5)


def test_next_token_windows_are_slices_of_the_ids_and_their_next_tokens():
    ids = torch.arange(100) * 3
    x, y = data.next_token_windows(ids, 5, 7, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 7)
    starts = (x[:, 0] // 3).tolist()
    for row, start in zip(range(5), starts, strict=True):
        torch.testing.assert_close(x[row], ids[start : start + 7])
        torch.testing.assert_close(y[row], ids[start + 1 : start + 8])
