"""The HTML report opened in a real browser (headless Chromium): it renders its table and images."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from PIL import Image

from attnreid.viz.report import write_report
from test_viz import make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--hide-scrollbars", "--window-size=1280,1600"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_chromium(tmp_path):
    a = make_run(tmp_path, "mhsanet_run", seed=0)
    b = make_run(tmp_path, "hacnn_run", model="hacnn", seed=1)
    page = write_report([a, b], tmp_path / "report", title="Browser check", overlays=0)
    url = page.resolve().as_uri()
    shot = tmp_path / "shot.png"
    # Both in parallel: each is a separate headless browser start (~1 s).
    dom_proc = subprocess.Popen([CHROMIUM, *FLAGS, "--dump-dom", url], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    shot_proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--screenshot={shot}", url],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        dom, _ = dom_proc.communicate(timeout=60)
        shot_proc.wait(timeout=60)
    finally:
        for p in (dom_proc, shot_proc):
            if p.poll() is None:
                p.kill()
    # The DOM the browser built (tbody inserted by the parser proves it parsed the table).
    assert "<tbody>" in dom and "Browser check" in dom
    rows = re.findall(r"<tr>.*?</tr>", dom, flags=re.S)
    assert len(rows) == 3 and any("mhsanet_run" in r for r in rows) and any("hacnn_run" in r for r in rows)
    assert "<b>60.0</b>" in rows[2] and "50.0" in rows[1]  # mAP in percent, the best in bold
    srcs = re.findall(r'<img src="([^"]+)"', dom)
    assert len(srcs) >= 8  # CMC, 2 training curves, 6 ranked lists, comparisons
    for s in srcs:
        assert not s.startswith(("http:", "https:", "//")), s
        assert (page.parent / s).is_file(), s
    # The screenshot: the page was painted (text, table, coloured plots), not blank.
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 1600)
    colours = img.getcolors(1 << 24)
    assert colours is not None and len(colours) > 500
    # The plots are below the table: the upper half of the window must show colour (CMC curves).
    top = img.crop((0, 0, 1280, 800))
    saturated = sum(n for n, (r, g, b) in top.getcolors(1 << 24) if max(r, g, b) - min(r, g, b) > 80)
    assert saturated > 200
