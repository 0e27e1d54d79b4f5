"""Run configuration: defaults, YAML files, ``section.key=value`` overrides, and their validation.

A config has four sections: ``data``, ``model``, ``train`` and ``method``. The method section holds
``name`` and that method's hyper-parameters (``mie methods`` lists them).
"""
import copy
import re
from pathlib import Path

import yaml

from .errors import MieInputError
from .methods import method_params
from .models.encoders import encoder_options

DEFAULTS = {
    "data": {
        "dataset": None,        # a built-in dataset name (mie datasets) ...
        "path": None,           # ... or a user's .npz file
        "root": None,           # a prepared benchmark folder (mie prepare), for datasets read from disk
        "options": {},          # that benchmark's own options, e.g. {split: standard, lists: DIR} (mie datasets)
        "modalities": None,     # list of names; default: the dataset's usual pair / all x_* of an npz
        "standardize": True,    # z-score per feature (vectors) or channel, with train statistics
        "val_fraction": 0.15,   # without a split array: stratified 70/15/15 from the seed
        "test_fraction": 0.15,
        "carve_val": 0.2,       # a split without validation: this fraction of train becomes validation
        "split_seed": None,     # the seed of the train/val/test split and of the validation carve
                                # (None: the run's train.seed; fixed, the runs of several seeds share one split)
        "num_classes": None,    # default: max label + 1
    },
    "model": {
        "dim": 256,                 # encoder output size d, shared by all modalities
        "encoders": {},             # modality → encoder name or {name: ..., weights: PATH, ...};
                                    # default chosen from the sample's rank
        "pretrained": False,        # every encoder must load pretrained weights (error if it has none)
        "head_hidden": [256, 64],   # MIE's head: FC(d,256) → ReLU → FC(256,64) → FC(64,K)
    },
    "train": {
        "epochs": 30,           # epoch budget per modality (the same for every method)
        "batch_size": 64,
        "optimizer": "adam",    # adam | adamw | sgd
        "lr": 1.0e-3,
        "momentum": 0.9,        # sgd only
        "betas": [0.9, 0.999],  # adam / adamw only
        "lr_step": None,        # step schedule: lr · lr_gamma^(⌊e / lr_step⌋), e = the method's schedule
        "lr_gamma": 0.1,        # epoch (the loop epoch; for MIE's stages the epoch within the stage)
        "weight_decay": 1.0e-4,
        "seed": 0,
        "device": "auto",       # auto | cpu | cuda | cuda:N
        "amp": "off",           # off | bf16: forward passes in bfloat16 autocast (weights stay float32)
        "num_workers": 0,
        "threads": None,        # CPU threads for torch (None: torch's default); 1 is fastest for small
                                # models and on a machine shared with other jobs
        "select_on": "accuracy",   # validation metric that chooses the checkpoint: accuracy | macro_f1 | map
                                   # (ties: the lower validation loss)
    },
    "method": {"name": "mie"},
}

OPTIMIZERS = ("adam", "adamw", "sgd")
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
SELECT_ON = ("accuracy", "macro_f1", "map")
AMP = ("off", "bf16")


