"""Processes and machines: accelerate presets and relaunching as N ranks, replicas, the environment, the memory a
machine offers and whether the Hub is reachable. May import errors only."""
