"""The run lifecycle every caller uses (verbs, chain, demo, accelerate ranks), chained recipes and the run
listing. Imports tasks (through the registry) and every wing below."""
