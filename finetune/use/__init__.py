"""Using a trained run: loading it for generation, generate, chat and merge. Imports training, hub, data,
models, recipe and launch."""
