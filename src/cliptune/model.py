"""One interface over every supported dual encoder: HF CLIP, HF SigLIP and cliptune's composed model.

`load_model` resolves `model.name` (hub id or folder) through the same `from_pretrained` call for
all of them, and returns the model with the preprocessing it was trained with. Everything
downstream (LoRA, losses, training, evaluation, export) only calls `ContrastiveModel`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from cliptune.config import ModelConfig

log = logging.getLogger(__name__)

# What CLIP and SigLIP were trained with, for folders that ship no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RANDOM_VIT_B_32 = "random:clip-vit-b-32"


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names it and why."""


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    tokenizer: transformers.PreTrainedTokenizerBase
    max_text_length: int
    pad_to_max_length: bool
    """SigLIP pools the last position of the sequence, so its captions must be padded to the
    length it was trained with; CLIP pools at the EOS token and can pad to the batch's longest."""

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            padding="max_length" if self.pad_to_max_length else "longest",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )


class ContrastiveModel(nn.Module):
    """A dual encoder: `encode_images`, `encode_texts`, and the temperature (and SigLIP's bias).

    `net` is the transformers model, or the `peft.PeftModel` wrapping it once LoRA is applied.
    """

    def __init__(self, net: nn.Module, family: str):
        super().__init__()
        self.net = net
        self.family = family

    @property
    def base(self) -> nn.Module:
        """The transformers model without PEFT's wrappers (which keep the LoRA layers inside it)."""
        net = self.net
        if hasattr(net, "get_base_model"):
            net = net.get_base_model()
        return net

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.base.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return getattr(self.base, "logit_bias", None)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.net.get_image_features(pixel_values=pixel_values))  # (B, D)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _features(self.net.get_text_features(input_ids=input_ids, attention_mask=attention_mask))  # (B, D)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (not normalised) image and caption features, (B, D) each. The temperature is read by
        the loss from `logit_scale` directly: it stays outside forward so DDP never waits on it."""
        return self.encode_images(pixel_values), self.encode_texts(input_ids, attention_mask)


def _features(output) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_model(cfg: ModelConfig) -> tuple[ContrastiveModel, Preprocessing]:
    """Load the model named by `cfg.name` (hub id or local folder) and its preprocessing."""
    if cfg.name == RANDOM_VIT_B_32:
        return _random_vit_b_32()
    name = cfg.name
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelLoadError(f"model.name: folder {name!r} does not exist")
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    import cliptune.dual_encoder  # noqa: F401  registers the composed model type with AutoConfig

    try:
        config = transformers.AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.name: cannot load a model config from {name!r}: {err}") from err
    family, model_class = _family(config, name)
    net = model_class.from_pretrained(name, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    return ContrastiveModel(net, family), _preprocessing(name, family, net.config, tokenizer, kwargs)


def _family(config, name: str) -> tuple[str, type]:
    if config.model_type == "clip":
        return "clip", transformers.CLIPModel
    if config.model_type == "siglip":
        return "siglip", transformers.SiglipModel
    from cliptune.dual_encoder import DualEncoderConfig, DualEncoderModel

    if config.model_type == DualEncoderConfig.model_type:
        return "dual", DualEncoderModel
    raise ModelLoadError(
        f"model.name: {name!r} is a {config.model_type!r} model; supported: clip, siglip, "
        f"{DualEncoderConfig.model_type} (compose one with `cliptune compose`)"
    )


def _preprocessing(name: str, family: str, config, tokenizer, kwargs: dict) -> Preprocessing:
    if family == "dual":
        size, mean, std = config.image_size, tuple(config.image_mean), tuple(config.image_std)
        max_length = min(tokenizer.model_max_length, config.max_text_length)
    else:
        size = config.vision_config.image_size
        mean, std = (SIGLIP_MEAN, SIGLIP_STD) if family == "siglip" else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(name, **kwargs)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError):
            log.warning("%s has no preprocessor_config.json: using %s's mean/std at %d px", name, family, size)
        max_length = config.text_config.max_position_embeddings
    return Preprocessing(
        image_size=int(size),
        image_mean=mean,
        image_std=std,
        tokenizer=tokenizer,
        max_text_length=int(max_length),
        pad_to_max_length=family == "siglip",
    )


def _random_vit_b_32() -> tuple[ContrastiveModel, Preprocessing]:
    """ViT-B/32's shapes with random weights: counting parameters and timing need no download."""
    from cliptune.dual_encoder import packaged_minilm_path

    # Any real subword tokenizer gives realistic caption lengths; the packaged MiniLM one installs offline.
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    text = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    net = transformers.CLIPModel(transformers.CLIPConfig(text_config=text))
    preprocessing = Preprocessing(224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tokenizer, 77, False)
    return ContrastiveModel(net, "clip"), preprocessing
