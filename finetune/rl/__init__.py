"""What the RLHF tasks share: preference and prompt data, the policy, reward sources, our PPO trainer and its
maths. May import the wings below it (use, training, hub, data, models, recipe, launch) and errors."""
