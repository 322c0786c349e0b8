"""Table-3 metrics: confusion matrices, accuracy, sensitivity, specificity, PPV and NPV.

The definitions are the paper's (Chen et al., Sci Rep 2020, Table 3), computed per image (slice) and
per patient (case), each with a 95% Wilson score interval:

=============  ==========================  =====================
metric         formula                     Wilson interval on
=============  ==========================  =====================
accuracy       (TP + TN) / (TP+FP+TN+FN)   TP + TN of all
sensitivity    TP / (TP + FN)              TP of the positives
specificity    TN / (TN + FP)              TN of the negatives
PPV            TP / (TP + FP)              TP of the called positives
NPV            TN / (TN + FN)              TN of the called negatives
=============  ==========================  =====================

A metric whose denominator is zero has ``value`` None (never 0 or 1 by convention).

An ``indeterminate`` verdict is neither positive nor negative; :meth:`Confusion.from_verdicts` counts
it as positive by default (a screening tool refers it to a reader), and always reports how many
there were.

>>> c = Confusion(tp=11, fn=0, tn=29, fp=2)       # the paper's per-patient row
>>> [m.percent() for m in c.metrics().values()]
['95.24', '100.00', '93.55', '84.62', '100.00']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

__all__ = [
    "METRICS",
    "Confusion",
    "CurvePoint",
    "Estimate",
    "IndeterminateAs",
    "auc",
    "called_positive",
    "false_positives_by_class",
    "sweep",
    "table3",
    "wilson",
]

METRICS: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "ppv", "npv")
"""Metric names in the order of the paper's Table 3."""

IndeterminateAs = Literal["positive", "negative", "exclude"]
"""How an indeterminate verdict counts: as positive (referred to a reader), as negative, or not at all."""


def called_positive(verdict: str, indeterminate: IndeterminateAs = "positive") -> bool | None:
    """Whether a case verdict counts as called positive, an indeterminate one counting as ``indeterminate`` says;
    None when it is not counted (``exclude``). The one reading of a verdict the per-patient figures, the
    false-positive table and each case's ``correct`` share.

    >>> [called_positive(v) for v in ("positive", "negative", "indeterminate")]
    [True, False, True]
    >>> called_positive("indeterminate", "negative"), called_positive("indeterminate", "exclude")
    (False, None)
    """
    if indeterminate not in ("positive", "negative", "exclude"):
        raise ValueError(f'Argument "indeterminate" must be positive, negative or exclude, got {indeterminate!r}.')
    if verdict not in ("positive", "negative", "indeterminate"):
        raise ValueError(f'Argument "verdicts" holds an unknown verdict {verdict!r}.')
    if verdict == "indeterminate":
        return None if indeterminate == "exclude" else indeterminate == "positive"
    return verdict == "positive"


