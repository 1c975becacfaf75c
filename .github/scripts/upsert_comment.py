#!/usr/bin/env python3
"""Keeps ONE report comment per pull request, updated in place, found by a hidden marker.

    usage: upsert_comment.py --repo OWNER/NAME --pr NUMBER --body-file report.md [--author LOGIN]

The comment is found by the HTML comment MARKER it starts with (invisible on GitHub), written by
the workflow's own account (``github-actions[bot]`` unless --author says otherwise), never as
"the last comment": that may be someone else's, or a human's edit target. The first match is
updated (``PATCH``); with none, a comment is created (``POST``). Every call goes through ``gh api``
(the GitHub CLI, authenticated by ``GH_TOKEN``), so tests replace :func:`gh` with recorded JSON
and post nothing. Standard library only: the workflow runs it before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

MARKER = "<!-- transferlab-gate-report -->"
DEFAULT_AUTHOR = "github-actions[bot]"

Gh = Callable[[Sequence[str], str | None], str]  # (gh api arguments, stdin) -> stdout


def gh(arguments: Sequence[str], stdin: str | None = None) -> str:
    """Runs ``gh api ARGUMENTS``; raises ``RuntimeError`` with gh's message when it fails."""
    result = subprocess.run(["gh", "api", *arguments], input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"gh api {' '.join(arguments)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def parse_pages(output: str) -> list[dict]:
    """The comments of ``gh api --paginate`` output: one JSON array per page, printed back to back."""
    decoder, comments, position = json.JSONDecoder(), [], 0
    while position < len(output):
        if output[position].isspace():
            position += 1
            continue
        page, position = decoder.raw_decode(output, position)
        comments.extend(page if isinstance(page, list) else [page])
    return comments


def find_comment(comments: Sequence[dict], *, author: str, marker: str = MARKER) -> dict | None:
    """The oldest comment by ``author`` whose body starts with ``marker`` (None when there is none).

    The marker must open the body: a human who quotes the report in a reply has it further down
    (``> `` before it), and a comment by anyone else is never taken over.
    """
    for comment in sorted(comments, key=lambda comment: (comment.get("created_at") or "", comment.get("id") or 0)):
        login = (comment.get("user") or {}).get("login")
        if login == author and (comment.get("body") or "").lstrip().startswith(marker):
            return comment
    return None


def with_marker(body: str, marker: str = MARKER) -> str:
    """The body, opened by the marker (added once)."""
    return body if body.lstrip().startswith(marker) else f"{marker}\n{body}"


def upsert(*, repo: str, pr: int, body: str, author: str = DEFAULT_AUTHOR, call: Gh = gh) -> tuple[str, int]:
    """Updates this workflow's report comment on the pull request, or creates it.

    Returns:
        ("updated" or "created", the comment id).
    """
    comments = parse_pages(call(["--paginate", f"repos/{repo}/issues/{pr}/comments"], None))
    payload = json.dumps({"body": with_marker(body)})
    found = find_comment(comments, author=author)
    if found is not None:
        answer = call(["--method", "PATCH", f"repos/{repo}/issues/comments/{found['id']}", "--input", "-"], payload)
        return "updated", int(json.loads(answer)["id"])
    answer = call(["--method", "POST", f"repos/{repo}/issues/{pr}/comments", "--input", "-"], payload)
    return "created", int(json.loads(answer)["id"])


def main(argv: Sequence[str] | None = None, call: Gh = gh) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="OWNER/NAME")
    parser.add_argument("--pr", required=True, type=int, help="pull request number")
    parser.add_argument("--body-file", required=True, type=Path, help="the Markdown report")
    parser.add_argument("--author", default=DEFAULT_AUTHOR, help=f"login whose comment is updated ({DEFAULT_AUTHOR})")
    args = parser.parse_args(argv)
    action, comment = upsert(
        repo=args.repo, pr=args.pr, body=args.body_file.read_text(encoding="utf-8"), author=args.author, call=call
    )
    print(f"{action} comment {comment} on {args.repo}#{args.pr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
