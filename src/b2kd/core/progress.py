"""Rich progress bars that show queries used out of the budget."""

from __future__ import annotations

from typing import Self

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class QueryProgress:
    """``with QueryProgress("label", budget) as bar: bar.update(spent)``."""

    def __init__(self, label: str, budget: int | None, spent: int = 0):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("queries"),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task(label, total=budget, completed=spent)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, spent: int) -> None:
        self._progress.update(self._task, completed=spent)
