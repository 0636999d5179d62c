"""report.html as a person reads it: verdict first, real tables, the model's own answers; compare --html.

The browser tests open the page in headless Chromium with no network at all (a fresh network namespace),
read the DOM after load, and save a screenshot as a test artifact (tests/.artifacts/, or
$TRACETUNE_TEST_ARTIFACTS)."""

import dataclasses
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.evidence.test_report import _comparison, _data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("TRACETUNE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / ".artifacts"))
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


class _Text(HTMLParser):
    """The text a reader sees (script and style left out) and every table's header cells."""

    def __init__(self):
        super().__init__()
        self.text, self.headers, self._skip, self._th = [], [], 0, None

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")
        if tag == "table":
            self.headers.append([])
        if tag == "th":
            self._th = ""

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")
        if tag == "th" and self._th is not None:
            self.headers[-1].append(self._th.strip())
            self._th = None

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)
            if self._th is not None:
                self._th += data


def _can_unshare() -> bool:
    """Whether this process may start a child in a new network namespace (root, and allowed by the sandbox)."""
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


def _chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
    offline = ["unshare", "--net"] if _can_unshare() else []
    command = [*offline, CHROMIUM, *flags, "--virtual-time-budget=5000", *extra, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _rendered(page: Path, tmp_path: Path, shot: str) -> _Text:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = _chromium(page, tmp_path, f"--screenshot={ARTIFACTS / shot}", "--window-size=1280,2400")
    assert (ARTIFACTS / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", screenshot.stderr[-2000:]
    dom = _chromium(page, tmp_path, "--dump-dom").stdout
    rendered = re.search(r'data-plots-rendered="(\w+)"', dom)
    assert rendered and rendered.group(1) == re.search(r'data-plots-expected="(\d+)"', dom).group(1)
    parsed = _Text()
    parsed.feed(dom)
    return parsed


@needs_chromium
def test_report_page_reads_as_a_page_offline(tiny_run_dir, tmp_path):
    from tracetune.evidence.report import verdict
    from tracetune.evidence.view import read_run

    page = tiny_run_dir / "report.html"
    assert not re.search(r"(src|href)=\"https?://", page.read_text())  # nothing to fetch
    parsed = _rendered(page, tmp_path, "report.png")
    text = " ".join(" ".join(parsed.text).split())
    assert verdict(read_run(tiny_run_dir)) in text
    assert text.index("gates passed") < text.index("Quality gates")  # the verdict comes first
    assert "|---" not in text and "| metric |" not in text  # tables are tables, not markdown
    assert ["gate", "status", "value", "threshold", "from"] in parsed.headers
    assert [
        "metric",
        "zero-shot base",
        "worked few-shot base",
        "answer-only few-shot base",
        "fine-tuned",
    ] in parsed.headers
    assert "The model's own words" in text


@needs_chromium
def test_compare_html_page_offline(tiny_run_dir, tmp_path):
    from tracetune.cli import main

    out = tmp_path / "compare.html"
    assert main(["compare", str(tiny_run_dir), str(tiny_run_dir), "--html", str(out)]) == 0
    parsed = _rendered(out, tmp_path, "compare.png")
    text = " ".join(" ".join(parsed.text).split())
    assert "2 runs compared; the highest verified accuracy is r1's" in text and "|---" not in text
    assert any(h[:1] == [""] and len(h) == 3 for h in parsed.headers)  # a column per run


def test_verdict_colour_follows_the_gates_and_the_comparison():
    from tracetune.evidence.report import verdict_class

    assert verdict_class(_data(_comparison(0.12, 0.31))) == "good"
    assert verdict_class(_data(_comparison(0.22, 0.07))) == "bad"
    assert verdict_class(_data(_comparison(0.12, 0.31), failed=("b",))) == "bad"
    assert verdict_class(dataclasses.replace(_data(None), gates=None)) == "neutral"


def _row(item_id: str, correct: bool, completion: str = "Answer: 1", **extra) -> dict:
    return {"id": item_id, "prompt": f"q {item_id}", "expected_answer": "1", "extracted_answer": "1" if correct else "2",
            "correct": correct, "verified": correct, "finish_reason": "eos", "completion": completion, **extra}  # fmt: skip


def test_outcomes_pair_each_final_answer_with_the_strongest_baseline_and_mark_the_bad_step():
    from tracetune.evidence.page import completion_html, examples_html, outcome_examples

    data = _data(_comparison(0.5, 0.5))
    data.predictions = {
        "strongest_baseline": [_row("a", False), _row("b", True), _row("c", False), _row("d", False)],
        "final": [
            _row("a", True),
            _row("b", False),
            _row("c", False, finish_reason="length"),
            _row("d", True, "Reasoning:\n1. 2 + 2 = 5\n2. 5 - 4 = 1\nAnswer: 1", work_valid=False, first_bad_step=1),
        ],
    }
    kinds = {kind: [final["id"] for _, final in pairs] for kind, pairs in outcome_examples(data).items()}
    assert kinds == {
        "improved": ["a", "d"],
        "regressed": ["b"],
        "still wrong": ["c"],
        "right answer, invalid work": ["d"],
        "truncated": ["c"],
    }
    marked = completion_html(data.predictions["final"][3])
    assert '<mark class="bad-step"' in marked and "1. 2 + 2 = 5</mark>" in marked and "2. 5 - 4 = 1\n" in marked
    assert "few-shot base model" in examples_html(data)
