"""cliptune: LoRA fine-tuning, retrieval evaluation and export for CLIP-family models."""

__version__ = "0.1.0"
