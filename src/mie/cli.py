"""The ``mie`` command: train | eval | compare | benchmark | ablate | sweep | landscape | plot | bench |
tune | prepare | methods | datasets.

Every command is a thin layer over the Python API. Bad input prints one line on stderr and
exits with code 2.
"""
import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

from . import config as config_mod
from . import distributed
from .errors import MieError, MieInputError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise MieInputError(f"{message} (see `{self.prog} --help`)")


def _data_args(p):
    p.add_argument("--data", metavar="FILE.npz", help="your data: x_<modality> arrays, y, optional split")
    p.add_argument("--dataset", help="a built-in dataset (see `mie datasets`)")
    p.add_argument("--modalities", help="comma-separated modality names, e.g. pix,zer")
    p.add_argument("--root", metavar="DIR", help="a prepared benchmark folder (see `mie prepare`)")


def _common_args(p):
    p.add_argument("--config", metavar="FILE.yaml", help="a config file (sections data, model, train, method)")
    _data_args(p)
    p.add_argument("--epochs", type=int, help="epoch budget per modality")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--pretrained", action="store_true",
                   help="every encoder loads pretrained weights (model.encoders.M.weights); error if one has none")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides anywhere on the line, e.g. train.lr=0.01 method.tau=0.8")


def build_parser():
    parser = _Parser(prog="mie", description="Balanced multimodal classification with MIE and its baselines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one method with one seed")
    _common_args(p)
    p.add_argument("--method", help="a method name (see `mie methods`)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")

    p = sub.add_parser("eval", help="re-compute a run's metrics from its checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="FILE.pt", help="a run's checkpoints/best.pt")
    _data_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--device", default="auto")
    p.add_argument("--missing", metavar="RATES", help="robustness: erase each modality's units (elements, time "
                   "steps, frames, tokens) with probability r, e.g. 0:0.9:0.1 or 0,0.5")
    p.add_argument("--drop", action="append", metavar="MOD[,MOD]", default=[],
                   help="robustness: remove these modalities together (zeroed, and fused over the rest); repeatable")
    p.add_argument("--noise", metavar="SIGMAS", help="robustness: add N(0, σ²) to real-valued inputs, e.g. 0.5,1,2")
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the masks and noise (default 0)")
    p.add_argument("--out", metavar="DIR", help="robustness report folder (default: the run's robustness/)")

    p = sub.add_parser("compare", help="run several methods over several seeds, side by side")
    _common_args(p)
    p.add_argument("--methods", required=True, help="comma-separated method names or variants "
                                                    "name:key=value[:key=value] (e.g. joint,mie,mie:sam_every=8)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--reference", help="the method every other is paired with (default: joint if compared, "
                                       "else the first)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for runs and results")
    p.add_argument("--robustness", action="store_true", help="add each method's test accuracy averaged over "
                                                             "missing rates 0:0.9:0.1 (see `mie eval --missing`)")

    p = sub.add_parser("benchmark", help="every method on every offline dataset setting → one report")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    p.add_argument("--methods", help="comma-separated method names (default: all)")
    p.add_argument("--settings", help="comma-separated settings (default: mfeat_pix_zer,mfeat_all_views,basicmotions)")
    p.add_argument("--out", default="runs/benchmark", metavar="DIR", help="folder for the runs")
    p.add_argument("--report", default="docs/results.md", metavar="FILE.md", help="the generated report")
    p.add_argument("--robustness", action="store_true", help="add each run's test accuracy averaged over missing "
                                                             "rates 0:0.9:0.1")
    p.add_argument("--cost-epochs", type=int, default=0, metavar="N",
                   help="add each method's cost per epoch relative to joint, measured side by side over N epochs")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")

    p = sub.add_parser("prepare", help="turn a benchmark's raw release into what training reads")
    p.add_argument("dataset", help="the benchmark (see `mie datasets`)")
    p.add_argument("--root", required=True, metavar="DIR", help="the raw release")
    p.add_argument("--out", metavar="DIR", help="where the prepared files go (default ROOT/prepared)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable files out and list them")
    p.add_argument("options", nargs="*", metavar="option=value",
                   help="the benchmark's own options anywhere on the line, e.g. size=224 (see `mie datasets`)")

    p = sub.add_parser("sweep", help="one method setting over a list or range of values × seeds: validation and "
                                     "test curves, the validation-best value marked")
    _common_args(p)
    p.add_argument("--method", required=True, help="a method name (see `mie methods`)")
    p.add_argument("--param", required=True, metavar="NAME",
                   help="a parameter of the method (tau or method.tau), or train.<key> / model.<key>")
    p.add_argument("--values", required=True, metavar="VALUES",
                   help="comma-separated values (e.g. 0.1,0.4,1 or stage,iteration), log:A:B:N or lin:A:B:N")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for runs, table and plot")

    p = sub.add_parser("plot", help="draw a run's validation curves, or a comparison's test accuracies (PNG)")
    p.add_argument("folder", metavar="DIR", help="a run folder (`mie train --out`) or a comparison folder "
                                                 "(`mie compare --out`)")

    p = sub.add_parser("landscape", help="filter-normalised 2-D loss surface of each modality around a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="FILE.pt", help="a run's checkpoints/best.pt")
    _data_args(p)
    p.add_argument("--split", default="train", choices=["train", "val", "test"],
                   help="the samples the losses are computed on (default train)")
    p.add_argument("--grid", default="-1:1:21", metavar="MIN:MAX:NUM",
                   help="coordinates along each direction, written --grid=-1:1:21 (the default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the two random directions and of --samples")
    p.add_argument("--samples", type=int, metavar="N", help="a random subset of N samples of the split")
    p.add_argument("--radius", type=float, default=0.5,
                   help="radius of the circle the sharpness figure averages over (default 0.5)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the run's landscape/)")

    p = sub.add_parser("ablate", help="MIE's ablations × seeds: SAM × GM grid, GM into one modality only, "
                                      "accuracy after each stage")
    _common_args(p)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--reference", default="mie", help="the row every other is paired with (default mie)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for runs, tables and plot")

    p = sub.add_parser("bench", help="time methods side by side on the same data and budget: seconds per epoch, "
                                     "ratio to joint, where the time goes, samples per second")
    _common_args(p)
    p.add_argument("--methods", default="joint,mie",
                   help="comma-separated methods or variants name:key=value[:key=value] (default joint,mie)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved turns; the fastest is kept (default 2)")
    p.add_argument("--out", metavar="DIR", help="also write bench.md and bench.csv here")

    p = sub.add_parser("tune", help="fair tuning: an Optuna study per method with the same number of trials, each "
                                    "scored on validation; the best parameters re-run over seeds (test read once)")
    _common_args(p)
    p.add_argument("--methods", required=True, help="comma-separated method names")
    p.add_argument("--trials", required=True, type=int, metavar="N", help="trials per method (the same for each)")
    p.add_argument("--budget", type=float, metavar="MINUTES",
                   help="per method: no new trial starts once its study has taken this much wall time")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (trials, plots, final/, tune.md)")
    p.add_argument("--storage", metavar="URL", help="the studies' database, any SQLAlchemy URL, e.g. "
                                                    "postgresql://host/db (default sqlite:///DIR/tune.db)")
    p.add_argument("--workers", type=int, default=1, metavar="K",
                   help="worker processes on this machine, each with train.threads=1 (default 1)")
    p.add_argument("--join", action="store_true",
                   help="only work on the existing studies' remaining trials (another machine on one --storage)")
    p.add_argument("--pruner", default="none", choices=["none", "median", "hyperband"],
                   help="stop hopeless trials early on their validation score per epoch (default none)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the best parameters' re-run (default 0,1,2,3,4)")
    p.add_argument("--trial-seeds", default="0", metavar="SEEDS",
                   help="each trial runs from these seeds, scored by their mean validation score (default 0)")
    p.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                   help="search KEY (tau, method.tau, train.lr, model.dim) over SPEC: log:A:B, float:A:B, "
                        "int:A:B, choice:a,b,c, or one value to fix it; repeatable")
    p.add_argument("--space-file", metavar="FILE.yaml", help="spaces as {method or all: {key: spec}}")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    p.add_argument("--heartbeat", type=int, default=30, metavar="SECONDS",
                   help="a running trial's heartbeat; one silent for 4 beats (its process died) is run again "
                        "(default 30)")

    sub.add_parser("methods", help="list the training methods and their hyper-parameters")
    sub.add_parser("datasets", help="list the built-in datasets")
    return parser


def _config(args, method=None, extra_overrides=()):
    data = {"path": args.data, "dataset": args.dataset, "root": getattr(args, "root", None),
            "modalities": args.modalities.split(",") if args.modalities else None}
    if args.data and args.dataset:
        raise MieInputError("give either --data or --dataset, not both")
    if args.data:
        data["dataset"] = None
    if args.dataset:
        data["path"] = None
    sections = {"data": data, "train": {"epochs": args.epochs, "device": args.device,
                                        "seed": getattr(args, "seed", None)},
                "model": {"pretrained": True if args.pretrained else None}}
    if method:
        sections["method"] = {"name": method}
    return config_mod.build_config(args.config, list(args.overrides) + list(extra_overrides), **sections)


def _ints(text, what):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MieInputError(f"{what} must be comma-separated integers, got '{text}'") from None


def cmd_train(args):
    from .train import run
    cfg = _config(args, args.method)
    result = run(cfg, out_dir=args.out, resume=args.resume)
    if distributed.rank() != 0:
        return
    test = result["test"]
    per = ", ".join(f"{m} {v['accuracy']:.4f}" for m, v in test["per_modality"].items())
    print(f"{result['method']} seed {result['seed']}: test accuracy {test['accuracy']:.4f}, "
          f"macro-F1 {test['macro_f1']:.4f}, MAP {test['map']:.4f}; per modality: {per}; "
          f"best epoch {result['best_epoch']}/{result['loop_epochs']} on validation; "
          f"{result['seconds']:.1f}s → {args.out}/metrics.json")
    _plot_after(args.out)


def cmd_eval(args):
    from .evaluate import evaluate_checkpoint
    from .data import DISK_DATASETS
    data = None
    if args.data or (args.dataset and args.dataset not in DISK_DATASETS):
        from .data.prepare import load_arrays
        cfg = config_mod.build_config(None, (), data={"path": args.data, "dataset": args.dataset,
                                                     "modalities": args.modalities})
        data = load_arrays(cfg)
    if not (args.missing or args.drop or args.noise):
        if args.out:
            raise MieInputError("--out is for a robustness report; add --missing, --drop or --noise")
        print(json.dumps(evaluate_checkpoint(args.checkpoint, data, args.split, args.device, args.root), indent=2))
        return
    from .evaluate import evaluate_robustness
    from .robustness import parse_levels
    rates = parse_levels(args.missing, "--missing") if args.missing else ()
    noises = parse_levels(args.noise, "--noise") if args.noise else ()
    if any(r > 1 for r in rates):
        raise MieInputError(f"--missing rates are probabilities in [0, 1], got '{args.missing}'")
    drops = [tuple(m.strip() for m in d.split(",") if m.strip()) for d in args.drop]
    _, text, note = evaluate_robustness(args.checkpoint, data, args.split, args.device, args.root, rates, drops,
                                        noises, args.mask_seed, args.out)
    print(text + (f"\n{note}" if note else ""))


def _method_overrides(args, methods=()):
    """Split ``args.overrides`` of a several-method command: ({parameter: value} from method.<parameter>=value,
    after the ``--config`` file's method settings that one of ``methods`` accepts; the other overrides)."""
    method_overrides, rest = {}, []
    if getattr(args, "config", None) and methods:
        from .compare import parse_label
        from .methods import method_params
        yaml_method = config_mod.read_yaml(args.config).get("method") or {}
        names = [parse_label(label)[0] for label in methods]
        method_overrides = {k: v for k, v in yaml_method.items()
                            if k != "name" and any(k in method_params(n) for n in names)}
    for text in args.overrides:
        parts, value = config_mod.parse_override(text)
        if parts[0] != "method":
            rest.append(text)
        elif len(parts) != 2 or parts[1] == "name":
            raise MieInputError(f"override '{text}': {args.command} takes method.<parameter>=value; "
                                "its methods are chosen by its own options")
        else:
            method_overrides[parts[1]] = value
    return method_overrides, rest


def cmd_compare(args):
    from .compare import compare
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    method_overrides, rest = _method_overrides(args, methods)
    args.overrides = rest
    cfg = _config(args)
    compare(cfg, methods, _ints(args.seeds, "--seeds"), args.out, method_overrides,
            command=shlex.join(["mie", *args.argv]), reference=args.reference, robustness=args.robustness)
    print((Path(args.out) / "results.md").read_text())
    _plot_after(args.out)


def cmd_benchmark(args):
    from .benchmark import benchmark
    if args.cost_epochs < 0:
        raise MieInputError(f"--cost-epochs must be >= 0, got {args.cost_epochs}")
    split = lambda text: [t.strip() for t in text.split(",") if t.strip()] if text else None
    benchmark(args.out, args.report, _ints(args.seeds, "--seeds"), split(args.methods), split(args.settings),
              args.overrides, command=shlex.join(["mie", *args.argv]), robustness=args.robustness,
              cost_epochs=args.cost_epochs)
    print(f"report written to {args.report}")


def _options(words):
    """['size=224', 'lists=DIR'] → {"size": 224, "lists": "DIR"} (values read as YAML)."""
    import yaml
    options = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not key.isidentifier():
            raise MieInputError(f"cannot read option '{word}'; expected name=value, e.g. size=224")
        options[key] = yaml.safe_load(value) if value else None
    return options


def cmd_prepare(args):
    from .data import call_with_options, disk_benchmark
    from .data.preparation import BAD_REPORT
    bench = disk_benchmark(args.dataset)
    if not Path(args.root).is_dir():
        raise MieInputError(f"--root {args.root} is not a folder; expected the raw {bench.name} release")
    out = Path(args.out) if args.out else Path(args.root) / "prepared"
    summary = call_with_options(bench.prepare, f"`mie prepare {bench.name}`", _options(args.options),
                                args.root, out, workers=args.workers, skip_bad=args.skip_bad)
    bad = f", {len(summary.bad)} bad (listed in {out / BAD_REPORT})" if summary.bad else ""
    print(f"{bench.name}: {summary.done} prepared, {summary.skipped} already done{bad} → {out}")


def cmd_methods(args):
    from .methods import METHODS, method_params
    for name, (cls, fixed, description) in METHODS.items():
        print(f"{name:<14} {description}")
        for key, default in method_params(name).items():
            print(f"{'':<16}{key}={default}  {cls.params[key].help}".rstrip())


def cmd_datasets(args):
    from .data import DATASETS
    for name, (_, default, description) in DATASETS.items():
        print(f"{name:<16} {description}; default modalities {','.join(default)}")
    from .data import DISK_DATASETS
    from .data.disk import options_of
    for name, bench in DISK_DATASETS.items():
        listing = lambda fn: ", ".join(f"{k}={v!r}" for k, v in options_of(fn).items()) or "(none)"
        print(f"{name:<16} {bench.description}; modalities {','.join(bench.modalities)}\n"
              f"{'':<16} read from disk: `mie prepare {name} --root RAW --out DIR [option=value ...]`, "
              f"then --dataset {name} --root DIR\n"
              f"{'':<16} prepare options: {listing(bench.prepare)}\n"
              f"{'':<16} data.options: {listing(bench.datasets)}")
    print(f"{'(your own)':<16} --data FILE.npz with x_<modality> (N, ...), y (N,), optional split (N,) "
          "0/1/2 = train/val/test")


def cmd_sweep(args):
    from .sweep import sweep
    cfg = _config(args, args.method)
    sweep(cfg, args.param, args.values, _ints(args.seeds, "--seeds"), args.out, fixed=args.overrides,
          command=shlex.join(["mie", *args.argv]))
    print((Path(args.out) / "sweep.md").read_text())


def cmd_tune(args):
    from .tune import read_space_file, tune
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    method_overrides, args.overrides = _method_overrides(args, methods)
    fixed = list(method_overrides) + [".".join(config_mod.parse_override(t)[0]) for t in args.overrides]
    entries = read_space_file(args.space_file, methods) if args.space_file else []
    for text in args.space:
        key, eq, spec = text.partition("=")
        if not eq or not key.strip():
            raise MieInputError(f"--space {text}: expected KEY=SPEC, e.g. train.lr=log:1e-4:1e-2 or tau=0.4")
        entries.append(("all", key.strip(), spec.strip()))
    summary = tune(_config(args), methods, args.trials, args.out, storage=args.storage, workers=args.workers,
                   join=args.join, budget=args.budget, pruner=args.pruner, seeds=_ints(args.seeds, "--seeds"),
                   trial_seeds=_ints(args.trial_seeds, "--trial-seeds"), space_entries=entries, fixed_keys=fixed,
                   method_overrides=method_overrides, sampler_seed=args.sampler_seed, heartbeat=args.heartbeat, command=shlex.join(["mie", *args.argv]))
    if summary is not None:
        print((Path(args.out) / "tune.md").read_text())
        _plot_after(Path(args.out) / "final")


def cmd_plot(args):
    from .plots import plot_folder
    print(plot_folder(args.folder))


def _plot_after(folder):
    """The folder's plots when matplotlib is installed, else one line saying what to install."""
    from .plots import missing_extra, plot_folder
    note = missing_extra()
    if note:
        print(f"mie: note: {note}", file=sys.stderr)
    else:
        print(plot_folder(folder))


def cmd_landscape(args):
    from .data import DISK_DATASETS
    from .landscape import loss_landscape
    data = None
    if args.data or (args.dataset and args.dataset not in DISK_DATASETS):
        from .data.prepare import load_arrays
        cfg = config_mod.build_config(None, (), data={"path": args.data, "dataset": args.dataset,
                                                     "modalities": args.modalities})
        data = load_arrays(cfg)
    _, text, note = loss_landscape(args.checkpoint, data, args.split, args.grid, args.seed, args.samples,
                                   args.radius, args.device, args.root, args.out)
    print(text + (f"\nmie: note: {note}" if note else ""))


def cmd_ablate(args):
    from .ablate import ablate
    method_overrides, args.overrides = _method_overrides(args, ["mie"])
    cfg = _config(args)
    ablate(cfg, _ints(args.seeds, "--seeds"), args.out, method_overrides, command=shlex.join(["mie", *args.argv]),
           reference=args.reference)
    print((Path(args.out) / "ablation.md").read_text())


def cmd_bench(args):
    from .bench import bench
    method_overrides, rest = _method_overrides(args)
    args.overrides, args.epochs = rest, 5 if args.epochs is None else args.epochs
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    _, _, text = bench(_config(args), labels, args.epochs, args.repeats, method_overrides, args.out,
                       log=lambda line: print(line, file=sys.stderr))
    print(text + (f"\nwritten to {args.out}/bench.md and bench.csv" if args.out else ""))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "benchmark": cmd_benchmark,
            "prepare": cmd_prepare,
            "sweep": cmd_sweep,
            "landscape": cmd_landscape,
            "ablate": cmd_ablate,
            "bench": cmd_bench,
            "tune": cmd_tune,
            "methods": cmd_methods,
            "plot": cmd_plot,
            "datasets": cmd_datasets}


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[\w.]+=")
_OPTION = re.compile(r"^[A-Za-z_]\w*=")
_KEY_VALUE_OPTIONS = ("--space",)     # options whose value looks like an override (train.lr=log:1e-4:1e-2)