def default_config():
    return copy.deepcopy(DEFAULTS)


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise MieInputError(f"no such config file: {path}")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MieInputError(f"cannot parse {path} as YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise MieInputError(f"{path} must hold a mapping of sections (data, model, train, method)")
    return cfg


def parse_override(text):
    """'train.lr=0.01' → (['train', 'lr'], 0.01); the value is read as YAML."""
    if "=" not in text:
        raise MieInputError(f"cannot read override '{text}'; expected section.key=value, e.g. train.lr=0.01")
    key, value = text.split("=", 1)
    try:
        value = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        raise MieInputError(f"cannot read the value of override '{text}'") from None
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise MieInputError(f"override key '{key}' must be section.key, e.g. train.lr or method.tau")
    return parts, value


def merge(base, update):
    """Recursively merge ``update`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for k, v in (update or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and out.get(k):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_config(config=None, overrides=(), **sections):
    """Defaults ← ``config`` (a YAML path or a dict of sections) ← ``sections`` (e.g.
    train={"seed": 1}; None values are ignored) ← ``overrides`` ('train.lr=0.01'); validated.

    A method named in ``sections`` that differs from the config's method replaces that section.
    """
    cfg = default_config()
    if config is not None:
        cfg = merge(cfg, config if isinstance(config, dict) else read_yaml(config))
    for name, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None}
        if name == "method" and values.get("name", cfg["method"].get("name")) != cfg["method"].get("name"):
            cfg["method"] = {}
        cfg = merge(cfg, {name: values})
    for text in overrides:
        parts, value = parse_override(text)
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise MieInputError(f"override '{text}': '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return validate(cfg)


def _check_type(where, value, default):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise MieInputError(f"{where} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise MieInputError(f"{where} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, str) and FLOAT.fullmatch(value.strip()):
            value = float(value)    # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MieInputError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise MieInputError(f"{where} must be a string, got {value!r}")
    return value


def validate(cfg):
    """Reject unknown sections and keys, wrong types and impossible values; fill method defaults."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise MieInputError(f"unknown config section(s) {', '.join(unknown)}; expected: {', '.join(DEFAULTS)}")
    for section in ("data", "model", "train"):
        if not isinstance(cfg[section], dict):
            raise MieInputError(f"config section '{section}' must be a mapping")
        for key, value in cfg[section].items():
            if key not in DEFAULTS[section]:
                raise MieInputError(f"unknown config key '{section}.{key}'; expected one of: "
                                    f"{', '.join(DEFAULTS[section])}")
            cfg[section][key] = _check_type(f"{section}.{key}", value, DEFAULTS[section][key])
    method = cfg["method"]
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise MieInputError("config section 'method' must be a mapping with a 'name', e.g. {name: mie}")
    params = method_params(method["name"])
    for key, value in method.items():
        if key == "name":
            continue
        if key not in params:
            raise MieInputError(f"unknown config key 'method.{key}' for method '{method['name']}'; "
                                f"expected one of: {', '.join(params) or '(none)'}")
        if not isinstance(value, dict):   # mappings (e.g. {audio: 25, video: 50}) are checked by the method
            method[key] = _check_type(f"method.{key}", value, params[key])
    cfg["method"] = {"name": method["name"], **{k: method.get(k, v) for k, v in params.items()}}
    data, train = cfg["data"], cfg["train"]
    if data["modalities"] is not None:
        if isinstance(data["modalities"], str):
            data["modalities"] = [m.strip() for m in data["modalities"].split(",") if m.strip()]
        if not isinstance(data["modalities"], list) or not data["modalities"]:
            raise MieInputError("data.modalities must be a list of modality names, e.g. [pix, zer]")
    split_seed = data["split_seed"]
    if split_seed is not None and (isinstance(split_seed, bool) or not isinstance(split_seed, int)):
        raise MieInputError(f"data.split_seed must be an integer or null, got {data['split_seed']!r}")
    if train["optimizer"] not in OPTIMIZERS:
        raise MieInputError(f"train.optimizer '{train['optimizer']}' is not one of: {', '.join(OPTIMIZERS)}")
    if train["amp"] not in AMP:
        raise MieInputError(f"train.amp '{train['amp']}' is not one of: {', '.join(AMP)}")
    if train["select_on"] not in SELECT_ON:
        raise MieInputError(f"train.select_on '{train['select_on']}' is not one of: {', '.join(SELECT_ON)}")
    for key in ("epochs", "batch_size"):
        if train[key] < 1:
            raise MieInputError(f"train.{key} must be >= 1, got {train[key]}")
    if train["threads"] is not None and (isinstance(train["threads"], bool) or not isinstance(train["threads"], int)
                                         or train["threads"] < 1):
        raise MieInputError(f"train.threads must be a positive integer or null, got {train['threads']!r}")
    if (not isinstance(train["betas"], list) or len(train["betas"]) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in train["betas"])):
        raise MieInputError(f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {train['betas']!r}")
    if train["lr_step"] is not None and (isinstance(train["lr_step"], bool) or not isinstance(train["lr_step"], int)
                                         or train["lr_step"] < 1):
        raise MieInputError(f"train.lr_step must be a positive integer or null, got {train['lr_step']!r}")
    if not 0 < train["lr_gamma"] <= 1:
        raise MieInputError(f"train.lr_gamma must be in (0, 1], got {train['lr_gamma']}")
    if train["lr"] <= 0:
        raise MieInputError(f"train.lr must be > 0, got {train['lr']}")
    if train["weight_decay"] < 0:
        raise MieInputError(f"train.weight_decay must be >= 0, got {train['weight_decay']}")
    if not 0 <= train["momentum"] < 1:
        raise MieInputError(f"train.momentum must be in [0, 1), got {train['momentum']}")
    if train["num_workers"] < 0:
        raise MieInputError(f"train.num_workers must be >= 0, got {train['num_workers']}")
    if not 0 < data["carve_val"] < 1:
        raise MieInputError(f"data.carve_val must be in (0, 1), got {data['carve_val']}")
    model = cfg["model"]
    if model["dim"] < 1:
        raise MieInputError(f"model.dim must be >= 1, got {model['dim']}")
    hidden = model["head_hidden"]
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                               for h in hidden):
        raise MieInputError(f"model.head_hidden must be a list of layer widths >= 1, e.g. [256, 64] "
                            f"([] for a linear head); got {hidden!r}")
    if not isinstance(data["options"], dict):
        raise MieInputError("data.options must be a mapping of option → value, e.g. {split: standard}")
    if not isinstance(cfg["model"]["encoders"], dict):
        raise MieInputError("model.encoders must map modality names to encoder names, e.g. {pix: mlp}")
    for m, entry in cfg["model"]["encoders"].items():
        encoder_options(entry, m)
    return cfg


def dump(cfg):
    return yaml.safe_dump(cfg, sort_keys=False)
