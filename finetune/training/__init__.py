"""What every task shares around Trainer: the session (arguments, metrics, summary), callbacks, guards,
checkpoints, the log, the console, the run directory, precision and the batch fitted to memory. May import the
wings below it (hub, data, models, recipe, launch) and errors."""
