"""What a run publishes: the model card, plots of its curves, the push to the Hub. May import the wings below it
(data, models, recipe, launch) and errors."""
