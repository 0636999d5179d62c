import re
import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium chromium-driver)")
def test_report_plots_render_in_headless_chromium(tiny_run_dir, tmp_path):
    page = tiny_run_dir / "report.html"
    assert "http://" not in page.read_text() and "https://" not in page.read_text()  # self-contained
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    expected = re.search(r'data-plots-expected="(\d+)"', result.stdout)
    rendered = re.search(r'data-plots-rendered="(\w+)"', result.stdout)
    assert expected and rendered, result.stderr[-2000:]
    assert int(expected.group(1)) == 4
    assert rendered.group(1) == expected.group(1), "some plots did not decode"


def test_report_has_the_plots_inline(tiny_run_dir):
    html = (tiny_run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    for title in ("Training and validation loss", "Learning rate", "Throughput", "Accuracy per category"):
        assert title in html
    assert (tiny_run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
