"""The command line: the Typer app and its verbs, which turn flags into a recipe and hand it to the run
lifecycle; nothing heavy (torch, transformers) imported at start. May import the wings below it (run, tasks,
rl, use, training, hub, data, models, recipe, launch) and errors."""
