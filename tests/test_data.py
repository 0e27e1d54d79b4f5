"""Data: npz layout, validation messages, splits, standardisation, the built-in datasets."""
import numpy as np
import pytest

from mie.data import TEST, TRAIN, VAL, MultimodalArrays, load_dataset, resolve_split, stratified_split
from mie.data.standardize import apply_standardizer, fit_standardizer
from mie.errors import MieInputError


def arrays(n=60, k=3, split=None):
    y = np.arange(n) % k
    return MultimodalArrays({"a": np.random.default_rng(0).normal(size=(n, 4))}, y, split)


def test_stratified_split_is_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(4), 40)
    train, val, test = stratified_split(y, [0.7, 0.15, 0.15], seed=3)
    assert len(set(train) | set(val) | set(test)) == 160 and len(train) + len(val) + len(test) == 160
    for part, per_class in ((train, 28), (val, 6), (test, 6)):
        assert np.all(np.bincount(y[part], minlength=4) == per_class)
    again = stratified_split(y, [0.7, 0.15, 0.15], seed=3)
    other = stratified_split(y, [0.7, 0.15, 0.15], seed=4)
    assert all(np.array_equal(p, q) for p, q in zip((train, val, test), again))
    assert not np.array_equal(test, other[2])


def test_split_without_validation_carves_it_from_train():
    split = np.array([TRAIN] * 40 + [TEST] * 20)
    idx, how = resolve_split(arrays(split=split), seed=0, carve_val=0.25)
    assert len(idx["test"]) == 20 and set(idx["test"]) == set(range(40, 60))
    assert len(idx["val"]) + len(idx["train"]) == 40 and len(idx["val"]) > 0
    assert not set(idx["val"]) & set(idx["train"]) and "validation" in how


def test_given_split_is_kept():
    split = np.array([TRAIN] * 30 + [VAL] * 15 + [TEST] * 15)
    idx, _ = resolve_split(arrays(split=split), seed=0)
    assert list(idx["val"]) == list(range(30, 45))


@pytest.mark.parametrize("split, message", [
    (np.array([VAL] * 30 + [TEST] * 30), "train split is empty"),
    (np.array([TRAIN] * 3 + [TEST] * 57), "validation"),   # 1 sample per class: nothing to carve
])
def test_empty_splits_are_refused(split, message):
    with pytest.raises(MieInputError, match="split is empty"):
        resolve_split(arrays(split=split), seed=0)


def test_class_missing_from_train_is_refused():
    y = np.arange(60) % 3
    split = np.where(y == 2, TEST, np.where(np.arange(60) % 2 == 0, TRAIN, VAL))
    with pytest.raises(MieInputError, match="class.*2.*no training samples"):
        resolve_split(MultimodalArrays({"a": np.zeros((60, 2))}, y, split), seed=0)


@pytest.mark.parametrize("x, y, message", [
    ({"a": np.zeros((5, 2))}, np.zeros(4, int), "5 samples but y has 4"),
    ({"a": np.array([[0.0, np.nan]] * 4)}, np.zeros(4, int), "NaN or inf"),
    ({"a": np.array([[0.0, np.inf]] * 4)}, np.zeros(4, int), "NaN or inf"),
    ({"a": np.zeros((4, 2))}, np.array([0, 1, -1, 0]), r"labels must be integers in \[0"),
    ({"a": np.zeros((4, 2))}, np.array([0.5, 1, 0, 0]), "integer class labels"),
    ({}, np.zeros(4, int), "no modality arrays"),
])
def test_bad_arrays_are_refused(x, y, message):
    with pytest.raises(MieInputError, match=message):
        MultimodalArrays(x, y)


def test_labels_beyond_the_class_list_are_refused():
    with pytest.raises(MieInputError, match=r"labels must be integers in \[0, 2\)"):
        MultimodalArrays({"a": np.zeros((3, 2))}, np.array([0, 1, 2]), classes=["x", "y"])


def test_standardizer_uses_per_feature_and_per_channel_statistics():
    rng = np.random.default_rng(0)
    v = rng.normal(3, 2, size=(50, 4)).astype(np.float32)
    z = apply_standardizer(v, fit_standardizer(v))
    assert np.allclose(z.mean(0), 0, atol=1e-5) and np.allclose(z.std(0), 1, atol=1e-4)
    s = rng.normal(size=(30, 3, 20)).astype(np.float32) * np.array([1, 5, 10], np.float32)[:, None]
    mean, std = fit_standardizer(s)
    assert mean.shape == (3, 1) and np.allclose(std[:, 0], s.transpose(1, 0, 2).reshape(3, -1).std(1), rtol=1e-4)


def test_mfeat_views_and_labels():
    data = load_dataset("mfeat", ["fou", "fac", "kar", "pix", "zer", "mor"])
    assert [data.x[m].shape[1] for m in data.modalities] == [76, 216, 64, 240, 47, 6]
    assert len(data.y) == 2000 and np.all(np.bincount(data.y) == 200) and data.split is None
    pix = data.x["pix"]
    assert pix.min() == 0 and pix.max() == 6   # pixel averages of 2×3 windows of a binary image


def test_basicmotions_modalities_and_split():
    data = load_dataset("basicmotions")
    assert data.modalities == ["acc", "gyro"]
    assert data.x["acc"].shape == (80, 3, 100) and data.x["gyro"].shape == (80, 3, 100)
    assert np.sum(data.split == TRAIN) == 40 and np.sum(data.split == TEST) == 40
    assert data.classes == ["badminton", "running", "standing", "walking"]


