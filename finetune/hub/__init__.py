"""What a run publishes: the model card, plots of its curves, the push to the Hub. Imports data, models,
recipe and launch."""
