"""What the selftest's steps found, and the verdict per kernel that it ends with.

Each step returns a :class:`StepResult` (passed, failed or skipped, with the reason) and the
:class:`Evidence` it found about individual kernels: one JUnit test case of the lane, one
compute-sanitizer run, a failed build.  :func:`verdict` folds the evidence into one cell per
kernel and backend/device column: FAIL if anything failed, else PASS if anything passed, else
SKIPPED with the first reason given.  The kernels are the rows of the table; the reference
backend has no column because it is the oracle every cell is checked against.

JUnit XML is read with ``xml.etree`` (the format pytest's ``--junitxml`` writes); the lane's
tests name their cell with the properties ``kernel``, ``backend`` and ``device``.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

KERNELS = ("adamw_step/none", "adamw_step/dense", "adamw_step/bernoulli", "adamw_step/importance", "sparse_adamw_step",
           "fisher_accumulate", "radix_histogram")
KERNEL_BACKENDS = ("triton", "native")
DEVICES = ("cuda", "cpu")
COLUMNS = tuple(f"{backend} {device}" for device in DEVICES for backend in KERNEL_BACKENDS)
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
CELL_LABEL = {PASSED: "PASS", FAILED: "FAIL", SKIPPED: "SKIPPED"}


@dataclass
class Evidence:
    """One finding about one kernel in one column (``"native cuda"``...)."""

    kernel: str
    column: str
    status: str
    reason: str
    source: str


@dataclass
class StepResult:
    """The outcome of one step; ``log`` is relative to the output folder."""

    name: str
    status: str
    reason: str = ""
    log: Optional[str] = None
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    evidence: list = field(default_factory=list)

    def as_json(self) -> dict:
        data = asdict(self)
        data.pop("evidence")
        return data


@dataclass
class TestCase:
    """One ``<testcase>`` of a JUnit XML file."""

    name: str
    status: str
    message: str
    properties: dict


def read_junit(path: Path) -> list[TestCase]:
    """The test cases of a pytest ``--junitxml`` file; properties as name -> list of values."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = PASSED, ""
        for tag in ("failure", "error", "skipped"):
            outcome = case.find(tag)
            if outcome is not None:
                status = SKIPPED if tag == "skipped" else FAILED
                message = (outcome.get("message") or tag).strip().splitlines()[0]
                break
        properties: dict = {}
        for prop in case.iter("property"):
            properties.setdefault(prop.get("name"), []).append(prop.get("value"))
        cases.append(TestCase(name=case.get("name", ""), status=status, message=message, properties=properties))
    return cases


def count(cases: list[TestCase]) -> dict:
    """How many test cases passed, failed (errors included) and were skipped."""
    return {status: sum(c.status == status for c in cases) for status in (PASSED, FAILED, SKIPPED)}


def case_evidence(cases: list[TestCase], source: str) -> list[Evidence]:
    """Evidence from the test cases that name their cell (kernel, backend, device)."""
    found = []
    for case in cases:
        props = case.properties
        if not all(key in props for key in ("kernel", "backend", "device")):
            continue
        column = f"{props['backend'][0]} {props['device'][0]}"
        reason = {PASSED: case.name, SKIPPED: case.message}.get(case.status, f"{case.name}: {case.message}")
        found.extend(Evidence(kernel, column, case.status, reason, source) for kernel in props["kernel"])
    return found


@dataclass
class Cell:
    status: str
    reason: str


def verdict(evidence: list[Evidence], default_reasons: dict) -> dict:
    """kernel -> column -> :class:`Cell`.  A cell without evidence is skipped with the reason
    ``default_reasons`` gives its column (why nothing checked it)."""
    table = {}
    for kernel in KERNELS:
        row = {}
        for column in COLUMNS:
            found = [e for e in evidence if e.kernel == kernel and e.column == column]
            failed = [e for e in found if e.status == FAILED]
            passed = [e for e in found if e.status == PASSED]
            skipped = [e for e in found if e.status == SKIPPED]
            if failed:
                more = f" (and {len(failed) - 1} more failures)" if len(failed) > 1 else ""
                row[column] = Cell(FAILED, f"{failed[0].source}: {failed[0].reason}{more}")
            elif passed:
                row[column] = Cell(PASSED, f"{len(passed)} passed: " + ", ".join(sorted({e.source for e in passed})))
            elif skipped:
                row[column] = Cell(SKIPPED, skipped[0].reason)
            else:
                row[column] = Cell(SKIPPED, default_reasons.get(column, "no check ran"))
        table[kernel] = row
    return table


def _numbered_reasons(table: dict) -> tuple[dict, list[str]]:
    """Short labels for the cells (``SKIPPED [1]``) and the numbered reasons they point to."""
    reasons: list[str] = []
    labels = {}
    for kernel, row in table.items():
        for column, cell in row.items():
            label = CELL_LABEL[cell.status]
            if cell.status != PASSED:
                if cell.reason not in reasons:
                    reasons.append(cell.reason)
                label += f" [{reasons.index(cell.reason) + 1}]"
            labels[kernel, column] = label
    return labels, [f"[{i}] {reason}" for i, reason in enumerate(reasons, start=1)]


def render_text(table: dict, width: int = 100) -> str:
    """The verdict as a fixed-width table, its reasons numbered below it (each cut to ``width``)."""
    labels, reasons = _numbered_reasons(table)
    first = max(len(k) for k in KERNELS) + 2
    lines = ["kernel".ljust(first) + "".join(c.ljust(14) for c in COLUMNS)]
    lines += [kernel.ljust(first) + "".join(labels[kernel, c].ljust(14) for c in COLUMNS) for kernel in table]
    lines += [r if len(r) <= width else r[:width - 3] + "..." for r in reasons]
    return "\n".join(line.rstrip() for line in lines)


def render_markdown(table: dict) -> str:
    """The verdict as a markdown table, reasons in full below it."""
    labels, reasons = _numbered_reasons(table)
    lines = ["| kernel | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| `{kernel}` | " + " | ".join(labels[kernel, c] for c in COLUMNS) + " |" for kernel in table]
    return "\n".join(lines + [""] + [f"- {r}" for r in reasons])


def table_json(table: dict) -> dict:
    return {kernel: {column: asdict(cell) for column, cell in row.items()} for kernel, row in table.items()}
