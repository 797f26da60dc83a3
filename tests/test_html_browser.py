"""The report pages in a real headless browser (Debian's chromium): they render non-blank
and the DOM the browser builds has every section. Skipped where no chromium is installed
(`.ci/run` installs it where it can)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.html_page import Page

from anechain.html_model import build_page
from anechain.html_pages import shard_page
from anechain.html_report import MODEL_SECTIONS, SHARD_SECTIONS, write_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium installed (apt-get install chromium)"
)


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",  # root in containers and CI
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def render(page: Path, tmp_path: Path) -> tuple[np.ndarray, str]:
    """(screenshot pixels, the DOM after loading) of a page."""
    png = tmp_path / "shot.png"
    url = page.resolve().as_uri()
    shot = chromium(url, tmp_path / "profile", f"--screenshot={png}", "--window-size=1280,2000")
    assert png.is_file(), shot.stderr[-2000:]
    dom = chromium(url, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    return np.asarray(Image.open(png).convert("L"), dtype=np.float64), dom.stdout


def sections_in(dom: str) -> set[str]:
    return set(Page(dom).sections)


def test_a_blank_page_is_told_apart(tmp_path):
    """The check itself: a page with nothing on it has no pixel variance."""
    blank = write_page(tmp_path / "blank.html", "<!DOCTYPE html><html><body></body></html>")
    pixels, dom = render(blank, tmp_path)
    assert pixels.std() < 1.0 and sections_in(dom) == set()


def test_a_shard_page_renders_with_every_section(tiny_build, tmp_path):
    result, _ = tiny_build
    report = next(a for a in result.artifacts if a.name == "0:3").report.to_dict()
    page = write_page(tmp_path / "shard.html", shard_page(report))
    pixels, dom = render(page, tmp_path)
    assert pixels.std() > 10, "the screenshot is blank"
    assert set(SHARD_SECTIONS) <= sections_in(dom)
    assert dom.count("<svg") >= 3  # the figures were parsed as SVG elements


def test_the_build_page_renders_with_every_section(tiny_build, tmp_path):
    result, _ = tiny_build
    page = write_page(tmp_path / "report.html", build_page(result))
    pixels, dom = render(page, tmp_path)
    assert pixels.std() > 10, "the screenshot is blank"
    assert set(MODEL_SECTIONS) <= sections_in(dom)
    # Every shard's own sections are in the page, under their anchors.
    for anchor in ("shard-0-3-errors", "shard-3-5-errors", "shard-5-6-residency"):
        assert f'id="{anchor}"' in dom
