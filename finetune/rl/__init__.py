"""Preference and prompt data, reward sources, our PPO trainer and its maths: what the RLHF tasks share.
Imports training, hub, data, models, recipe and launch."""
