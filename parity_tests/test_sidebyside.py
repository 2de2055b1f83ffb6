"""tools.sidebyside, the generated side-by-side site: every shared role in all three
columns, a role removed from one framework shown as a gap, every link resolving.
(The rendered layout is checked in a real browser by test_sidebyside_browser.py.)"""
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from parity_tests.conftest import REPO
from parity_tests.test_vocabulary import SECTIONS, SHARED
from tools.sidebyside import PAGE_FILES, PAGES, build_site, changed_lines
from tools.sidebyside.roles import file_roles, merge_order

KINDS = ["torch", "keras", "tf1"]


class Page(HTMLParser):
    """The ids, the links and, per row, the column cells (kind, is a gap) of one page."""

    def __init__(self, text):
        super().__init__()
        self.ids, self.links, self.rows, self.row = set(), [], {}, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag in ("a", "link") and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "section" and "data-role" in attrs:
            self.row = self.rows.setdefault(attrs["data-role"], [])
        classes = attrs.get("class", "").split()
        if tag == "div" and "col" in classes and self.row is not None:
            self.row.append((next(k for k in KINDS if k in classes), "gap" in classes))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    return out, build_site(out)


def _page(out, name):
    return Page((out / PAGE_FILES.get(name, f"{name}.html")).read_text(encoding="utf-8"))


def test_every_shared_role_appears_in_all_three_columns(site):
    out, rows = site
    wanted = {"models": SHARED["models.py"], "train": SHARED["train.py"]}
    wanted |= {p: ["main"] + [f"main: {s}" for s in SECTIONS] for p in PAGES if p.startswith("run_")}
    for page, names in wanted.items():
        cells = _page(out, page).rows
        for name in names:
            assert rows[page][name] == KINDS, f"{page}: {name} in {rows[page][name]}"
            assert cells[name] == [(kind, False) for kind in KINDS], f"{page}: {name}"


def test_every_row_has_three_cells_and_every_paired_file_a_page(site):
    out, rows = site
    for page in PAGES:
        assert all(len(cells) == 3 for cells in _page(out, page).rows.values()), page
    for package in ("torch_impl", "tf2_impl", "tf1_compat"):
        for path in (REPO / package).glob("*.py"):
            shown = any(path.name in PAGES[p][1:] for p in PAGES)
            assert shown or path.name == "__init__.py" or path.name in ("scratch.py", "session_basics.py",
                                                                        "workers.py"), path


def test_a_role_removed_from_one_framework_shows_as_a_gap(tmp_path):
    """A copy of the sources without tf1_compat's make_loss: that row has a labelled gap."""
    for folder in ("torch_impl", "tf2_impl", "tf1_compat", "parity_tests", "docs"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    train = tmp_path / "tf1_compat" / "train.py"
    role = next(r for r in file_roles(train) if r.name == "make_loss")
    lines = train.read_text().splitlines()
    del lines[role.start - 1:role.start - 1 + len(role.lines)]
    train.write_text("\n".join(lines) + "\n")
    rows = build_site(tmp_path / "site", root=tmp_path)
    assert rows["train"]["make_loss"] == ["torch", "keras"]
    page = (tmp_path / "site" / PAGE_FILES["train"]).read_text()
    assert "no <code>make_loss</code> in <code>tf1_compat/train.py</code>" in page
    assert Page(page).rows["make_loss"] == [("torch", False), ("keras", False), ("tf1", True)]


def test_links_to_pages_tests_and_porting_sections_resolve(site):
    out, _ = site
    pages = {path.name: Page(path.read_text(encoding="utf-8")) for path in out.glob("*.html")}
    targets = 0
    for name, page in pages.items():
        for href in page.links:
            file, _, fragment = href.partition("#")
            file = file or name
            assert (out / file).is_file(), f"{name} links to {href}"
            if fragment:
                assert fragment in pages[file].ids, f"{name} links to {href}: no such id"
                targets += 1
    assert targets > 100
    train = (out / PAGE_FILES["train"]).read_text()
    assert re.search(r'href="tests.html#t-test_\w+-test_pitfall_\w+"', train)
    assert re.search(r'href="porting.html#[\w-]+"', train)


def test_changed_lines_marks_what_differs_from_the_pytorch_column():
    torch_lines = ["def f(x):", "    y = x.sum()", "    return y"]
    other = ["def f(x):", "    y = tf.reduce_sum(x)", "", "    return y"]
    assert changed_lines(torch_lines, other) == [2]
    assert changed_lines(torch_lines, ["  def f(x):"] + torch_lines[1:]) == []


def test_merge_order_keeps_each_column_order_and_places_missing_roles_after_their_neighbour():
    assert merge_order([["a", "b", "c"], ["a", "x", "c"], ["y", "a"]]) == ["y", "a", "x", "b", "c"]


def test_command_line_writes_the_site(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.sidebyside", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{len(PAGES)} pages" in result.stdout and Path(tmp_path, "index.html").is_file()
    index = Page((tmp_path / "index.html").read_text())
    assert set(PAGE_FILES.values()) <= set(index.links)
    assert any(link.startswith(f'{PAGE_FILES["train"]}#role-') for link in index.links)  # concepts


def test_an_unwritable_out_is_one_sentence_and_exit_2(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "site"
    result = subprocess.run([sys.executable, "-m", "tools.sidebyside", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: cannot write the site to"), result.stderr
