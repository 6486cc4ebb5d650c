"""Pretrained models, tokenizers and configs (Hub, local, GGUF), LoRA adapters, quantization and the
memory estimate. Imports recipe and launch."""