def wilson(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Parameters
    ----------
    successes : int
        Number of successes, ``0 <= successes <= total``.
    total : int
        Number of trials, ``> 0``.
    confidence : float
        Two-sided confidence level in (0, 1).

    Returns
    -------
    (low, high) : tuple of float
        The interval bounds, within [0, 1].

    >>> [round(v, 4) for v in wilson(11, 11)]
    [0.7412, 1.0]
    >>> [round(v, 4) for v in wilson(0, 10)]
    [0.0, 0.2775]
    """
    if total <= 0:
        raise ValueError(f'Argument "total" must be > 0, got {total}.')
    if not 0 <= successes <= total:
        raise ValueError(f'Argument "successes" must lie in [0, total={total}], got {successes}.')
    if not 0.0 < confidence < 1.0:
        raise ValueError(f'Argument "confidence" must lie in (0, 1), got {confidence}.')
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    # Exact ends: the interval of 0/n starts at 0 and that of n/n ends at 1.
    if successes == 0:
        low = 0.0
    if successes == total:
        high = 1.0
    return low, high


@dataclass(frozen=True)
class Estimate:
    """A proportion with its Wilson interval; ``value`` is None when ``total`` is 0."""

    successes: int
    total: int
    value: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, successes: int, total: int, confidence: float = 0.95) -> Estimate:
        """The estimate ``successes / total`` with its interval (all None when ``total`` is 0)."""
        if total == 0:
            return cls(successes, total, None, None, None)
        low, high = wilson(successes, total, confidence)
        return cls(successes, total, successes / total, low, high)

    def percent(self, decimals: int = 2) -> str:
        """The value in percent with ``decimals`` decimals, as the paper prints it ("n/a" if none)."""
        if self.value is None:
            return "n/a"
        return f"{100.0 * self.value:.{decimals}f}"

    def interval(self, decimals: int = 1) -> str:
        """The interval in percent, e.g. ``"74.1-100.0"`` ("n/a" if none)."""
        if self.low is None or self.high is None:
            return "n/a"
        return f"{100.0 * self.low:.{decimals}f}-{100.0 * self.high:.{decimals}f}"

    def as_dict(self) -> dict[str, float | int | None]:
        """Plain dict for JSON reports."""
        return {"value": self.value, "low": self.low, "high": self.high,
                "successes": self.successes, "total": self.total}


@dataclass(frozen=True)
class Confusion:
    """A 2 x 2 confusion matrix, plus the indeterminate cases that were folded into it."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    indeterminate: int = 0

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "tn", "fn", "indeterminate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f'Argument "{name}" must be an int >= 0, got {value!r}.')

    @classmethod
    def from_labels(cls, truth: Iterable[bool], predicted: Iterable[bool]) -> Confusion:
        """Count ``(truth, predicted)`` pairs of booleans (1 = positive)."""
        tp = fp = tn = fn = 0
        truth, predicted = list(truth), list(predicted)
        if len(truth) != len(predicted):
            raise ValueError(
                f'Arguments "truth" and "predicted" must have the same length, got {len(truth)} and {len(predicted)}.'
            )
        for t, p in zip(truth, predicted, strict=True):
            if t and p:
                tp += 1
            elif t:
                fn += 1
            elif p:
                fp += 1
            else:
                tn += 1
        return cls(tp=tp, fp=fp, tn=tn, fn=fn)

    @classmethod
    def from_verdicts(
        cls,
        truth: Iterable[bool],
        verdicts: Iterable[str],
        indeterminate: IndeterminateAs = "positive",
    ) -> Confusion:
        """Count case verdicts (``positive``/``negative``/``indeterminate``) against truth.

        ``indeterminate`` says how an indeterminate verdict counts: as positive (default: referred to a
        reader), as negative, or not at all; the number of them is kept in ``.indeterminate``.
        """
        if indeterminate not in ("positive", "negative", "exclude"):
            raise ValueError(f'Argument "indeterminate" must be positive, negative or exclude, got {indeterminate!r}.')
        pairs, n_ind = [], 0
        truth, verdicts = list(truth), list(verdicts)
        if len(truth) != len(verdicts):
            raise ValueError(
                f'Arguments "truth" and "verdicts" must have the same length, got {len(truth)} and {len(verdicts)}.'
            )
        for t, v in zip(truth, verdicts, strict=True):
            called = called_positive(v, indeterminate)
            n_ind += v == "indeterminate"
            if called is not None:
                pairs.append((bool(t), called))
        c = cls.from_labels([t for t, _ in pairs], [p for _, p in pairs])
        return cls(tp=c.tp, fp=c.fp, tn=c.tn, fn=c.fn, indeterminate=n_ind)

    def __add__(self, other: Confusion) -> Confusion:
        if not isinstance(other, Confusion):
            return NotImplemented
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn,
                         self.indeterminate + other.indeterminate)

    @property
    def n(self) -> int:
        """Cases counted in the matrix."""
        return self.tp + self.fp + self.tn + self.fn

    def accuracy(self, confidence: float = 0.95) -> Estimate:
        """(TP + TN) / all."""
        return Estimate.of(self.tp + self.tn, self.n, confidence)

    def sensitivity(self, confidence: float = 0.95) -> Estimate:
        """TP / (TP + FN), the true-positive rate (recall)."""
        return Estimate.of(self.tp, self.tp + self.fn, confidence)

    def specificity(self, confidence: float = 0.95) -> Estimate:
        """TN / (TN + FP), the true-negative rate."""
        return Estimate.of(self.tn, self.tn + self.fp, confidence)

    def ppv(self, confidence: float = 0.95) -> Estimate:
        """TP / (TP + FP), the positive predictive value (precision)."""
        return Estimate.of(self.tp, self.tp + self.fp, confidence)

    def npv(self, confidence: float = 0.95) -> Estimate:
        """TN / (TN + FN), the negative predictive value."""
        return Estimate.of(self.tn, self.tn + self.fn, confidence)

    def metrics(self, confidence: float = 0.95) -> dict[str, Estimate]:
        """All five metrics in Table-3 order (see :data:`METRICS`)."""
        return {name: getattr(self, name)(confidence) for name in METRICS}

    def as_dict(self, confidence: float = 0.95) -> dict[str, object]:
        """Counts and metrics as plain data for JSON reports."""
        return {
            "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
            "indeterminate": self.indeterminate, "n": self.n, "confidence": confidence,
            "metrics": {k: v.as_dict() for k, v in self.metrics(confidence).items()},
        }