def test_unknown_dataset_and_modality():
    with pytest.raises(MieInputError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(MieInputError, match="unknown modality 'audio'"):
        load_dataset("mfeat", ["pix", "audio"])


def test_token_samples_need_a_named_text_encoder():
    import torch

    import mie

    class Posts(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {"image": torch.randn(4), "text": torch.randint(0, 50, (2, 6))}, i % 2

    with pytest.raises(mie.MieInputError, match=r"modality text holds token ids; name a text encoder, e\.g\. "
                                                r"model\.encoders\.text=minilm \(offline\) or "
                                                r"model\.encoders\.text=\{name: bert, path: DIR\}"):
        mie.fit({s: Posts() for s in ("train", "val", "test")}, "joint", progress=False)


def test_carve_validation_is_stratified_and_checked():
    from mie.data.splits import carve_validation
    labels = np.repeat([0, 1, 2], 10)
    keep, carved = carve_validation(labels, 0.2, seed=0)
    assert sorted(np.concatenate([keep, carved]).tolist()) == list(range(30))
    assert np.bincount(labels[carved]).tolist() == [2, 2, 2]
    for bad in (0, 1.0):
        with pytest.raises(MieInputError, match="carve_val must be in"):
            carve_validation(labels, bad, seed=0)


def test_arrays_leave_the_callers_dict_alone():
    x = {"a": np.arange(12, dtype=np.float64).reshape(6, 2), "b": np.ones((6, 3), dtype=np.int64)}
    before = {m: a for m, a in x.items()}
    arrays = MultimodalArrays(x, np.arange(6) % 2)
    assert all(x[m] is before[m] for m in x) and x["a"].dtype == np.float64
    assert arrays.x["a"].dtype == np.float32 and arrays.x["b"].dtype == np.float32


def test_zero_samples_is_one_clear_error():
    with pytest.raises(MieInputError, match="has no samples"):
        MultimodalArrays({"a": np.zeros((0, 4), np.float32)}, np.zeros(0, int))


def test_array_batches_are_fetched_in_one_indexing_and_equal_the_default_collation():
    import torch
    from torch.utils.data import default_collate
    from mie.data import ArrayDataset
    from mie.data.torch_dataset import collate
    rng = np.random.default_rng(0)
    ds = ArrayDataset({"a": rng.normal(size=(10, 3)).astype(np.float32), "b": rng.normal(size=(10, 2, 4))
                       .astype(np.float32)}, np.arange(10) % 3)
    idx = [7, 2, 2, 9]
    fast, slow = collate(ds.__getitems__(idx)), default_collate([ds[i] for i in idx])
    assert all(torch.equal(fast[0][m], slow[0][m]) for m in ("a", "b")) and torch.equal(fast[1], slow[1])


def test_an_indexed_set_carries_each_sample_s_index_with_or_without_a_batched_base():
    import torch
    from torch.utils.data import Dataset, default_collate
    from mie.data import ArrayDataset
    from mie.data.torch_dataset import Indexed, collate
    rng = np.random.default_rng(0)
    ds = ArrayDataset({"a": rng.normal(size=(10, 3)).astype(np.float32)}, np.arange(10) % 3)

    class OneByOne(Dataset):                  # a base without __getitems__ (e.g. a benchmark read from disk)
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]
    idx = [7, 2, 9]
    for base in (ds, OneByOne()):
        xs, y, extras = collate(Indexed(base).__getitems__(idx))
        assert torch.equal(xs["a"], default_collate([ds[i] for i in idx])[0]["a"])
        assert torch.equal(y, torch.as_tensor([7 % 3, 2 % 3, 9 % 3])) and extras["index"].tolist() == idx
    assert Indexed(ds)[4][2]["index"].item() == 4 and len(Indexed(ds)) == 10


def test_with_modalities_gives_views_that_read_fewer_inputs():
    import torch
    from torch.utils.data import Dataset
    from mie.data import ArrayDataset
    from mie.data.torch_dataset import Indexed, collate, with_modalities
    rng = np.random.default_rng(0)
    ds = ArrayDataset({"a": rng.normal(size=(10, 3)).astype(np.float32),
                       "b": rng.normal(size=(10, 2)).astype(np.float32)}, np.arange(10) % 3)
    view = with_modalities(ds, ["b"])
    assert list(view[3][0]) == ["b"] and torch.equal(view[3][0]["b"], ds[3][0]["b"])
    assert view.x["b"] is ds.x["b"] and list(ds.x) == ["a", "b"]           # shared, the original untouched
    xs, y, extras = collate(with_modalities(Indexed(ds), ["a"]).__getitems__([4, 1]))
    assert list(xs) == ["a"] and torch.equal(xs["a"], ds.x["a"][[4, 1]]) and extras["index"].tolist() == [4, 1]

    class Plain(Dataset):                    # cannot choose: every modality, as before
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return ds[i]
    plain = Plain()
    assert with_modalities(plain, ["a"]) is plain


def test_datasets_given_as_a_dict_load_only_the_chosen_modalities():
    import mie
    from mie.data import ArrayDataset
    from mie.data.prepare import prepare_run
    rng = np.random.default_rng(0)
    split = lambda n: ArrayDataset({"a": rng.normal(size=(n, 3)).astype(np.float32),
                                    "b": rng.normal(size=(n, 2)).astype(np.float32)}, np.arange(n) % 3)
    datasets = {"train": split(12), "val": split(6), "test": split(6)}
    prepared = prepare_run(mie.config.build_config(None, ["data.modalities=[b]"]), datasets)
    assert prepared.modalities == ["b"]
    assert all(list(prepared.datasets[s][0][0]) == ["b"] for s in ("train", "val", "test"))
    assert list(datasets["train"][0][0]) == ["a", "b"]
