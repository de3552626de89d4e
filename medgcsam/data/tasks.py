"""Label maps by task name: how each source's labels become one task's classes.

Sources name classes differently (COVIDx ``COVID-19`` vs ``positive``, BUS ``normal`` scans that a
binary task drops), so merging goes through an explicit map instead of trusting label strings.
A map value of ``None`` drops the row with an ``exclude_reason`` rather than deleting it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd


@dataclass(frozen=True)
class Task:
    name: str
    classes: list[str]
    mapping: dict[str, str | None] = field(default_factory=dict)

    def map_label(self, label: str) -> str | None:
        """Task class for a source label (case-insensitive); KeyError when the map does not know it."""
        key = label.strip().lower()
        for raw, target in self.mapping.items():
            if raw.lower() == key:
                return target
        raise KeyError(label)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    unknown = {v for v in task.mapping.values() if v is not None} - set(task.classes)
    if unknown:
        raise ValueError(f"task {task.name!r} maps to {sorted(unknown)} which are not in its classes {task.classes}")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {sorted(_TASKS)}")
    return _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(_TASKS)


register_task(Task("bus_binary", ["benign", "malignant"],
                   {"benign": "benign", "malignant": "malignant", "normal": None}))
register_task(Task("bus_3class", ["benign", "malignant", "normal"],
                   {"benign": "benign", "malignant": "malignant", "normal": "normal"}))
# COVIDx binary files say positive/negative; 3-class files say COVID-19/pneumonia/normal, and
# COVID-Net's binary releases count pneumonia and normal as negative.
register_task(Task("covid_binary", ["negative", "positive"],
                   {"positive": "positive", "negative": "negative", "COVID-19": "positive",
                    "normal": "negative", "pneumonia": "negative"}))
register_task(Task("covid_3class", ["COVID-19", "normal", "pneumonia"],
                   {"COVID-19": "COVID-19", "normal": "normal", "pneumonia": "pneumonia",
                    "positive": None, "negative": None}))
register_task(Task("pneumonia_binary", ["normal", "pneumonia"],
                   {"normal": "normal", "pneumonia": "pneumonia"}))


def case_variants(labels: Iterable[str]) -> list[str]:
    """Labels that differ only in case ('Benign', 'benign'): without a task map they become separate classes."""
    distinct = set(labels)
    lower = [label.lower() for label in distinct]
    return sorted(label for label in distinct if lower.count(label.lower()) > 1)


def apply_task(df: pd.DataFrame, task: Task | str) -> pd.DataFrame:
    """Map ``label`` to the task's classes, keeping the original in ``source_label``.

    Unknown labels are an error naming the rows, because silently dropping them would change the
    class balance without anyone noticing.
    """
    task = get_task(task) if isinstance(task, str) else task
    df = df.copy()
    if "source_label" not in df.columns:
        df["source_label"] = df["label"]
    mapped, unknown = [], []
    for i, label in enumerate(df["source_label"]):
        try:
            mapped.append(task.map_label(label))
        except KeyError:
            mapped.append(None)
            unknown.append(i)
    if unknown:
        labels = sorted({df["source_label"].iloc[i] for i in unknown})
        lines = ", ".join(str(i + 2) for i in unknown[:10])
        raise ValueError(f"labels {labels} (line(s) {lines}) are not in task {task.name!r}'s map "
                         f"{sorted(task.mapping)}; fix the labels or register a task that maps them")
    drop = [m is None for m in mapped]
    df["label"] = [m if m is not None else src for m, src in zip(mapped, df["source_label"], strict=True)]
    reason = f"task {task.name}: label not used"
    df.loc[drop, "exclude_reason"] = df.loc[drop, "exclude_reason"].where(
        df.loc[drop, "exclude_reason"] != "", reason)
    return df
