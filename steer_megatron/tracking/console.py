"""Console output: a rich progress bar for the run and a compact per-step summary table."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from steer_megatron.tracking import names


def make_progress(console: Console | None = None) -> Progress:
    """Steps done / total, elapsed and remaining time; use as a context manager."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


SUMMARY_KEYS = (names.ACCURACY, names.REWARD, names.ENTROPY, names.RESPONSE_LENGTH)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def step_summary(step: int, metrics: Mapping[str, Any], keys: Sequence[str] = SUMMARY_KEYS,
                 extra_prefixes: Sequence[str] = ("eval/", "time/")) -> Table:
    """A one-row-per-metric table of the headline metrics (those present) and any eval/time ones."""
    table = Table(title=f"step {step}", show_header=False, box=None, pad_edge=False)
    table.add_column("metric", style="cyan")
    table.add_column("value", justify="right")
    shown = [k for k in keys if k in metrics]
    shown += sorted(k for k in metrics if k not in shown and k.startswith(tuple(extra_prefixes)))
    for k in shown:
        table.add_row(k, _fmt(metrics[k]))
    return table


def print_step_summary(step: int, metrics: Mapping[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(step_summary(step, metrics))
