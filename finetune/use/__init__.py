"""A trained run in use: loaded for generation (a LoRA adapter folded in), generate, chat and merge. May import
the wings below it (training, hub, data, models, recipe, launch) and errors."""
