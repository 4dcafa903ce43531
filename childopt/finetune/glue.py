"""GLUE tasks in the original release layout: readers, label maps, metrics and a tokenized dataset.

One table, :data:`TASKS`, says for each task where its text and label columns are, which labels
it has (or that it is a regression) and which metrics score it; one reader and one metric
function serve every task from it.  Files are read as GLUE ships them: tab-separated, no quoting
(sentences hold bare ``"``), an optional UTF-8 byte-order mark on the header (MRPC has one).
A row with the wrong number of columns, an unknown label or a bad score raises
:class:`GlueFormatError` naming the file and the line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch

Column = Union[str, int]  # a header name, or an index (negative from the end) in a headerless file


@dataclass(frozen=True)
class Task:
    """Where a task's columns are and how it is scored.

    ``texts`` and ``label`` are header names, or indices when ``width`` is set (a headerless file
    of exactly ``width`` columns).  ``labels`` are the class names in label-id order, or None for
    a regression on ``score_range``.  ``metrics[0]`` is the headline metric.
    """

    name: str
    texts: tuple[Column, ...]
    label: Column
    labels: Optional[tuple[str, ...]]
    metrics: tuple[str, ...]
    width: Optional[int] = None
    score_range: tuple[float, float] = (0.0, 5.0)

    @property
    def num_labels(self) -> int:
        """Output size of the classifier head: the number of classes, 1 for a regression."""
        return 1 if self.labels is None else len(self.labels)


TASKS = {task.name: task for task in (
    Task("CoLA", texts=(3,), label=1, labels=("0", "1"), metrics=("mcc",), width=4),
    Task("SST-2", texts=("sentence",), label="label", labels=("0", "1"), metrics=("accuracy",)),
    Task("MRPC", texts=("#1 String", "#2 String"), label="Quality", labels=("0", "1"), metrics=("accuracy", "f1")),
    Task("STS-B", texts=("sentence1", "sentence2"), label=-1, labels=None, metrics=("pearson", "spearman")),
    Task("RTE", texts=("sentence1", "sentence2"), label="label", labels=("entailment", "not_entailment"),
         metrics=("accuracy",)),
)}
SPLITS = ("train", "dev")


class GlueFormatError(ValueError):
    """A GLUE file that does not have the task's format; the message starts with ``file:line:``."""


class Example(NamedTuple):
    texts: tuple[str, ...]
    label: Union[int, float]


def task(name: str) -> Task:
    """The task called ``name``, case-insensitively (``rte``, ``sts-b``)."""
    by_lower = {key.lower(): value for key, value in TASKS.items()}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown GLUE task {name!r}; expected one of {', '.join(TASKS)}")
    return by_lower[name.lower()]


def split_path(data_dir: Union[str, Path], spec: Task, split: str) -> Path:
    """``<data_dir>/<TASK>/<split>.tsv``, the GLUE release layout."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(data_dir) / spec.name / f"{split}.tsv"


def _column_indices(spec: Task, header: Optional[list[str]], path: Path) -> tuple[list[int], int]:
    """Positions of the text columns and the label column, resolved against the header."""
    wanted = (*spec.texts, spec.label)
    if header is None:
        return [c % spec.width for c in spec.texts], spec.label % spec.width
    indices = []
    for column in wanted:
        if isinstance(column, int):
            indices.append(column % len(header))
        elif column in header:
            indices.append(header.index(column))
        else:
            raise GlueFormatError(f"{path}:1: {spec.name} header has no column {column!r} (columns: {header})")
    return indices[:-1], indices[-1]


def _parse_label(spec: Task, value: str, where: str) -> Union[int, float]:
    if spec.labels is not None:
        if value not in spec.labels:
            raise GlueFormatError(f"{where}: label {value!r} is not one of {spec.name}'s labels {spec.labels}")
        return spec.labels.index(value)
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    low, high = spec.score_range
    if not low <= score <= high:
        raise GlueFormatError(f"{where}: score {value!r} is not a number in [{low}, {high}]")
    return score


def read_split(data_dir: Union[str, Path], spec: Task, split: str) -> list[Example]:
    """The examples of ``<data_dir>/<TASK>/<split>.tsv``; empty lines are skipped."""
    path = split_path(data_dir, spec, split)
    try:
        return _read_examples(path, spec)
    except UnicodeDecodeError as exc:
        raise GlueFormatError(f"{path}: not UTF-8 text ({exc})") from exc


def _read_examples(path: Path, spec: Task) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8-sig", newline="") as lines:
        header = None if spec.width is not None else lines.readline().rstrip("\r\n").split("\t")
        width = spec.width or len(header)
        text_at, label_at = _column_indices(spec, header, path)
        for lineno, line in enumerate(lines, start=1 if header is None else 2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            cells = line.split("\t")
            where = f"{path}:{lineno}"
            if len(cells) != width:
                raise GlueFormatError(f"{where}: expected {width} tab-separated columns for {spec.name}, "
                                      f"got {len(cells)}")
            examples.append(Example(tuple(cells[i] for i in text_at), _parse_label(spec, cells[label_at], where)))
    if not examples:
        raise GlueFormatError(f"{path}: no examples")
    return examples


# ----------------------------------------------------------------------------------- metrics
def _confusion(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, int]:
    """(tp, tn, fp, fn) of binary predictions, class 1 positive."""
    predictions, labels = predictions.bool(), labels.bool()
    return (int((predictions & labels).sum()), int((~predictions & ~labels).sum()),
            int((predictions & ~labels).sum()), int((~predictions & labels).sum()))


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions == labels).double().mean())


def f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 of class 1; 0 when it is neither predicted nor present (as scikit-learn)."""
    tp, _, fp, fn = _confusion(predictions, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mcc(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Matthews correlation of binary predictions; 0 when a marginal is empty (as scikit-learn)."""
    tp, tn, fp, fn = _confusion(predictions, labels)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Pearson correlation in float64; NaN when either side is constant."""
    x = predictions.double() - predictions.double().mean()
    y = labels.double() - labels.double().mean()
    return float((x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum()))


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank."""
    values = values.double()
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()  # rank of the last member of each group of equal values
    return (last - (counts.double() - 1) / 2)[inverse]


def spearman(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Spearman correlation: Pearson of the tie-averaged ranks."""
    return pearson(_ranks(predictions), _ranks(labels))


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def predictions_from_logits(spec: Task, logits: torch.Tensor) -> torch.Tensor:
    """Class ids (argmax) for a classification, the single output for a regression."""
    return logits.squeeze(-1) if spec.labels is None else logits.argmax(-1)


def score(spec: Task, predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    """The task's metrics, by name, of ``predictions`` (as from :func:`predictions_from_logits`)."""
    return {name: METRICS[name](predictions.cpu(), labels.cpu()) for name in spec.metrics}


# ----------------------------------------------------------------------------------- dataset
class GlueDataset(torch.utils.data.Dataset):
    """The examples of one split, tokenized once (truncated to ``max_length``, not padded).

    Items are dicts of lists plus ``labels``, ready for ``transformers.DataCollatorWithPadding``,
    which pads each batch to its own longest row (dynamic padding).
    """

    def __init__(self, examples: list[Example], spec: Task, tokenizer, max_length: int):
        columns = list(zip(*(e.texts for e in examples)))
        self.features = tokenizer(*columns, truncation=True, max_length=max_length)
        self.labels = [e.label for e in examples]
        self.spec = spec

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {key: values[index] for key, values in self.features.items()}
        item["labels"] = self.labels[index]
        return item
