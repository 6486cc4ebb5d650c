"""The recipe: its schema (strict, every problem at once), loading and overrides, and the task registry
the schema validates against. Imports launch only."""
