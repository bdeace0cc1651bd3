"""The report reads prediction rows through the task's declared RowView, never by guessing field names: a task with
its own names gets fixed/broken examples, and a task that declares no `correct` field gets none."""

from __future__ import annotations

from launch.studies import analysis
from tasks import TASKS
from tasks.base import RowView


def rows(correct: list[bool]) -> list[dict]:
    return [{"index": i, "sentence": f"example {i}", "gold": "yes", "prediction": "?", "ok": c}
            for i, c in enumerate(correct)]  # fmt: skip


def test_a_task_with_its_own_field_names_gets_its_flips():
    view = RowView("ok", ("sentence",), "gold")
    flips = analysis._flips(rows([False, True, True]), rows([True, True, False]), view)
    assert flips is not None
    assert flips["fixed"] == 1 and flips["broken"] == 1 and flips["examples"] == 3
    assert flips["fixed_shown"][0] == {"index": 0, "input": "example 0", "gold": "yes", "prediction": "?",
                                       "before": "?"}  # fmt: skip


def test_without_a_declared_field_there_are_no_guessed_flips():
    """The rows hold `ok`, and also a `correct` the old hard-coded reader would have used: the view decides."""
    before = [{**r, "correct": not r["ok"]} for r in rows([False, True])]
    after = [{**r, "correct": not r["ok"]} for r in rows([True, False])]
    assert analysis._flips(before, after, RowView(None, ("sentence",), "gold")) is None
    assert analysis._flips(before, after, RowView("ok", ("sentence",), "gold"))["fixed"] == 1


def test_a_score_of_one_is_right():
    view = RowView("exact_match")
    assert (view.is_correct({"exact_match": 1.0}), view.is_correct({"exact_match": 0.0})) == (True, False)
    assert view.is_correct({}) is None


def test_every_task_that_can_be_right_or_wrong_declares_how():
    declared = {spec.cls.name: spec.cls.row_view for _, spec in TASKS.items()}
    for name in ("classification", "token-classification", "extractive-qa", "text-to-text-classification"):
        assert declared[name].correct, name
    for view in declared.values():
        assert view.inputs and view.gold
