"""Errors of the artifact store (docs/design.md §3, §5).

Every message is one line naming the problem, where, and what to fix. The CLI maps `ValueError`
subclasses (bad URL, bad name) to exit code 2 and every other `StoreError` to exit code 1.
"""

from __future__ import annotations


class StoreError(Exception):
    """A store operation failed at run time (permission denied, retries exhausted, ...)."""


class BadStoreURL(StoreError, ValueError):
    """The store URL is unusable: unknown scheme, malformed, or its bucket/root does not exist."""


class StoreNotFound(BadStoreURL):
    """A command that only reads (`Store.open(..., create=False)`) found no store at the URL: a mistyped `--store`
    must not become a new empty store."""


class StoreUnreachable(StoreError):
    """The store's endpoint did not answer (after retries). A runtime failure inside a run; when a command opens
    its store before doing anything, the CLI treats it as a bad `--store`/endpoint (exit 2)."""


class BadName(StoreError, ValueError):
    """A stage, run or output name is not a safe path component."""


class CorruptArtifact(StoreError):
    """A blob or manifest is missing or unreadable, or a blob's bytes do not hash to its digest.

    `subject` names the broken object ("blob <digest>" or a manifest path) and `context` says who
    referenced it (stage, key, output); the fix is to recompute that stage with `--repair`.
    """

    def __init__(self, subject: str, context: str, problem: str) -> None:
        self.subject = subject
        self.context = context
        self.problem = problem
        super().__init__(f"corrupt artifact: {subject} ({context}) {problem}; recompute the stage with --repair")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        """Rebuild from the three parts: a stage's error crosses from its Ray worker to the driver."""
        return type(self), (self.subject, self.context, self.problem)
