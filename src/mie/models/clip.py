"""CLIP encoders (Radford et al., ICML 2021) through Hugging Face ``transformers``: the image and
text towers of a CLIP model, the encoders of the paper's Table 6 (MIE with CLIP features on
Twitter2015 / Sarcasm).

- ``clip_text``: (B, 2, L) int64 [input_ids; attention_mask] → (B, dim): ``text_embeds`` of
  ``CLIPTextModelWithProjection`` (the end-of-text token's state, projected). Token ids must come
  from the same model's tokenizer: prepare with ``tokenizer=PATH`` and ``max_tokens`` ≤ 77.
- ``clip_image``: (B, 3, H, W) float → (B, dim): ``image_embeds`` of
  ``CLIPVisionModelWithProjection``. Pixels normalised with CLIP's mean / std (the image + text
  benchmarks' default); sizes other than the model's (224 for ViT-B/32) interpolate the position
  embeddings.

``path``: a local folder holding a CLIP model (a full ``CLIPModel`` folder serves both towers) or
a hub id in the local Hugging Face cache (default openai/clip-vit-base-patch32); ``download:
true`` allows fetching it. ``freeze`` and the projection to ``dim`` are as for the text
encoders (``models/text.py``).
"""
from ..errors import MieInputError
from .text import PretrainedEncoder, check_token_shape, load_pretrained, require_transformers

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class CLIPTextEncoder(PretrainedEncoder):
    """(B, 2, L) int64 [input_ids; attention_mask] → (B, dim)."""

    def forward(self, x):
        return self.proj(self.backbone(input_ids=x[:, 0], attention_mask=x[:, 1]).text_embeds)


class CLIPImageEncoder(PretrainedEncoder):
    """(B, 3, H, W) float, CLIP-normalised → (B, dim)."""

    def forward(self, x):
        size = self.backbone.config.image_size
        resize = {"interpolate_pos_encoding": True} if tuple(x.shape[-2:]) != (size, size) else {}
        return self.proj(self.backbone(pixel_values=x, **resize).image_embeds)


def clip_text(shape, dim=512, path=DEFAULT_CLIP, freeze=False, download=False):
    transformers = require_transformers("encoder clip_text")
    backbone = load_pretrained(transformers.CLIPTextModelWithProjection, path, "encoder clip_text", download)
    check_token_shape(shape, "clip_text", backbone.config.max_position_embeddings)
    return CLIPTextEncoder(backbone, backbone.config.projection_dim, dim, freeze)


def clip_image(shape, dim=512, path=DEFAULT_CLIP, freeze=False, download=False):
    if len(shape) != 3 or shape[0] != 3:
        raise MieInputError(f"encoder clip_image reads RGB images of shape (3, H, W), got {tuple(shape)}")
    transformers = require_transformers("encoder clip_image")
    backbone = load_pretrained(transformers.CLIPVisionModelWithProjection, path, "encoder clip_image", download)
    return CLIPImageEncoder(backbone, backbone.config.projection_dim, dim, freeze)
