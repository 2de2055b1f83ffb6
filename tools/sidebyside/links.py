"""What concerns a row: the tests that use its name, and the PORTING.md sections that
cite the name or one of those tests.

A test uses a name when its body refers to it (``make_loss(...)``, ``train.make_loss``)
or names it in a string (``"torch_impl.run_cnn"``). PORTING.md is rendered with
Python-Markdown, whose ``toc`` extension gives every heading the id the links point to.
"""
import ast
import re
from dataclasses import dataclass, field

import markdown

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Test:
    file: str           # parity_tests/test_parity.py
    name: str           # test_forward_parity_...
    doc: str            # the docstring's first line
    uses: set = field(default_factory=set)

    @property
    def anchor(self):
        return f"t-{self.file.rsplit('/', 1)[-1][:-3]}-{self.name}"


@dataclass
class Section:
    anchor: str
    title: str
    text: str


def _names_used(node):
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            names.add(child.id)
        elif isinstance(child, ast.Attribute):
            names.add(child.attr)
        elif isinstance(child, ast.Constant) and isinstance(child.value, str):
            names |= set(WORD.findall(child.value)) if len(child.value) < 60 else set()
    return names


def collect_tests(root):
    """Every test function of parity_tests/, in file order."""
    tests = []
    for path in sorted((root / "parity_tests").glob("test_*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                doc = (ast.get_docstring(node) or "").split("\n\n")[0].replace("\n", " ")
                tests.append(Test(f"parity_tests/{path.name}", node.name, doc, _names_used(node)))
    return tests


def render_markdown(text):
    """(html, [Section]) of a Markdown document: headings get ids from the toc extension."""
    md = markdown.Markdown(extensions=["toc", "tables", "fenced_code"])
    html = md.convert(text)
    tokens, flat = list(md.toc_tokens), []
    while tokens:
        token = tokens.pop(0)
        flat.append(token)
        tokens[:0] = token["children"]
    bodies = re.split(r"^#{1,6} .*$", text, flags=re.M)[1:]
    return html, [Section(t["id"], re.sub(r"<[^>]+>", "", t["name"]), body)
                  for t, body in zip(flat, bodies)]


def concerning(keys, tests, sections):
    """(tests, sections) that concern a row whose names are `keys`: the tests that use a key,
    the sections that cite a key as code or one of those tests, and the pitfall tests that
    name those sections (first)."""
    mine = [t for t in tests if t.uses & keys]
    names = {t.name for t in mine}

    def cites(section):
        text = f"{section.title}\n{section.text}"
        return bool(names & set(WORD.findall(text))) or any(
            f"`{key}" in text or f"::{key}" in text for key in keys)
    found = [s for s in sections if cites(s)]
    titled = {word for s in found for word in WORD.findall(s.title)}
    pitfalls = [t for t in tests if t.name in titled and t.name not in names]
    return sorted(pitfalls + mine, key=lambda t: "pitfall" not in t.name), found
