"""`random:` model names: the exact architecture of a published CLIP or SigLIP checkpoint, with random weights.

Counting parameters (`cliptune train --dry-run`), timing (`cliptune bench`) and sizing memory need a
model's shapes, not its weights, and no CLIP or SigLIP weights install offline. Each shape below copies
the architecture numbers of its hub checkpoint's config.json, so `random:clip-vit-l-14` has exactly
openai/clip-vit-large-patch14's parameters (427,616,513); `models.contrastive.load_model` builds it.

Where the numbers come from (every field that sets a parameter's shape is written out, none left to
transformers' defaults, so a change of those defaults cannot move a count):
- CLIP ViT-B/32: transformers' `CLIPConfig` defaults, documented as openai/clip-vit-base-patch32's
  architecture; open_clip `src/open_clip/model_configs/ViT-B-32.json`.
- CLIP ViT-B/16: open_clip `model_configs/ViT-B-16.json`: ViT-B/32's towers with 16 px patches.
- CLIP ViT-L/14: openai/clip-vit-large-patch14 `config.json` (text 768 wide, 3072 MLP, 12 layers, 12
  heads; vision 1024 wide, 4096 MLP, 24 layers, 16 heads, 14 px patches; projection 768), read from a
  copy on GitHub (ourml/clip-vit-large-patch14); open_clip `model_configs/ViT-L-14.json`.
- CLIP ViT-L/14-336: open_clip `model_configs/ViT-L-14-336-quickgelu.json`: ViT-L/14 at 336 px.
- SigLIP base-patch16-224: transformers' `SiglipConfig` defaults, documented as
  google/siglip-base-patch16-224's architecture (its config.json sets no size); open_clip
  `model_configs/ViT-B-16-SigLIP.json` (64-token context, 32,000 vocabulary, 768 wide, 12 x 12).
- SigLIP so400m-patch14-384: google/siglip-so400m-patch14-384 `config.json` (both towers 1152 wide,
  4304 MLP, 27 layers, 16 heads; vision 384 px, 14 px patches; vocabulary and context left to the
  SigLIP defaults), read from a copy quoted in a GitHub README (no hub access here); open_clip
  `model_configs/ViT-SO400M-14-SigLIP-384.json` (context 64, vocabulary 32,000, width 1152, 27 layers,
  16 heads, mlp_ratio 3.7362 = 4304 / 1152).
The totals match open_clip's `docs/model_profile.csv` (millions of parameters, to 0.01 M): ViT-B-32
151.28, ViT-B-16 149.62, ViT-L-14 427.62, ViT-L-14-336 427.94, ViT-B-16-SigLIP 203.16,
ViT-SO400M-14-SigLIP-384 877.96 (tests/test_presets.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cliptune.config import ConfigError

CLIP_CONTEXT = 77     # tokens CLIP's text tower has positions for
SIGLIP_CONTEXT = 64   # tokens SigLIP was trained with, every caption padded to it

_CLIP_B_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 8, "max_position_embeddings": CLIP_CONTEXT}
_CLIP_L_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "max_position_embeddings": CLIP_CONTEXT}
_VIT_B = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
_VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}


@dataclass(frozen=True)
class RandomShape:
    """One checkpoint's architecture: the shape-setting fields of its text and vision configs."""

    hub_id: str
    """The checkpoint whose config.json this copies (what a preset's model.name loads)."""
    family: Literal["clip", "siglip"]
    text: dict[str, int]
    vision: dict[str, int]
    projection_dim: int | None = None
    """CLIP's shared embedding width; SigLIP has none (its text head keeps the text width)."""

    @property
    def image_size(self) -> int:
        return self.vision["image_size"]

    @property
    def text_context(self) -> int:
        return self.text["max_position_embeddings"]

    def transformers_config(self, special_tokens: dict[str, int] | None = None):
        """The transformers CLIPConfig / SiglipConfig of this shape; `special_tokens` (bos/eos/pad ids)
        set which ids the text tower treats as such, which no parameter's shape depends on."""
        import transformers

        text = {**self.text, **(special_tokens or {})}
        if self.family == "clip":
            return transformers.CLIPConfig(text_config=text, vision_config=dict(self.vision),
                                           projection_dim=self.projection_dim)
        # SigLIP's text head maps the pooled token to the shared space at the text width.
        text["projection_size"] = self.text["hidden_size"]
        return transformers.SiglipConfig(text_config=text, vision_config=dict(self.vision))


RANDOM_SHAPES: dict[str, RandomShape] = {
    "random:clip-vit-b-32": RandomShape("openai/clip-vit-base-patch32", "clip", _CLIP_B_TEXT,
                                        {**_VIT_B, "image_size": 224, "patch_size": 32}, projection_dim=512),
    "random:clip-vit-b-16": RandomShape("openai/clip-vit-base-patch16", "clip", _CLIP_B_TEXT,
                                        {**_VIT_B, "image_size": 224, "patch_size": 16}, projection_dim=512),
    "random:clip-vit-l-14": RandomShape("openai/clip-vit-large-patch14", "clip", _CLIP_L_TEXT,
                                        {**_VIT_L, "image_size": 224, "patch_size": 14}, projection_dim=768),
    "random:clip-vit-l-14-336": RandomShape("openai/clip-vit-large-patch14-336", "clip", _CLIP_L_TEXT,
                                            {**_VIT_L, "image_size": 336, "patch_size": 14}, projection_dim=768),
    "random:siglip-base-patch16-224": RandomShape(
        "google/siglip-base-patch16-224", "siglip",
        {**_VIT_B, "vocab_size": 32000, "max_position_embeddings": SIGLIP_CONTEXT},
        {**_VIT_B, "image_size": 224, "patch_size": 16}),
    "random:siglip-so400m-patch14-384": RandomShape(
        "google/siglip-so400m-patch14-384", "siglip",
        {**_SO400M, "vocab_size": 32000, "max_position_embeddings": SIGLIP_CONTEXT},
        {**_SO400M, "image_size": 384, "patch_size": 14}),
}


def is_random_model(name: str) -> bool:
    """`name` asks for random weights (`random:...`), known shape or not: an unknown one is refused by
    `random_shape`, never looked up on the hub."""
    return name.startswith("random:")


def random_shape(name: str) -> RandomShape:
    try:
        return RANDOM_SHAPES[name]
    except KeyError:
        raise ConfigError(f"model.name: {name!r} is not a random shape; known: {', '.join(RANDOM_SHAPES)}") from None
