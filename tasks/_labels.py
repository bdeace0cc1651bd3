"""Class labels of a table: reading them, learning the label set from the training data, checking other splits
against it, and a label-stratified validation hold-out. Shared by the classification tasks that read a text (or a
pair) and a label column: `classification` (a head) and `classification_t2t` (the label word generated).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import datasets

from ftctl.errors import FtctlError, warn

_INT = re.compile(r"[+-]?\d+")


def label_of(value: Any, where: str, column: str, row: int) -> int | str:
    """One label as an int or a string; numbers that are not whole are refused (that is regression data)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        value = value.strip()
        if _INT.fullmatch(value):
            return int(value)
        try:
            value = float(value) if value else value
        except ValueError:
            return value
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        raise FtctlError(f"{where}: row {row + 1} has no label in column '{column}'")
    if isinstance(value, float):
        if not value.is_integer():
            raise FtctlError(
                f"{where}: label column '{column}' holds non-integer numbers (e.g. {value}); classification needs "
                "class labels (for a similarity or regression score use --task stsb)"
            )
        return int(value)
    if isinstance(value, int):
        return value
    raise FtctlError(
        f"{where}: label column '{column}' must hold single values, got {type(value).__name__} in row {row + 1}"
    )


def labels_of(ds: datasets.Dataset, column: str, where: str) -> list[int | str]:
    values = [label_of(v, where, column, i) for i, v in enumerate(ds[column])]
    if any(isinstance(v, str) for v in values) and any(isinstance(v, int) for v in values):
        values = [str(v) for v in values]
    return values


def class_ids(state: Mapping[str, Any]) -> dict[Any, int]:
    """Label value -> class id, from a task state."""
    return {v: i for i, v in enumerate(state["label_values"])}


def check_columns(splits: Mapping[str, datasets.Dataset], text_columns: list[str], label_column: str | None) -> None:
    if not text_columns:
        raise FtctlError("no text column given: pass --text-column NAME (twice for sentence pairs)")
    if not label_column:
        raise FtctlError("no label column given: pass --label-column NAME")
    for split, ds in splits.items():
        for column in [*text_columns, label_column]:
            if column not in ds.column_names:
                flag = "--label-column" if column == label_column else "--text-column"
                header = (
                    "; its first line is read as the column names: add a header line"
                    if any(" " in name for name in ds.column_names)
                    else ""
                )
                raise FtctlError(
                    f"{split} data has no column '{column}'; columns found: {', '.join(ds.column_names)} "
                    f"(choose with {flag}{header})"
                )


def drop_hidden_test(splits: dict[str, datasets.Dataset], column: str | None) -> dict[str, datasets.Dataset]:
    """Without a GLUE-style test split whose labels are hidden (-1): there is nothing to score it against."""
    test = splits.get("test")
    if (
        test is not None
        and column in test.column_names
        and len(test)
        and all(isinstance(v, int) and v < 0 for v in test[column][:1000])
    ):
        del splits["test"]
    return splits


def stratified_split(
    train: datasets.Dataset, column: str, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded hold-out, stratified by label when every class has at least two examples (so small classes reach
    validation)."""
    # deferred: a heavy import (seconds), paid only by the runs that use it
    from sklearn.model_selection import train_test_split

    labels = labels_of(train, column, "train data")
    if len(train) < 2:
        raise FtctlError(f"the train data has {len(train)} example(s); need at least 2 to hold out validation data")
    stratify = labels if min(Counter(labels).values()) >= 2 else None
    n_val = max(1, round(len(train) * fraction))
    if stratify is not None:
        n_val = max(n_val, len(set(labels)))
    try:
        train_idx, val_idx = train_test_split(
            list(range(len(train))), test_size=n_val, random_state=seed, stratify=stratify
        )
    except ValueError as exc:
        raise FtctlError(f"cannot hold out validation data from {len(train)} examples: {exc}") from None
    return train.select(sorted(train_idx)), train.select(sorted(val_idx))


def learn_labels(train: datasets.Dataset, column: str, hint: list[str] | None, preset: str) -> dict[str, Any]:
    """The label set: a preset's (or the hub feature's) names where the data's labels fit them, else the sorted
    distinct labels of the training data."""
    values = labels_of(train, column, "train data")
    distinct = set(values)
    warn_near_duplicates(distinct, column)
    if len(distinct) < 2:
        raise FtctlError(
            f"label column '{column}' of the train data has a single class ({next(iter(distinct))!r}); "
            "classification needs at least two"
        )
    feature = train.features.get(column)
    hint = hint or getattr(feature, "names", None)
    if hint and all(isinstance(v, int) for v in distinct):
        outside = sorted(v for v in distinct if isinstance(v, int) and not 0 <= v < len(hint))
        if outside:
            raise FtctlError(
                f"train data has label(s) {', '.join(map(str, outside[:5]))} outside the {len(hint)} classes "
                f"of task '{preset}' (0..{len(hint) - 1}: {', '.join(hint)}); fix the labels, or use "
                "--task classification to take the classes from the data"
            )
        label_values: list[Any] = list(range(len(hint)))
        names = list(hint)
    elif hint and distinct <= set(hint):
        label_values, names = list(hint), list(hint)
    else:
        label_values = sorted(distinct)  # type: ignore[type-var]  # all int or all str (labels_of)
        names = [str(v) for v in label_values]
    return {"label_names": names, "label_values": label_values}


def warn_near_duplicates(labels: set[int | str], column: str) -> None:
    """Labels that differ only in case or spacing (`pos`, `Pos`) are legal, and almost always a data mistake."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        if isinstance(label, str):
            groups.setdefault(" ".join(label.lower().split()), []).append(label)
    near = [sorted(g) for g in groups.values() if len(g) > 1]
    if near:
        shown = "; ".join(" / ".join(repr(x) for x in g) for g in sorted(near)[:5])
        warn(
            f"label column '{column}' has labels that differ only in case or spacing ({shown}); they are different "
            "classes as given: normalise them in the data if they are the same class"
        )


