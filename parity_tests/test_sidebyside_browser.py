"""The side-by-side site in a real browser: headless Chromium (the distribution's package,
which .ci/run installs when it is missing) renders the pages from the file system.

From the screenshot: the three column headings (found by their solid colours in
tools/sidebyside/style.css) sit side by side at desktop width and one below the other at
phone width. From the rendered DOM: every row keeps its three cells. From Chromium's log:
no page writes to the console (the pages have no script, so any message is an error).
"""
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib import image

from tools.sidebyside import PAGE_FILES, build_site

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="headless Chromium is not installed "
                                "(.ci/run installs the distribution's chromium package)")
HEADINGS = {"torch": (238, 76, 44), "keras": (0, 90, 180), "tf1": (30, 140, 60)}
DESKTOP, PHONE = (1280, 900), (390, 1400)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    build_site(out)
    return out


def chromium(tmp_path, page, *flags, size=DESKTOP):
    """Chromium's (stdout, stderr) for one page of the site."""
    result = subprocess.run(
        [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={size[0]},{size[1]}",
         "--enable-logging=stderr", "--v=0", *flags, page.as_uri()],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def heading_boxes(tmp_path, page, size):
    """{column: (left, top, right, bottom)} of each heading's colour in a screenshot."""
    shot = tmp_path / f"{page.stem}-{size[0]}.png"
    chromium(tmp_path, page, f"--screenshot={shot}", size=size)
    pixels = np.rint(image.imread(shot)[..., :3] * 255).astype(int)
    boxes = {}
    for kind, colour in HEADINGS.items():
        ys, xs = np.nonzero((pixels == colour).all(axis=-1))
        assert len(xs) > 200, f"the {kind} heading is not on the screen at {size}"
        boxes[kind] = (xs.min(), ys.min(), xs.max(), ys.max())
    return boxes


def test_browser_shows_three_columns_side_by_side_at_desktop_width(site, tmp_path):
    boxes = heading_boxes(tmp_path, site / PAGE_FILES["train"], DESKTOP)
    (l1, t1, r1, b1), (l2, t2, r2, b2), (l3, t3, r3, b3) = (boxes[k] for k in HEADINGS)
    assert r1 < l2 and r2 < l3, boxes          # left to right, not overlapping
    assert max(t1, t2, t3) < min(b1, b2, b3), boxes  # on one line
    assert min(r - l for l, _, r, _ in boxes.values()) > DESKTOP[0] / 4, boxes


def test_browser_stacks_the_columns_at_phone_width(site, tmp_path):
    boxes = heading_boxes(tmp_path, site / PAGE_FILES["train"], PHONE)
    (l1, t1, r1, b1), (l2, t2, r2, b2), (l3, t3, r3, b3) = (boxes[k] for k in HEADINGS)
    assert b1 < t2 and b2 < t3, boxes          # top to bottom
    assert min(r - l for l, _, r, _ in boxes.values()) > PHONE[0] * 0.8, boxes  # full width


class Cells(HTMLParser):
    """The number of column cells in each row of a rendered page."""

    def __init__(self, text):
        super().__init__()
        self.rows = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        classes = dict(attrs).get("class") or ""
        if tag == "section" and "row" in classes.split():
            self.rows.append(0)
        elif tag == "div" and "col" in classes.split() and self.rows:
            self.rows[-1] += 1


@pytest.mark.parametrize("page", ["index", "train", "run_cnn"])
def test_browser_renders_pages_without_console_messages(site, tmp_path, page):
    dom, log = chromium(tmp_path, site / PAGE_FILES.get(page, f"{page}.html"), "--dump-dom")
    assert "CONSOLE" not in log, [line for line in log.splitlines() if "CONSOLE" in line]
    if page == "index":
        assert all(f'href="{name}"' in dom for name in PAGE_FILES.values())
    else:
        rows = Cells(dom).rows
        assert len(rows) >= 8 and set(rows) == {3}, rows
