"""Exceptions of the factory package (specs, plans, cases, validation): one base class and specific subclasses."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


class FactoryError(Exception):
    """Base class of every error raised by ``factory`` (and by the Prefect wiring in ``flows``)."""


@dataclass(frozen=True)
class SpecIssue:
    """One problem found in a dataset spec.

    Attributes:
        path: the YAML path, e.g. ``cohorts[1].pathology.size_mm``.
        message: ``"<who> expects <rule>, but got <name>=<value>. <hint>"``.
        source: the spec file (or ``<dict>`` when the spec was not read from a file).
        line: 1-based line of the YAML node, or None when unknown.
    """

    path: str
    message: str
    source: str = "<dict>"
    line: int | None = None

    def __str__(self) -> str:
        """``file:line: <yaml.path> expects <rule>, but got ...``: the subject is the spec's own path."""
        where = f"{self.source}:{self.line}" if self.line else self.source
        subject = self.path or "spec"
        message = _MODEL_SUBJECT.sub(subject, self.message, count=1)
        lead = message.split(" expects ", 1)[0].split(" on model ", 1)[0]
        if " expects " in message and (lead in (subject, "spec") or subject.startswith((lead + ".", lead + "["))):
            return f"{where}: {message}"  # the subject already says where
        return f"{where}: {self.path or '<root>'}: {message}"


# The spec models' class names (and ``Cohort.body_region``, ``Cohort[name]``) open validator messages; a
# person reads the YAML path instead, so printing puts the path in their place.
_MODEL_SUBJECT = re.compile(r"^(?:DatasetSpec|Cohort|Runtime|ModelRef|QCSettings|Tumor|Schedule|FolderMasks|"
                            r"UserMasks|GeneratorMasks|PhantomMasks)(?:\.[A-Za-z_]+|\[[^\]]*\])?(?= )")


class SpecError(FactoryError, ValueError):
    """Raised when a dataset spec is invalid; lists every issue found, one per line."""

    def __init__(self, issues: Sequence[SpecIssue] | str) -> None:
        if isinstance(issues, str):
            issues = [SpecIssue(path="", message=issues)]
        self.issues: tuple[SpecIssue, ...] = tuple(issues)
        n = len(self.issues)
        head = f"{n} problem{'s' if n != 1 else ''} in the dataset spec:" if n > 1 else ""
        lines = [head] if head else []
        lines += [str(i) for i in self.issues]
        super().__init__("\n".join(lines))


class ModelRefError(FactoryError, ValueError):
    """Raised when a spec's model reference cannot be resolved to a pipeline."""


class OutputPathError(FactoryError, ValueError):
    """Raised when an output path would leave the dataset output root."""


class ValidationInputError(FactoryError, ValueError):
    """Raised when a dataset or reference set cannot be validated (too few cases, no reference, no dataset row)."""


class CaseInputError(FactoryError, ValueError):
    """Raised by a case whose input (a mask file, a label map the model refuses) is unusable.

    The case is not recorded: fixing the input and running again generates it.
    """


class CasesCrashedError(FactoryError, RuntimeError):
    """Raised when cases ended without a record: crashed, or refused for an unusable input.

    Attributes:
        crashed: ``"<sample_id>: <Type>: <message>"`` per case.
        inputs: how many of them were input errors (:class:`CaseInputError`).
    """

    def __init__(self, crashed: Sequence[str], inputs: int = 0) -> None:
        self.crashed: tuple[str, ...] = tuple(crashed)
        self.inputs = int(inputs)
        first = self.crashed[0] if self.crashed else "-"
        if self.crashed and self.inputs == len(self.crashed):
            message = (f"generate_dataset expects usable inputs, but got {len(self.crashed)} case(s) with an unusable "
                       f"input, first {first}. They were not recorded; fix the input and run again.")
        else:
            message = (f"generate_dataset expects every case to end with a record, but got {len(self.crashed)} case(s) "
                       f"without one, first {first}. Committed cases are kept; fix the cause and run again to retry "
                       "the rest.")
        super().__init__(message)

    @property
    def only_inputs(self) -> bool:
        """True when every case without a record was refused for its input (exit 2, not a crash)."""
        return bool(self.crashed) and self.inputs == len(self.crashed)

    def __reduce__(self):  # keep the exception picklable across Prefect and Dask
        return (type(self), (self.crashed, self.inputs))
