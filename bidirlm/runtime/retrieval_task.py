"""`RetrievalTask`: queries, a corpus and relevance judgments.

Below both `embedded/` (which builds the embedded held-out task) and `evaluation/` (which loads
user tasks and scores models on them), so neither imports the other to share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RetrievalTask:
    """Queries, a corpus and binary relevance judgments (`qrels[query_id]` = relevant doc ids)."""

    name: str
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, set[str]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.queries or not self.corpus:
            raise ValueError(f"task {self.name!r}: queries and corpus must not be empty")
        for qid, docs in self.qrels.items():
            if qid not in self.queries:
                raise ValueError(f"task {self.name!r}: qrels name unknown query {qid!r}")
            unknown = [d for d in docs if d not in self.corpus]
            if unknown:
                raise ValueError(
                    f"task {self.name!r}: qrels of query {qid!r} name unknown document "
                    f"{unknown[0]!r}"
                )
        if not any(self.qrels.values()):
            raise ValueError(f"task {self.name!r}: no query has a relevant document")