@dataclass(frozen=True)
class CurvePoint:
    """The confusion matrix at one cutoff."""

    cutoff: float
    confusion: Confusion

    @property
    def tpr(self) -> float | None:
        """Sensitivity, None without positives."""
        return self.confusion.sensitivity().value

    @property
    def fpr(self) -> float | None:
        """1 - specificity, None without negatives."""
        spec = self.confusion.specificity().value
        return None if spec is None else 1.0 - spec


def sweep(cutoffs: Iterable[float], confusion_at: Callable[[float], Confusion]) -> list[CurvePoint]:
    """Evaluate ``confusion_at`` over ``cutoffs`` (sorted ascending) into a curve."""
    points = [CurvePoint(float(c), confusion_at(float(c))) for c in sorted(set(cutoffs))]
    if not points:
        raise ValueError('Argument "cutoffs" must not be empty.')
    return points


def auc(points: Sequence[CurvePoint]) -> float | None:
    """Area under the ROC curve through ``points`` and the corners (0, 0) and (1, 1), trapezoids.

    None when a point has no positives or no negatives. With few cutoffs this is a lower-resolution
    estimate of the area, not the rank statistic.

    >>> pts = [CurvePoint(0.5, Confusion(tp=8, fn=2, tn=9, fp=1))]
    >>> round(auc(pts), 3)
    0.85
    """
    xy = [(p.fpr, p.tpr) for p in points if p.fpr is not None and p.tpr is not None]
    if len(xy) < len(points):
        return None
    xy = sorted([(0.0, 0.0), *xy, (1.0, 1.0)])
    return float(sum((x1 - x0) * (y0 + y1) / 2.0 for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False)))


def false_positives_by_class(
    cases: Iterable[tuple[str, bool, str]],
    indeterminate: IndeterminateAs = "positive",
) -> dict[str, dict[str, int | float | None]]:
    """False positives among the truly negative cases, per class (e.g. phantom kind).

    Parameters
    ----------
    cases : iterable of (class, truth, verdict)
        One entry per case; ``truth`` True for a positive case (not counted here).
    indeterminate : {"positive", "negative", "exclude"}
        How an indeterminate verdict counts (``exclude``: in neither ``n`` nor ``fp``, as the per-patient
        figures leave it out; still counted in ``indeterminate``).

    Returns
    -------
    dict
        ``{class: {"n": negatives, "fp": false positives, "indeterminate": k, "rate": fp / n,
        "low": ..., "high": ...}}`` sorted by class name.
    """
    table: dict[str, list[int]] = {}
    for cls, truth, verdict in cases:
        if truth:
            continue
        row = table.setdefault(cls, [0, 0, 0])
        row[2] += verdict == "indeterminate"
        called = called_positive(verdict, indeterminate)
        if called is not None:
            row[0] += 1
            row[1] += called
    out: dict[str, dict[str, int | float | None]] = {}
    for cls in sorted(table):
        n, fp, ind = table[cls]
        est = Estimate.of(fp, n)
        out[cls] = {"n": n, "fp": fp, "indeterminate": ind, "rate": est.value, "low": est.low, "high": est.high}
    return out


def table3(rows: Mapping[str, Confusion], decimals: int = 2) -> list[dict[str, str]]:
    """Rows laid out like the paper's Table 3: one per level, metric values in percent with CIs."""
    out = []
    for level, c in rows.items():
        row = {"level": level, "TP": str(c.tp), "FN": str(c.fn), "TN": str(c.tn), "FP": str(c.fp)}
        for name, est in c.metrics().items():
            row[name] = est.percent(decimals)
            row[f"{name}_ci"] = est.interval(1)
        out.append(row)
    return out
