"""The seam between a method and the loop, driven by a small method written here: the step's
position, the loop's validation metrics, cached evaluations, declared learning-rate scales, an
epoch's own training set with per-sample extras, and parameter checks at creation; and how the
loop's validation chooses the checkpoint."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import mie
import mie.methods
import mie.train
from conftest import make_arrays
from mie.methods import Method
from mie.methods.params import Param, number

CONFIG = {"train": {"epochs": 3, "batch_size": 16, "lr": 0.01}, "model": {"dim": 8, "head_hidden": [8]}}


class Doubled(Dataset):
    """Every sample twice; the copy carries the flag 1."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return 2 * len(self.base)

    def __getitem__(self, i):
        xs, y = self.base[i % len(self.base)]
        return xs, y, {"copy": torch.tensor(float(i >= len(self.base)))}


class Probe(Method):
    """Joint late fusion with one named param group per modality, recording what the loop tells it."""
    name = "probe"
    params = {**Method.params, "scale": Param(0.5, number(above=0), "lr multiplier of the second modality")}

    def setup(self, model, ctx):
        super().setup(model, ctx)
        self.optimizer = ctx.make_optimizer([{"params": model.modality_parameters(m), "name": m}
                                             for m in model.modalities])
        self.steps, self.rates, self.validations, self.cached, self.extras = [], [], [], [], []

    def lr_scale(self, group):
        return self.scale if group == self.model.modalities[1] else 1.0

    def training_data(self, epoch, dataset):
        return Doubled(dataset) if epoch == 1 else dataset

    def training_step(self, batch, step):
        xs, y = batch.inputs, batch.labels
        self.steps.append(step)
        self.rates.append([g["lr"] for g in self.optimizer.param_groups])
        self.extras.append(batch.extras.get("copy"))
        loss = F.cross_entropy(torch.stack(list(self.model(xs).values())).mean(0), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def on_validation(self, epoch, metrics):
        self.validations.append(metrics)
        self.cached.append(self.ctx.evaluate("val") is metrics)
        return {"probe_val_acc_a": metrics["per_modality"]["a"]["accuracy"]}


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(mie.methods.METHODS, "probe", (Probe, {}, "a method that records the seam"))
    made = []
    original = mie.train.create_method
    monkeypatch.setattr(mie.train, "create_method", lambda name, **kw: made.append(original(name, **kw)) or made[-1])
    passes = []
    evaluate = mie.train.evaluate
    monkeypatch.setattr(mie.train, "evaluate", lambda *a, **k: passes.append(1) or evaluate(*a, **k))
    return made, passes


def test_the_loop_speaks_to_a_method_only_through_the_seam(probe):
    made, passes = probe
    x, y = make_arrays(n=100)
    rows = []
    mie.fit(mie.MultimodalArrays(x, y), "probe", config=CONFIG, seed=0, progress=False,
            callbacks=[lambda epoch, row: rows.append(row)])
    method = made[0]
    n_train = 70                                             # 70 / 15 / 15 of 100
    per_epoch = [math.ceil(n_train / 16), math.ceil(2 * n_train / 16), math.ceil(n_train / 16)]
    assert [s.epoch for s in method.steps] == [e for e, n in enumerate(per_epoch) for _ in range(n)]
    assert [s.index for s in method.steps] == [i for n in per_epoch for i in range(n)]
    assert [s.steps_per_epoch for s in method.steps] == [n for n in per_epoch for _ in range(n)]
    assert [s.global_step for s in method.steps] == list(range(sum(per_epoch)))
    # epoch 1 drew from the doubled set: every sample once with the flag 0 and once with 1
    flags = torch.cat([f for s, f in zip(method.steps, method.extras) if s.epoch == 1])
    assert flags.sum().item() == n_train and len(flags) == 2 * n_train
    assert all(f is None for s, f in zip(method.steps, method.extras) if s.epoch != 1)
    # the loop sets each named group's rate: train.lr × the method's scale
    assert all(r == pytest.approx([0.01, 0.005]) for r in method.rates)
    # on_validation gets the loop's own metrics; asking the context for them again costs no pass
    assert [v["accuracy"] for v in method.validations] == [r["val_accuracy"] for r in rows]
    assert [r["probe_val_acc_a"] for r in rows] == [r["val_acc_a"] for r in rows]
    assert all("loss" in v and "loss" in v["per_modality"]["b"] for v in method.validations)
    assert all(method.cached) and len(passes) == 3 + 1         # one validation pass per epoch, one test pass


def test_parameters_are_checked_once_at_creation(probe):
    with pytest.raises(mie.MieInputError, match="method 'probe': scale must be a number > 0, got 0"):
        mie.methods.create_method("probe", scale=0)
    with pytest.raises(mie.MieInputError, match="fusion must be one of 'average', 'weight', 'log', 'fitted', got 'concat'"):
        mie.methods.create_method("probe", fusion="concat")
    with pytest.raises(mie.MieInputError, match="unknown parameter"):
        mie.methods.create_method("probe", tau=1)


def test_evaluate_is_cached_until_the_model_changes():
    x, y = make_arrays(n=60)
    cfg = mie.config.build_config({**CONFIG, "method": {"name": "joint"}})
    prepared = mie.data.prepare.prepare_run(cfg, mie.MultimodalArrays(x, y))
    run = mie.train.Run(cfg, prepared, torch.device("cpu"), None)
    first = run.evaluate("train")
    assert run.evaluate("train") is first
    run.model_changed()
    assert run.evaluate("train") is not first and run.evaluate("train") == first   # recomputed, same model
    with pytest.raises(ValueError, match="test is read once"):
        run.method.ctx.evaluate("test")


def test_train_batches_in_data_order_or_in_a_keyed_permutation():
    """ctx.train_batches(): every training sample once in the data's order; with shuffle=k, the samples
    of a permutation drawn from (train.seed, k) alone, in full batches (a shuffled training loader's
    drop_last): the same for the same key, another for another key, the run's random streams untouched."""
    x, y = make_arrays(n=80)
    cfg = mie.config.build_config({**CONFIG, "method": {"name": "joint"}})
    run = mie.train.Run(cfg, mie.data.prepare.prepare_run(cfg, mie.MultimodalArrays(x, y)), torch.device("cpu"), None)
    rows = lambda batches: torch.cat([xs["a"] for xs, _ in batches])
    ordered = rows(run.train_batches())
    generator, global_rng = run.generator.get_state(), torch.get_rng_state()
    once, again, other = (rows(run.train_batches(shuffle=k)) for k in (3, 3, 4))
    assert torch.equal(once, again) and not torch.equal(once, other) and not torch.equal(once, ordered)
    size = cfg["train"]["batch_size"]
    assert len(ordered) % size != 0 and len(once) == len(other) == len(ordered) // size * size
    for shuffled in (once, other):         # rows of the data, each at most once
        assert len(torch.unique(shuffled, dim=0)) == len(shuffled)
        assert all((ordered == row).all(dim=1).any() for row in shuffled)
    assert torch.equal(run.generator.get_state(), generator) and torch.equal(torch.get_rng_state(), global_rng)


def test_ties_in_the_validation_score_go_to_the_lower_validation_loss(monkeypatch):
    script = iter([(0.5, 2.0), (1.0, 1.0), (1.0, 0.5), (1.0, 0.7)])       # (accuracy, loss) of epochs 1-4
    evaluate = mie.train.evaluate

    def scripted(*args, **kwargs):
        metrics = evaluate(*args, **kwargs)
        acc, loss = next(script, (None, None))                            # then the test pass, as it is
        return metrics if acc is None else {**metrics, "accuracy": acc, "loss": loss}
    monkeypatch.setattr(mie.train, "evaluate", scripted)
    x, y = make_arrays(n=100)
    config = {**CONFIG, "train": {**CONFIG["train"], "epochs": 4}}
    result = mie.fit(mie.MultimodalArrays(x, y), "joint", config=config, seed=0, progress=False)
    assert result["best_epoch"] == 3 and result["val"]["loss"] == 0.5


def test_a_stage_loads_only_the_modality_it_trains_and_trains_as_if_it_loaded_all(monkeypatch):
    """MIE's ``training_inputs``: each stage's batches hold the trained modality's inputs alone (the view
    of ``with_modalities``), per-batch alternation all of them; the run is the one that loads everything."""
    from mie.data import ArrayDataset
    from mie.methods.mie import MIE
    seen = []
    step = MIE.training_step
    monkeypatch.setattr(MIE, "training_step", lambda self, batch, s: seen.append((s.epoch, tuple(batch.inputs)))
                        or step(self, batch, s))
    data = mie.MultimodalArrays(*make_arrays(n=60))
    def fit(**params):
        rows = []
        mie.fit(data, "mie", config=CONFIG, seed=0, progress=False, callbacks=[lambda e, row: rows.append(row)],
                **params)
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    restricted = fit()
    assert sorted(set(seen)) == [(0, ("a",)), (1, ("b",)), (2, ("a",)), (3, ("b",)), (4, ("a",)), (5, ("b",))]
    seen.clear()
    fit(alternation="iteration")
    assert {keys for _, keys in seen} == {("a", "b")}
    monkeypatch.delattr(ArrayDataset, "only")           # a dataset that cannot choose: every input loaded
    seen.clear()
    assert fit() == restricted
    assert {keys for _, keys in seen} == {("a", "b")}
