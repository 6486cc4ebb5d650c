"""One module per task, readable top to bottom: a runnable command, the recipe fields it uses, then
`run(recipe)` in numbered steps. May import the wings below it (rl, use, training, hub, data, models,
recipe, launch) and errors.

Each task is also one row of the registry (finetune/recipe/tasks.py), and provides `Task` below."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from finetune.recipe.schema import Recipe


@runtime_checkable
class Task(Protocol):
    """The functions every task module defines (checked by a test)."""

    def run(self, recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict: ...

    def check(self, recipe: Recipe) -> tuple: ...  # `finetune validate`: (problems, notes[, the data's row length])

    def load_trained(self, run_dir: Path, **kwargs: Any) -> Any: ...

    def next_steps(self, run_dir: Path, recipe: Recipe) -> list[str]: ...

    def usage(self, run_dir: Path, recipe: Recipe) -> str: ...


PROTOCOL = ("run", "check", "load_trained", "next_steps", "usage")
