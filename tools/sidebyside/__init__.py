"""The twins side by side: ``python -m tools.sidebyside --out DIR`` (default runs/site).

One static page per paired file set, three columns (PyTorch | Keras 3 | TF1), one row per
role (``roles.py``) matched by name, the lines that differ from the PyTorch column marked,
each row linked to the tests and PORTING.md sections that concern it (``links.py``); an
index with PORTING.md's concept table; PORTING.md and the test list as pages of their own.
Plain HTML and CSS (``style.css``), readable from the file system.
"""
import difflib
import html
import re
from pathlib import Path

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from tools.sidebyside.links import collect_tests, concerning, render_markdown
from tools.sidebyside.roles import file_roles, merge_order

REPO = Path(__file__).resolve().parents[2]
COLUMNS = (("torch", "PyTorch"), ("keras", "Keras 3"), ("tf1", "TF1"))
PAGES = {  # page: (what it shows, its three files)
    "models": ("the models and the shared weights format", "models.py", "models.py", "models.py"),
    "train": ("devices, batches, loss, optimizer, loops, checkpoints", "train.py", "train.py", "train.py"),
    "fast": ("the --fast variants", "fast.py", "fast.py", "fast.py"),
    # torch's recipes fit in train.py (lr_scheduler, AdamW, clip_grad_norm_, autocast are
    # library calls); the TF twins need helpers of their own.
    "recipes": ("the training recipes (schedules, decay, clipping, mixed precision)", "train.py",
                "recipes.py", "recipes.py"),
    "run_nn": ("the MLP entry point (Keras: GradientTape)", "run_nn.py", "run_nn.py", "run_nn.py"),
    "run_nn_keras": ("the MLP entry point (Keras: fit)", "run_nn.py", "run_nn_keras.py", "run_nn.py"),
    "run_cnn": ("the CNN entry point (Keras: GradientTape)", "run_cnn.py", "run_cnn.py", "run_cnn.py"),
    "run_cnn_keras": ("the CNN entry point (Keras: fit)", "run_cnn.py", "run_cnn_keras.py", "run_cnn.py"),
    "rnn_models": ("the LSTM/GRU classifier and its weights", "rnn_models.py", "rnn_models.py",
                   "rnn_models.py"),
    "run_rnn": ("the LSTM/GRU entry point (Keras: GradientTape)", "run_rnn.py", "run_rnn.py", "run_rnn.py"),
    "run_rnn_keras": ("the LSTM/GRU entry point (Keras: fit)", "run_rnn.py", "run_rnn_keras.py",
                      "run_rnn.py"),
    "distributed": ("data-parallel training: DDP, tf.distribute strategies, in-graph towers",
                    "distributed.py", "distributed.py", "distributed.py"),
}
# File names in reading order, numbered with two digits so that a file browser (and a sorted
# listing) shows them in that order past nine pages.
PAGE_FILES = {page: f"{number:02d}-{page}.html" for number, page in enumerate(PAGES, 1)}
PACKAGES = ("torch_impl", "tf2_impl", "tf1_compat")
SHOWN_TESTS = 6
CODE_REF = re.compile(r"<code>((?:torch_impl|tf2_impl|tf1_compat)/(\w+)\.py)::(\w+)</code>")


def page_files(page, root=REPO):
    return [root / package / name for package, name in zip(PACKAGES, PAGES[page][1:])]


def changed_lines(reference, lines):
    """1-based numbers of `lines` with no counterpart in `reference` (whitespace aside)."""
    strip = [line.strip() for line in reference], [line.strip() for line in lines]
    matcher = difflib.SequenceMatcher(None, *strip, autojunk=False)
    same = {j for block in matcher.get_matching_blocks() for j in range(block.b, block.b + block.size)}
    return [i + 1 for i, line in enumerate(strip[1]) if i not in same and line]


def code(role, marked=()):
    formatter = HtmlFormatter(linenos="inline", linenostart=role.start, hl_lines=list(marked))
    return highlight("\n".join(role.lines) + "\n", PythonLexer(), formatter)


def _row_links(keys, tests, sections):
    found, cited = concerning(keys, tests, sections)
    parts = [f'<a href="porting.html#{s.anchor}">{html.escape(s.title)}</a>' for s in cited]
    shown = [f'<a href="tests.html#{t.anchor}">{t.name}</a>' for t in found[:SHOWN_TESTS]]
    if len(found) > SHOWN_TESTS:
        shown.append(f"and {len(found) - SHOWN_TESTS} more")
    text = ""
    if parts:
        text += "PORTING: " + " · ".join(parts)
    if shown:
        text += (" | " if text else "") + "tests: " + ", ".join(shown)
    return f'<p class="links">{text}</p>' if text else ""


