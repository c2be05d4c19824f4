import numpy as np
import pytest

from keras_stability import datasets


def test_make_classification_shapes_and_balance():
    x, y = datasets.make_classification(n_samples=500, seed=3)
    assert x.shape == (500, 10) and x.dtype == np.float32
    assert y.shape == (500,) and y.dtype == np.int32
    assert sorted(np.unique(y).tolist()) == list(range(10))
    assert np.bincount(y).tolist() == [50] * 10


def test_make_classification_is_deterministic():
    a = datasets.make_classification(seed=7)
    b = datasets.make_classification(seed=7)
    c = datasets.make_classification(seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_seasonal_series_is_standardized_by_its_first_part_and_seeded():
    series = datasets.make_seasonal_series(n_steps=4000, train_fraction=0.5, seed=3)
    assert series.shape == (4000, 2) and series.dtype == np.float32
    first = series[:2000]
    np.testing.assert_allclose(first.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(first.std(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(
        series, datasets.make_seasonal_series(n_steps=4000, train_fraction=0.5, seed=3)
    )
    assert not np.array_equal(series, datasets.make_seasonal_series(4000, 0.5, seed=4))


def test_seasonal_series_moves_with_its_season():
    # The temperature follows the season (period 6000): its mean over the
    # first 200 steps (season near 0) is far from the mean around the peak.
    temp, season = datasets.make_seasonal_series(seed=0).T
    assert np.corrcoef(temp, season)[0, 1] > 0.9
    peak = slice(1400, 1600)  # sin(2 pi t / 6000) near 1
    assert temp[peak].mean() - temp[:200].mean() > 1.0
    # the daily cycle (period 144) is in the temperature, not in the season
    daily = np.abs(np.fft.rfft(temp - temp.mean()))
    assert np.argmax(daily[50:]) + 50 == round(len(temp) / 144)


def test_synthetic_is_learnable_but_not_linear():
    # A nearest-centroid classifier (one centre per class) does far worse than
    # a 1-nearest-neighbour classifier: the classes are mixtures, so a network
    # has something to learn beyond a linear boundary, and well above chance.
    (xt, yt), (xv, yv) = datasets.load_dataset("synthetic", seed=0)
    centroids = np.stack([xt[yt == k].mean(0) for k in range(10)])
    nc = np.argmin(((xv[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    nn = yt[np.argmin(((xv[:, None] - xt[None]) ** 2).sum(-1), axis=1)]
    nc_acc, nn_acc = (nc == yv).mean(), (nn == yv).mean()
    assert nn_acc > 0.6, nn_acc
    assert nn_acc > nc_acc + 0.1, (nn_acc, nc_acc)


def test_example_model_learns_synthetic_well_above_chance():
    import keras

    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    (xt, yt), (xv, yv) = datasets.load_dataset("synthetic", seed=0)
    keras.utils.set_random_seed(0)
    model = compile_example_model(build_example_model())
    model.fit(xt, yt, epochs=5, batch_size=32, verbose=0)
    loss, accuracy = model.evaluate(xv, yv, verbose=0)
    assert accuracy > 0.6, accuracy
    assert loss < np.log(10), loss


def test_digits_and_split():
    (xt, yt), (xv, yv) = datasets.load_dataset("digits", seed=0)
    assert xt.shape[1] == 64 and len(xt) + len(xv) == 1797
    assert len(xv) == round(1797 * 0.2)
    assert 0.0 <= xt.min() and xt.max() <= 1.0


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"argument `name`.*Received: name='nope'"):
        datasets.load_dataset("nope")
    with pytest.raises(ValueError, match=r"`n_classes`.*Received: n_classes=1"):
        datasets.make_classification(n_classes=1)
    with pytest.raises(ValueError, match=r"`class_sep`.*Received: class_sep=0"):
        datasets.make_classification(class_sep=0)
    with pytest.raises(
        ValueError, match=r"`test_fraction`.*Received: test_fraction=1.5"
    ):
        datasets.train_test_split(np.zeros((4, 1)), np.zeros(4), test_fraction=1.5)


def test_stdlib_text_is_read_at_run_time_and_deterministic():
    import json as json_module

    text = datasets.load_stdlib_text()
    assert len(text) > 100_000
    assert datasets.load_stdlib_text() == text
    assert json_module.__doc__.strip()[:40] in text
    assert datasets.load_stdlib_text(max_chars=500) == text[:500]


def test_char_lm_windows_are_shifted_by_one_and_split():
    data = datasets.make_char_lm_data(
        "abcdefghij" * 20, seq_len=8, held_out_fraction=0.2
    )
    assert data["vocab"] == list("abcdefghij")
    np.testing.assert_array_equal(data["x_train"][:, 1:], data["y_train"][:, :-1])
    assert data["x_train"].shape[1] == 8 and data["x_test"].shape[1] == 8
    assert (
        len(data["x_train"]) == (160 - 1) // 8 and len(data["x_test"]) == (40 - 1) // 8
    )
    decoded = "".join(data["vocab"][i] for i in data["x_train"][0])
    assert decoded == "abcdefgh"
    with pytest.raises(ValueError, match=r"`seq_len`.*Received: seq_len=0"):
        datasets.make_char_lm_data("abc", seq_len=0)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `text`. Expected a text long enough for one window of seq_len=",
    ):
        datasets.make_char_lm_data("abc", seq_len=8)


def _char_frequencies(ids, vocab_size):
    counts = np.bincount(np.asarray(ids).ravel(), minlength=vocab_size)
    return counts / counts.sum()


def test_stdlib_code_is_code_without_docstrings():
    import copy as copy_module

    code = datasets.load_stdlib_code(["copy"])
    assert code == datasets.load_stdlib_code(["copy"])
    assert "def deepcopy(" in code
    assert copy_module.__doc__.strip()[:40] not in code
    assert copy_module.deepcopy.__doc__.strip()[:30] not in code
    compile(code, "<copy>", "exec")  # still valid Python
    assert datasets.load_stdlib_code(["copy"], max_chars=300) == code[:300]
    with pytest.raises(
        ValueError, match=r"`modules`.*modules with Python source \('sys' has none\)"
    ):
        datasets.load_stdlib_code(["sys"])
    assert not set(datasets.STDLIB_CODE_MODULES) & set(datasets.STDLIB_TEXT_MODULES)


def test_fine_tuning_corpora_share_a_vocab_and_differ(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the corpora must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    corpora = datasets.load_fine_tuning_corpora(seq_len=32)
    again = datasets.load_fine_tuning_corpora(seq_len=32)
    vocab = corpora["vocab"]
    assert vocab == sorted(
        set(corpora["texts"]["pretrain"]) | set(corpora["texts"]["finetune"])
    )
    assert again["vocab"] == vocab
    for name in ("pretrain", "finetune"):
        part = corpora[name]
        assert part["vocab"] == vocab
        np.testing.assert_array_equal(part["x_train"], again[name]["x_train"])
        assert part["x_train"].shape[1] == 32 and len(part["x_train"]) > 4000
        assert len(part["x_test"]) > 400
        assert part["x_train"].max() < len(vocab)
        # Decoding with the shared vocab gives back the corpus text.
        decoded = "".join(vocab[i] for i in part["x_train"][0])
        assert corpora["texts"][name].startswith(decoded)
    # Total-variation distance of the character distributions: the two
    # corpora differ far more than two halves of one corpus do.
    pre = _char_frequencies(corpora["pretrain"]["x_train"], len(vocab))
    pre_test = _char_frequencies(corpora["pretrain"]["x_test"], len(vocab))
    fine = _char_frequencies(corpora["finetune"]["x_train"], len(vocab))
    between = 0.5 * np.abs(pre - fine).sum()
    within = 0.5 * np.abs(pre - pre_test).sum()
    assert between > 0.15, between
    assert between > 2.5 * within, (between, within)
    index = {c: i for i, c in enumerate(vocab)}
    assert fine[index["_"]] > 3 * pre[index["_"]]
    assert fine[index["("]] > 1.5 * pre[index["("]]


def test_fine_tuning_corpora_bad_arguments():
    with pytest.raises(
        ValueError,
        match=r"`max_chars`.*enough characters for one window of seq_len=64.*Received: max_chars=50",
    ):
        datasets.load_fine_tuning_corpora(max_chars=50)
    with pytest.raises(ValueError, match=r"`seq_len`.*Received: seq_len=0"):
        datasets.load_fine_tuning_corpora(seq_len=0)


def test_char_lm_data_with_a_shared_vocab():
    data = datasets.make_char_lm_data("abab" * 20, seq_len=4, vocab=["x", "b", "a"])
    assert data["vocab"] == ["x", "b", "a"]
    assert data["x_train"][0].tolist() == [2, 1, 2, 1]
    with pytest.raises(
        ValueError, match=r"`vocab`.*every character of `text` \(1 missing, e.g. 'b'\)"
    ):
        datasets.make_char_lm_data("abab" * 20, seq_len=4, vocab=["a"])
    with pytest.raises(ValueError, match=r"`vocab`.*distinct characters"):
        datasets.make_char_lm_data("abab" * 20, seq_len=4, vocab=["a", "a", "b"])


def test_fine_tuning_corpora_too_long_a_window_names_seq_len():
    with pytest.raises(ValueError, match=r"`seq_len`.*Received: seq_len=1000000"):
        datasets.load_fine_tuning_corpora(seq_len=10**6)


def _tagged(n, tag, width=3):
    # Sample i of set `tag` holds tag * 1000 + i everywhere: its origin and
    # index can be read back from a batch.
    x = np.repeat((tag * 1000 + np.arange(n))[:, None], width, axis=1)
    return x, x[:, 0].copy()


def test_mix_replay_puts_the_share_of_old_samples_in_every_batch():
    new, old = _tagged(50, 1), _tagged(20, 2)
    data = datasets.mix_replay(new, old, steps=10, replay_fraction=0.25, batch_size=8)
    batches = [(x.numpy(), y.numpy()) for x, y in data.take(20)]
    assert len(batches) == 20
    for x, y in batches:
        assert x.shape == (8, 3) and y.shape == (8,)
        np.testing.assert_array_equal(x[:, 0], y)
        assert np.all(y[:6] // 1000 == 1) and np.all(y[6:] // 1000 == 2)
    drawn_new = np.concatenate([y[:6] for _, y in batches[:10]]) % 1000
    drawn_old = np.concatenate([y[6:] for _, y in batches[:10]]) % 1000
    # 60 draws from 50 new samples: the first pass uses each exactly once.
    np.testing.assert_array_equal(np.sort(drawn_new[:50]), np.arange(50))
    # 20 draws from 20 old samples: each once.
    np.testing.assert_array_equal(np.sort(drawn_old), np.arange(20))
    # After `steps` batches the same batches repeat.
    for (_, a), (_, b) in zip(batches[:10], batches[10:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_mix_replay_is_seeded_and_zero_replay_is_new_data_only():
    new, old = _tagged(40, 1), _tagged(40, 2)

    def first(seed, fraction=0.5):
        data = datasets.mix_replay(
            new, old, steps=3, replay_fraction=fraction, batch_size=4, seed=seed
        )
        return next(iter(data))[1].numpy()

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))
    assert np.all(first(0, fraction=0.0) // 1000 == 1)


def test_mix_replay_rejects_mismatched_sets():
    new = _tagged(10, 1)
    with pytest.raises(ValueError, match="Invalid value for argument `old`"):
        datasets.mix_replay(new, _tagged(10, 2, width=4), steps=2)
    with pytest.raises(ValueError, match="Invalid value for argument `new`"):
        datasets.mix_replay((new[0], new[1][:5]), new, steps=2)
    with pytest.raises(ValueError, match="`replay_fraction`"):
        datasets.mix_replay(new, new, steps=2, replay_fraction=0.99, batch_size=8)
