"""The HTML report: self-contained, and tested in a real headless browser."""

import shutil
import subprocess
from pathlib import Path

import pytest

from steadygrad.report import write_lab_report

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory, quick_lab):
    results = [r for r in quick_lab if r.claim.number in (1, 7, 9, 13, 19)]
    out = tmp_path_factory.mktemp("report")
    return write_lab_report(results, out, seconds=1.0), results


def test_the_page_is_self_contained(report):
    path, results = report
    html = path.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    assert "<script src" not in html and "<link" not in html
    assert html.count('class="figure"') == sum(len(r.figures) for r in results)
    assert "data:image/png;base64," in html
    assert 'id="claim-19"' in html and "reproduced" in html
    assert (path.parent / "results.json").is_file()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_page_renders_in_a_real_browser(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "Chromium is not installed (make test installs Debian's chromium when it can): "
            "the browser check of the HTML report did not run."
        )
    path, results = report
    url = path.resolve().as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            *profile,
            "--virtual-time-budget=5000",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    figures = sum(len(r.figures) for r in results)
    assert f'data-figures="{figures}"' in dom.stdout and f'data-rendered="{figures}"' in dom.stdout, dom.stdout[-500:]
    assert "data-errors" not in dom.stdout
    console_errors = [
        line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("Error" in line or "error" in line)
    ]
    assert console_errors == []
    ARTIFACTS.mkdir(exist_ok=True)
    for name, size in (("report-laptop.png", "1280,2200"), ("report-phone.png", "412,2400")):
        shot = subprocess.run(
            [browser, *CHROMIUM_FLAGS, *profile, f"--window-size={size}", f"--screenshot={ARTIFACTS / name}", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert (ARTIFACTS / name).read_bytes()[:4] == b"\x89PNG"
