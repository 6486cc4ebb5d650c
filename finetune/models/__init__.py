"""Pretrained models, tokenizers and configs (Hub, local, GGUF), LoRA adapters, quantization and the memory
estimate. May import the wings below it (recipe, launch) and errors."""
