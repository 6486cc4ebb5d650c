"""The command line: the Typer app and its verbs, which turn flags into a recipe and hand it to the run
lifecycle. Imports every wing below it; nothing heavy (torch, transformers) at module level."""
