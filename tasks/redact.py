"""Secrets never reach a message (docs/design.md §5.4): every URL in a text loses its userinfo (`user:pass@`) and its
query string (a presigned URL's signature and credential scope), keeping scheme, host, port and path — so an error can
name the endpoint it could not reach without showing what authenticated to it. Dependency-free: the CLI applies it to
every error line, also on the fast path of a config typo."""

from __future__ import annotations

import re

_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s\"'<>]*@)?(?P<rest>[^\s\"'<>?#]*)(?P<query>[?#][^\s\"'<>]*)?")


def _clean(match: re.Match[str]) -> str:
    userinfo = "***@" if match["userinfo"] else ""
    query = "?***" if match["query"] and len(match["query"]) > 1 else ""
    return f"{match['scheme']}{userinfo}{match['rest']}{query}"


def redact(text: str) -> str:
    """`text` with the userinfo and query of every URL in it replaced by `***`."""
    return _URL.sub(_clean, text)
