"""Sources and mixtures, text and chat rendering (the loss masks), the packed corpus, the prepared-data cache,
images and labels. May import the wings below it (models, recipe, launch) and errors."""