def check_labels(splits: Mapping[str, datasets.Dataset], column: str, state: Mapping[str, Any]) -> None:
    known = set(state["label_values"])
    for split, ds in splits.items():
        unseen = sorted({str(v) for v in labels_of(ds, column, f"{split} data") if v not in known})
        if unseen:
            raise FtctlError(
                f"{split} data has label(s) {', '.join(unseen[:5])} that the model was not trained on; "
                f"known labels: {', '.join(map(str, state['label_values']))}"
            )


def check_texts(splits: Mapping[str, datasets.Dataset], text_columns: list[str]) -> None:
    for split, ds in splits.items():
        if len(ds) == 0:
            raise FtctlError(f"{split} data has no examples")
        for column in text_columns:
            for i, text in enumerate(ds[column]):
                if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
                    raise FtctlError(
                        f"{split} data: row {i + 1} has no text in column '{column}' (an empty cell); fill it or "
                        "remove the row"
                    )


def check_label_data(
    task_state: Mapping[str, Any],
    splits: Mapping[str, datasets.Dataset],
    training: bool,
    text_columns: list[str],
    label_column: str | None,
    hint: list[str] | None,
    preset: str,
) -> Mapping[str, Any]:
    """The classification tasks' `check_data`: columns, texts and labels checked; the label set learnt from the train
    split when training, else `task_state`'s."""
    check_columns(splits, text_columns, label_column)
    assert label_column is not None
    check_texts(splits, text_columns)
    state = learn_labels(splits["train"], label_column, hint, preset) if training else task_state
    check_labels(splits, label_column, state)
    if training:
        warn_overlaps(splits, text_columns, label_column)
    return state


def _texts(ds: datasets.Dataset, columns: list[str]) -> Any:
    """Each row's input (its text columns joined) as a pandas Series."""
    frame = ds.select_columns(columns).to_pandas()
    key = frame[columns[0]].astype(str)
    for column in columns[1:]:
        key = key + "\x1f" + frame[column].astype(str)
    return key


def warn_overlaps(splits: Mapping[str, datasets.Dataset], text_columns: list[str], label_column: str) -> None:
    """Legal, and almost always a mistake: evaluation inputs that are also training inputs (a leak: the scores
    overstate what the model learnt), and one training input given different labels."""
    train = _texts(splits["train"], text_columns)
    labels = splits["train"].select_columns([label_column]).to_pandas()[label_column].astype(str)
    conflicting = int((labels.groupby(train.values).nunique() > 1).sum())
    if conflicting:
        warn(
            f"{conflicting} training text(s) appear with different labels in column '{label_column}'; the model "
            "cannot learn both: fix or drop them"
        )
    seen = set(train)
    for name in ("validation", "test"):
        if name in splits and len(splits[name]):
            shared = int(_texts(splits[name], text_columns).isin(seen).sum())
            if shared:
                warn(
                    f"{shared} of {len(splits[name])} {name} example(s) have a text that is also in the train data "
                    f"(a leak: the {name} scores would overstate what the model learnt); remove them from one side"
                )
