"""One interface over every supported dual encoder: HF CLIP, HF SigLIP and cliptune's composed model.

`load_model` resolves `model.name` (hub id or folder) through the same `from_pretrained` call for
all of them, and returns the model with the preprocessing it was trained with. Everything
downstream (LoRA, losses, training, evaluation, export) only calls `ContrastiveModel`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import transformers
from torch import nn

from cliptune.config import ModelConfig
from cliptune.data.images import SHORTEST_EDGE_CROP, SQUASH
from cliptune.data.preprocessing import Preprocessing
from cliptune.models.random_shapes import is_random_model, random_shape

log = logging.getLogger(__name__)

# What CLIP and SigLIP were trained with, for folders that ship no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RANDOM_VIT_B_32 = "random:clip-vit-b-32"


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names it and why."""


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


def load_model(cfg: ModelConfig, on_meta: bool = False) -> tuple[ContrastiveModel, Preprocessing]:
    """Load the model named by `cfg.name` (hub id, local folder or `random:` shape) and its preprocessing.

    `on_meta` builds a `random:` shape on PyTorch's meta device: every parameter has its shape but no
    memory and no values, enough to count and adapt it (so400m's 878 M parameters in a fraction of a
    second instead of half a minute and 3.5 GB). A hub id or folder always loads its weights.
    """
    if is_random_model(cfg.name):
        return _random_model(cfg.name, on_meta)
    if on_meta:
        raise ValueError(f"load_model(on_meta=True): only random: models build on the meta device, "
                         f"not {cfg.name!r}")
    name, kwargs, config = _model_config(cfg)
    family, model_class = _family(config, name)
    net = model_class.from_pretrained(name, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    return ContrastiveModel(net, family), _preprocessing(name, family, net.config, tokenizer, kwargs)


def load_preprocessing(cfg: ModelConfig) -> Preprocessing:
    """The preprocessing `load_model` would return, without building the model or reading its weights
    (what a loader needs: `cliptune bench --loader-only`)."""
    if is_random_model(cfg.name):
        return _random_model(cfg.name, on_meta=True)[1]  # shapes only: no memory, no values
    name, kwargs, config = _model_config(cfg)
    family, _ = _family(config, name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    return _preprocessing(name, family, config, tokenizer, kwargs)


def _model_config(cfg: ModelConfig) -> tuple[str, dict, transformers.PretrainedConfig]:
    name = cfg.name
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelLoadError(f"model.name: folder {name!r} does not exist")
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    import cliptune.models.dual_encoder  # noqa: F401  registers the composed model type with AutoConfig

    try:
        return name, kwargs, transformers.AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.name: cannot load a model config from {name!r}: {err}") from err


def _family(config, name: str) -> tuple[str, type]:
    if config.model_type == "clip":
        return "clip", transformers.CLIPModel
    if config.model_type == "siglip":
        return "siglip", transformers.SiglipModel
    from cliptune.models.dual_encoder import DualEncoderConfig, DualEncoderModel

    if config.model_type == DualEncoderConfig.model_type:
        return "dual", DualEncoderModel
    raise ModelLoadError(
        f"model.name: {name!r} is a {config.model_type!r} model; supported: clip, siglip, "
        f"{DualEncoderConfig.model_type} (`cliptune demo` composes one into OUT/base-model; or "
        f"cliptune.models.dual_encoder.compose_dual_encoder + save_composed)"
    )


def _preprocessing(name: str, family: str, config, tokenizer, kwargs: dict) -> Preprocessing:
    if family == "dual":
        # The composed model keeps its vision tower's size and mean/std in its config and resizes as CLIP does.
        image = {"image_size": int(config.image_size), "image_mean": tuple(config.image_mean),
                 "image_std": tuple(config.image_std)}
        max_length = min(tokenizer.model_max_length, config.max_text_length)
    else:
        size = int(config.vision_config.image_size)
        image = _default_image_settings(family, size)
        try:
            # The PIL processor: where torchvision is installed AutoImageProcessor would hand back
            # the torchvision one, whose resize differs slightly; the PIL one is the reference.
            processor = transformers.AutoImageProcessor.from_pretrained(name, backend="pil", **kwargs)
        except (OSError, ValueError):
            log.warning("%s has no preprocessor_config.json: using %s's defaults (%s to %d px)", name, family,
                        image["resize_mode"], size)
        else:
            image = image_settings_from_processor(processor, f"{name}: preprocessor_config.json")
            if image["image_size"] != size:
                log.warning("%s: the image processor makes %d px inputs but the model was built for %d px; "
                            "following the processor", name, image["image_size"], size)
        max_length = config.text_config.max_position_embeddings
    return Preprocessing(tokenizer=tokenizer, max_text_length=int(max_length), pad_to_max_length=family == "siglip",
                         **image)


def _default_image_settings(family: str, size: int) -> dict:
    """What CLIPImageProcessor / SiglipImageProcessor do by default, for folders without a processor config."""
    if family == "siglip":
        return {"image_size": size, "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD, "resize_mode": SQUASH,
                "resize_size": size}
    return {"image_size": size, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
            "resize_mode": SHORTEST_EDGE_CROP, "resize_size": size}


def image_settings_from_processor(processor, source: str) -> dict:
    """Preprocessing's image fields from a transformers image processor (its resize rule, crop,
    filter, rescale and mean/std); a processor whose output is not one square size is refused."""

    def fail(why: str) -> ModelLoadError:
        return ModelLoadError(f"{source}: {why}; cliptune feeds every image as one square size")

    if not getattr(processor, "do_resize", True):
        raise fail("do_resize is false (images would keep their own sizes)")
    size = dict(processor.size or {})
    if set(size) == {"shortest_edge"}:
        mode, resize_size = SHORTEST_EDGE_CROP, int(size["shortest_edge"])
    elif set(size) == {"height", "width"}:
        if size["height"] != size["width"]:
            raise fail(f"size {size['height']}x{size['width']} is not square")
        mode, resize_size = SQUASH, int(size["height"])
    else:
        raise fail(f"size {size} is neither {{shortest_edge}} nor {{height, width}}")
    image_size = resize_size
    if getattr(processor, "do_center_crop", False):
        crop = dict(processor.crop_size or {})
        if set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
            raise fail(f"crop_size {crop} is not a square")
        image_size = int(crop["height"])
    elif mode == SHORTEST_EDGE_CROP:
        raise fail("size is a shortest_edge without a centre crop (outputs keep their aspect ratio)")
    mean = _per_channel(processor.image_mean) if processor.do_normalize else (0.0, 0.0, 0.0)
    std = _per_channel(processor.image_std) if processor.do_normalize else (1.0, 1.0, 1.0)
    return {
        "image_size": image_size,
        "image_mean": mean,
        "image_std": std,
        "resize_mode": mode,
        "resize_size": resize_size,
        "resample": int(processor.resample if processor.resample is not None else 2),  # PIL backend's default: bilinear
        "rescale_factor": float(processor.rescale_factor) if processor.do_rescale else 1.0,
    }


def _per_channel(value) -> tuple[float, float, float]:
    # transformers' normalize takes one number for all channels as well as one per channel.
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ModelLoadError(f"image processor mean/std {value!r} does not have 3 channels")
    return tuple(float(v) for v in values)


def _random_model(name: str, on_meta: bool) -> tuple[ContrastiveModel, Preprocessing]:
    """A checkpoint's exact architecture with random weights (`models.random_shapes`), with its family's
    preprocessing at its size: counting parameters and timing need no download."""
    from cliptune.models.dual_encoder import packaged_minilm_path

    shape = random_shape(name)
    # The real CLIP and SigLIP tokenizers do not install offline; any real subword tokenizer gives
    # realistic caption lengths, and the packaged MiniLM one does. Its ids index the embedding table,
    # which keeps the checkpoint's own vocabulary size (so the parameter count is the checkpoint's).
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    if len(tokenizer) > shape.text["vocab_size"]:
        raise ModelLoadError(f"{name}: the offline tokenizer has {len(tokenizer)} tokens, more than the "
                             f"model's vocabulary of {shape.text['vocab_size']}")
    special = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    model_class = transformers.CLIPModel if shape.family == "clip" else transformers.SiglipModel
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        net = model_class(shape.transformers_config(special))
    preprocessing = Preprocessing(tokenizer=tokenizer, max_text_length=shape.text_context,
                                  pad_to_max_length=shape.family == "siglip",
                                  **_default_image_settings(shape.family, shape.image_size))
    return ContrastiveModel(net, shape.family), preprocessing