def _document(title, body):
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)}</title><link rel="stylesheet" href="style.css"></head>'
            f'<body><nav><a href="index.html">dl-rosetta side by side</a> · '
            f'<a href="porting.html">PORTING.md</a> · <a href="tests.html">tests</a></nav>\n'
            f"{body}\n</body></html>\n")


def build_page(page, tests, sections, root=REPO):
    """(html, {role: [column kinds present]}) of one page."""
    files = page_files(page, root)
    roles = [{r.name: r for r in file_roles(path)} for path in files]
    head = "".join(f'<div class="col {kind}"><b>{label}</b> <code>{path.relative_to(root)}</code></div>'
                   for (kind, label), path in zip(COLUMNS, files))
    rows, present = [], {}
    for name in merge_order([list(r) for r in roles]):
        reference = roles[0].get(name)
        cells, present[name] = [], []
        for (kind, label), column, path in zip(COLUMNS, roles, files):
            role = column.get(name)
            if role is None:
                cells.append(f'<div class="col {kind} gap" data-label="{label}">no <code>'
                             f"{html.escape(name)}</code> in <code>{path.relative_to(root)}</code></div>")
                continue
            present[name].append(kind)
            marked = changed_lines(reference.lines, role.lines) if reference and kind != "torch" else ()
            cells.append(f'<div class="col {kind}" data-label="{label}">{code(role, marked)}</div>')
        title = next(c[name].title for c in roles if name in c)
        keys = {name} if ":" not in name and name not in ("docstring", "imports", "main") else set()
        keys |= {p.stem for p in files} if name == "main" else set()
        anchor = "role-" + re.sub(r"[^A-Za-z0-9_]+", "-", name).strip("-")
        rows.append(f'<section class="row" id="{anchor}" data-role="{html.escape(name)}">'
                    f'<h2><a href="#{anchor}">{html.escape(title)}</a></h2>'
                    f'{_row_links(keys, tests, sections)}{"".join(cells)}</section>')
    body = (f"<h1>{page}: {html.escape(PAGES[page][0])}</h1>"
            f'<p class="legend">Marked lines differ from the PyTorch column; a dashed cell is a '
            f"role that framework does not have.</p>"
            f'<div class="row head">{head}</div>\n' + "\n".join(rows))
    return _document(f"{page} side by side", body), present


def _link_code(text, rows):
    """`torch_impl/train.py::make_loss` in rendered Markdown -> a link to that row."""
    def link(match):
        path, stem, name = match.groups()
        page = next((p for p in PAGES if f"{stem}.py" in PAGES[p][1:]), None)
        if page is None or name not in rows.get(page, {}):
            return match.group(0)
        return f'<a href="{PAGE_FILES[page]}#role-{name}">{match.group(0)}</a>'
    return CODE_REF.sub(link, text)


def build_site(out, root=REPO):
    """Write the site into `out`; returns {page: {role: [column kinds present]}}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tests = collect_tests(root)
    porting, sections = render_markdown((root / "docs" / "PORTING.md").read_text(encoding="utf-8"))
    rows = {}
    for page in PAGES:
        text, rows[page] = build_page(page, tests, sections, root)
        (out / PAGE_FILES[page]).write_text(text, encoding="utf-8")
    (out / "porting.html").write_text(_document("PORTING.md", _link_code(porting, rows)), encoding="utf-8")
    listing = "".join(
        f'<li id="{t.anchor}"><code>{t.file}::{t.name}</code> {html.escape(t.doc)}</li>' for t in tests)
    (out / "tests.html").write_text(_document("tests", f"<h1>The tests</h1><ul class=tests>{listing}</ul>"),
                                    encoding="utf-8")
    concepts = next((s for s in sections if s.title.startswith("Concepts")), None)
    table = _link_code(render_markdown(concepts.text)[0], rows) if concepts else ""
    items = "".join(f'<li><a href="{PAGE_FILES[p]}">{p}</a>: {html.escape(PAGES[p][0])} '
                    f"({len(rows[p])} rows)</li>" for p in PAGES)
    index = (f"<h1>dl-rosetta: the twins side by side</h1><ul>{items}</ul>"
             f'<h2>Concepts side by side (<a href="porting.html#{concepts.anchor if concepts else ""}">'
             f"PORTING.md</a>)</h2>{table}")
    (out / "index.html").write_text(_document("dl-rosetta side by side", index), encoding="utf-8")
    style = (Path(__file__).with_name("style.css").read_text(encoding="utf-8")
             + HtmlFormatter().get_style_defs(".highlight"))
    (out / "style.css").write_text(style, encoding="utf-8")
    return rows

