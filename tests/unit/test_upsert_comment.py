"""The pull-request workflow keeps one report comment, found by its hidden marker: tested on recorded
``gh api`` JSON (tests/data/github, in the shape GitHub's REST API returns), posting nothing."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPOSITORY_ROOT

DATA = REPOSITORY_ROOT / "tests" / "data" / "github"
SCRIPT = REPOSITORY_ROOT / ".github" / "scripts" / "upsert_comment.py"


@pytest.fixture(scope="module")
def upsert_comment():
    spec = importlib.util.spec_from_file_location("upsert_comment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordedGh:
    """Answers `gh api` calls from recorded files and records each call; sends nothing anywhere."""

    def __init__(self, listing: str):
        self.listing = (DATA / listing).read_text()
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, arguments, stdin=None):
        self.calls.append((list(arguments), stdin))
        if "--method" not in arguments:
            return self.listing
        return (DATA / ("comment_response.json" if "PATCH" in arguments else "created_response.json")).read_text()


def test_it_updates_its_own_comment_among_others(upsert_comment, tmp_path, capsys):
    recorded = RecordedGh("issue_comments_paginated.json")
    report = tmp_path / "report.md"
    report.write_text("## transferlab gate: passed\n")
    assert upsert_comment.main(["--repo", "acme/flowers", "--pr", "42", "--body-file", str(report)], recorded) == 0
    (listing, _), (update, payload) = recorded.calls
    assert listing == ["--paginate", "repos/acme/flowers/issues/42/comments"]
    # the bot's marked comment (on the second page), not the bot's other comment, nor a human's
    # quote or copy of the report, nor "the last comment"
    assert update == ["--method", "PATCH", "repos/acme/flowers/issues/comments/2000000004", "--input", "-"]
    assert json.loads(payload) == {"body": "<!-- transferlab-gate-report -->\n## transferlab gate: passed\n"}
    assert "updated comment 2000000004 on acme/flowers#42" in capsys.readouterr().out


def test_it_creates_the_comment_when_there_is_none(upsert_comment):
    recorded = RecordedGh("issue_comments_without_report.json")
    action, comment = upsert_comment.upsert(repo="acme/flowers", pr=42, body="report", call=recorded)
    assert (action, comment) == ("created", 2000000099)
    assert recorded.calls[-1][0] == ["--method", "POST", "repos/acme/flowers/issues/42/comments", "--input", "-"]


def test_paginated_output_is_read_page_after_page(upsert_comment):
    comments = upsert_comment.parse_pages((DATA / "issue_comments_paginated.json").read_text())
    assert [comment["id"] for comment in comments] == [2000000000 + number for number in range(1, 7)]
    marked = upsert_comment.find_comment(comments, author="github-actions[bot]")
    assert marked["id"] == 2000000004
    assert upsert_comment.find_comment(comments, author="carol")["id"] == 2000000006  # --author
    assert upsert_comment.with_marker(upsert_comment.with_marker("x")).count(upsert_comment.MARKER) == 1
