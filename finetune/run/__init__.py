"""The run lifecycle every caller uses (verbs, chain, demo, accelerate ranks), chained recipes and the run
listing; a task is run through the registry (`load_task`). May import the wings below it (tasks, rl, use,
training, hub, data, models, recipe, launch) and errors."""