def parse_args(argv):
    """argparse, with ``section.key=value`` overrides accepted anywhere on the line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    taken = [i for i, a in enumerate(argv) if _OVERRIDE.match(a) and not (i and argv[i - 1] in _KEY_VALUE_OPTIONS)]
    overrides = [argv[i] for i in taken]
    rest = [a for i, a in enumerate(argv) if i not in taken]
    options = [a for a in rest if _OPTION.match(a)] if rest[:1] == ["prepare"] else []
    args = build_parser().parse_args([a for a in rest if a not in options])
    if options:
        args.options = list(args.options) + options
    if overrides and not hasattr(args, "overrides"):
        raise MieInputError(f"`mie {args.command}` takes no section.key=value overrides, got {overrides[0]}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    args.argv = argv
    return args


def main(argv=None):
    """Run one command; every failure is one line on stderr and exit code 2 (130 when interrupted).
    MIE_DEBUG=1 shows the traceback of a failure that is not the user's input."""
    try:
        args = parse_args(argv)
        COMMANDS[args.command](args)
        distributed.stop()
    except MieError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("mie: interrupted; `mie train ... --resume` continues a run from its last epoch", file=sys.stderr)
        return 130
    except BrokenPipeError:          # e.g. `mie methods | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    except OSError as e:
        if os.environ.get("MIE_DEBUG"):
            raise
        where = f": {e.filename}" if e.filename else ""
        return _fail(f"{e.strerror or e}{where}")
    except Exception as e:
        if os.environ.get("MIE_DEBUG"):
            raise
        return _fail(f"unexpected {type(e).__name__}: {e} (MIE_DEBUG=1 shows where)")
    return 0


def _fail(message):
    print(f"mie: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
