"""What ftctl prints in a log: a table row stays one line when stdout is a file or a pipe, and counts print as
whole numbers."""

from __future__ import annotations

import io

from launch.run import console as printing


def test_a_table_written_to_a_file_does_not_wrap(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(printing, "console", printing.make_console(file=out))
    long = {f"a_rather_long_metric_name_{i}": 0.5 + i / 100 for i in range(2)}
    printing.show_metrics("validation metrics of a run with a long title, as the evaluation prints it " * 2, long)
    lines = out.getvalue().splitlines()
    assert any(len(line) > 80 for line in lines), "wider than 80 columns"
    assert sum("validation metrics" in line for line in lines) == 1, "the title stays on one line"
    for name in long:
        assert sum(name in line for line in lines) == 1


def test_the_old_console_would_have_wrapped():
    """The check can fail: rich's own default for a file wraps at 80 columns."""
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, highlight=False).print("x " * 100)
    assert max(map(len, out.getvalue().splitlines())) <= 80


def test_counts_print_as_whole_numbers(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(printing, "console", printing.make_console(file=out))
    printing.show_metrics(
        "scores", {"accuracy": 0.75, "invalid": 40.0}, {"zero-shot": {"accuracy": 0.5, "invalid": 52.0}}
    )
    rows = {line.split()[1]: line for line in out.getvalue().splitlines() if line.startswith("│")}
    assert "40" in rows["invalid"].split() and "52" in rows["invalid"].split() and "-12" in rows["invalid"].split()
    assert "40.0000" not in rows["invalid"]
    assert "0.7500" in rows["accuracy"] and "+0.2500" in rows["accuracy"]
