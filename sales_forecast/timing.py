"""Progress lines and a per-phase timing summary for long-running steps."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, highlight=False)


@dataclass
class PhaseTimer:
    title: str
    phases: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        console.print(f"[bold cyan]>[/] {name} ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = time.perf_counter() - start
        console.print(f"  [green]done[/] {name} in {self.phases[name]:.2f} s" +
                      (f" ({self.notes[name]})" if name in self.notes else ""))

    def note(self, name: str, text: str) -> None:
        self.notes[name] = text

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    def summary(self) -> Table:
        table = Table(title=self.title)
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        table.add_column("notes")
        for name, seconds in self.phases.items():
            table.add_row(name, f"{seconds:.2f}", self.notes.get(name, ""))
        table.add_row("[bold]total[/]", f"[bold]{self.total:.2f}[/]", "")
        return table

    def print_summary(self) -> None:
        console.print(self.summary())
