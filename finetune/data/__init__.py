"""Sources and mixtures, text and chat rendering (the loss masks), the packed corpus, the prepared-data
cache and images. Imports models, recipe and launch."""
