"""CLIP-family models behind one `ContrastiveModel` interface (HF CLIP, SigLIP, the composed dual
encoder with its EfficientNet-Lite0 port), and LoRA on them (PEFT, plus the CPU fast path)."""
