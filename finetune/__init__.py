"""finetune: fine-tune transformer models from one command line."""

__version__ = "0.1.0"
