"""Shared fixtures: small synthetic multimodal data in the layouts users bring."""
import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def make_arrays(n=120, k=3, seed=0, shapes=None):
    """Two modalities whose features carry the label (a strong one and a weak one)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    shapes = shapes or {"a": (8,), "b": (5,)}
    x = {}
    for i, (m, shape) in enumerate(shapes.items()):
        centers = rng.normal(size=(k, *shape)) * (2.0 if i == 0 else 0.7)
        x[m] = (centers[y] + rng.normal(size=(n, *shape))).astype(np.float32)
    return x, y


@pytest.fixture
def npz_file(tmp_path):
    x, y = make_arrays()
    path = tmp_path / "toy.npz"
    np.savez(path, y=y, **{f"x_{m}": a for m, a in x.items()})
    return path


TINY = ["train.epochs=2", "train.batch_size=32", "model.dim=16", "model.head_hidden=[16,8]"]


def make_context(modalities, lr=0.1, train_batches=(), evaluate=None, epochs_per_modality=6,
                 make_optimizer=None):
    """A ``TrainContext`` for driving a method by hand: SGD at ``lr`` (unless ``make_optimizer``),
    ``train_batches`` a list of ``Batch``es (given in that order whatever the ``shuffle`` asked for),
    ``evaluate`` split → metrics (default: refuses)."""
    from mie.train import TrainContext

    def refuse(split):
        raise AssertionError(f"the method asked for an evaluation of {split}")
    return TrainContext(modalities=list(modalities), device=torch.device("cpu"),
                        make_optimizer=make_optimizer or (lambda params, lr_=None: torch.optim.SGD(list(params), lr=lr_ or lr)),
                        train_batches=lambda shuffle=None: iter(list(train_batches)), evaluate=evaluate or refuse,
                        epochs_per_modality=epochs_per_modality)


def make_step(epoch=0, index=0, steps_per_epoch=1):
    """The ``Step`` of mini-batch ``index`` in loop epoch ``epoch``."""
    from mie.methods import Step
    return Step(epoch, index, steps_per_epoch, epoch * steps_per_epoch + index)


def sgd_loop_optimizers(lr=0.1):
    """The loop's optimizer factory with plain SGD at ``lr``: group lr = lr × schedule × lr_scale(name)."""
    from mie.config import default_config
    from mie.train import Optimizers
    return Optimizers({**default_config()["train"], "optimizer": "sgd", "lr": lr, "momentum": 0.0,
                       "weight_decay": 0.0})


def setup_with_loop_optimizers(method, model, lr=0.1, epochs=6):
    """``method.setup`` with the loop's optimizer factory, rates applied as at the start of epoch 0;
    returns the factory (its ``apply`` is the loop's learning-rate update)."""
    optimizers = sgd_loop_optimizers(lr)
    method.setup(model, make_context(model.modalities, make_optimizer=optimizers.make, epochs_per_modality=epochs))
    optimizers.apply(1.0, method)
    return optimizers
