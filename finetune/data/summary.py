"""The data summary printed before training: what was read, used, skipped (and why), and how long it is."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    k = max(0, min(len(sorted_values) - 1, -(-int(q * len(sorted_values)) // 100) - 1))
    return sorted_values[k]


@dataclass
class DataSummary:
    source: str
    records_read: int
    records_used: int
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    total_tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    max_len: int | None = None
    p50: int = 0
    p90: int = 0
    p99: int = 0
    max: int = 0
    rows: int = 0  # rows of the final dataset (fewer than records_used when packed)
    packed: bool = False
    examples: list[str] = field(default_factory=list)  # the first few skipped records' errors
    content: str | None = None  # a hash of the data's content (not its path): a resume checks it is the same

    @property
    def records_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    def format(self) -> str:
        lines = [
            f"data: {self.source}",
            f"  records: {self.records_read} read, {self.records_used} used, {self.records_skipped} skipped",
        ]
        for reason, n in self.skipped.most_common():
            lines.append(f"    skipped {n}: {reason}")
        for e in self.examples:
            lines.append(f"    e.g. {e}")
        lines += [
            f"  tokens: {self.total_tokens:,} ({self.trained_tokens:,} trained, {self.trained_share:.1%})",
            f"  truncated: {self.truncated} records"
            + (f" (max_len {self.max_len})" if self.max_len is not None else ""),
            f"  length: p50 {self.p50}, p90 {self.p90}, p99 {self.p99}, max {self.max}",
        ]
        if self.packed:
            lines.append(f"  packed into {self.rows} rows"
                         + (f", {self.total_tokens / (self.rows * self.max_len):.1%} full"
                            if self.rows and self.max_len else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def summarize(source: str, lengths: list[int], trained: list[int], truncated: int, records_read: int,
              skipped: Counter, max_len: int | None = None) -> DataSummary:
    """A DataSummary from per-record lengths and trained-token counts of the records used."""
    s = sorted(lengths)
    return DataSummary(
        source=source, records_read=records_read, records_used=len(lengths), skipped=Counter(skipped),
        total_tokens=sum(lengths), trained_tokens=sum(trained), truncated=truncated, max_len=max_len,
        p50=percentile(s, 50), p90=percentile(s, 90), p99=percentile(s, 99), max=s[-1] if s else 0,
        rows=len(lengths),
    )
