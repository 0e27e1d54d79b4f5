"""Two processes under torch.distributed (gloo on CPU), as torchrun starts them: each trains on its
shard, gradients and BatchNorm statistics are averaged, the ranks end with identical models and
rank 0 alone writes the run's files."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import mie
import mie.distributed
import mie.train
from conftest import make_arrays

CONFIG = {"train": {"epochs": 2, "batch_size": 16, "threads": 1}, "model": {"dim": 16, "head_hidden": [16, 8]}}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, args, written):
    """Run ``worker(rank, *args)`` in two processes. A process that gloo aborts while it exits (SIGABRT from a
    worker thread torn down after ``destroy_process_group``: torch's, not ours, seen once in tens of runs),
    after every rank wrote its files ``written``, has done all the work the test checks."""
    try:
        mp.spawn(worker, args=(2, _free_port(), *args), nprocs=2, join=True)
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGABRT" or not all(p.exists() for p in written):
            raise


def _worker(rank, world, port, out, method, params):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    seen = {"checksums": [], "train_batches": []}
    evaluate, loader = mie.train.evaluate, mie.train.loader

    def checked_evaluate(m, *args, **kwargs):
        seen["checksums"].append(sum(float(v.double().sum()) for v in m.model.state_dict().values()
                                     if v.is_floating_point()))
        return evaluate(m, *args, **kwargs)

    def counted_loader(dataset, batch_size, shuffle=False, *args, **kwargs):
        made = loader(dataset, batch_size, shuffle, *args, **kwargs)
        if shuffle:
            seen["train_batches"].append(len(made))
        return made

    mie.train.evaluate, mie.train.loader = checked_evaluate, counted_loader
    x, y = make_arrays(n=120)
    result = mie.fit(mie.MultimodalArrays(x, y), method, config=CONFIG, out_dir=out / "run", seed=0, progress=False,
                     **params)
    (out / f"rank{rank}.json").write_text(json.dumps({"result": result, **seen}))
    mie.distributed.stop()


# gm_statistics="steps": each rank sees its own shard's batch means; gathered, every rank builds the same T
@pytest.mark.parametrize("method,params", [("joint", {}), ("mie", {}), ("mie", {"gm_statistics": "steps"})],
                         ids=["joint", "mie", "mie_steps"])
def test_two_ranks_stay_identical_and_rank0_writes(tmp_path, method, params):
    _spawn(_worker, (tmp_path, method, params), [tmp_path / "rank0.json", tmp_path / "rank1.json",
                                                  tmp_path / "run" / "metrics.json"])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["checksums"] == ranks[1]["checksums"]              # same parameters and buffers throughout
    assert ranks[0]["result"]["test"] == ranks[1]["result"]["test"] and ranks[0]["result"]["processes"] == 2
    # 84 training samples: 42 per rank → 3 batches of 16 each (one process would take 6), in every training
    # loader (MIE's stages each draw from a view of the training set that reads one modality)
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] and set(ranks[0]["train_batches"]) == {3}
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["test"] == ranks[0]["result"]["test"]
    assert len(list((tmp_path / "run").glob("history.csv"))) == 1


def _covariance_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.distributed.init_process_group("gloo")
    from mie.optim import InputCovariance
    layer = torch.nn.Linear(3, 2)
    batches = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3).sin()    # 4 batches of 2 samples
    with InputCovariance([layer]) as cov:
        for batch in batches[rank::world]:                                   # this rank's shard
            layer(batch)
    cov.all_reduce()
    torch.save(cov.covariances[0], out / f"cov{rank}.pt")
    mie.distributed.stop()


def test_covariances_sum_over_shards(tmp_path):
    _spawn(_covariance_worker, (tmp_path,), [tmp_path / "cov0.pt", tmp_path / "cov1.pt"])
    means = torch.arange(24, dtype=torch.float64).reshape(4, 2, 3).sin().mean(dim=1)     # z̄_t of every batch
    expected = sum(torch.outer(z, z) for z in means)
    for r in (0, 1):
        assert torch.allclose(torch.load(tmp_path / f"cov{r}.pt"), expected)
