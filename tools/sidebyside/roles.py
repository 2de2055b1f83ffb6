"""A Python source file as an ordered list of roles, the rows of a side-by-side page.

A role is a piece of a file that has a twin in the other frameworks' files, found by name:
the module docstring, the imports, each module-level constant, class and function, the
``if __name__ == "__main__":`` block, and, inside ``main()``, each section that starts with
one of the shared section comments (``# Data``, ...). Comment lines directly above a
definition belong to it; so does a decorator.
"""
import ast
from dataclasses import dataclass

SECTIONS = ("# Data", "# Model, loss and optimizer", "# Training", "# Test")


@dataclass
class Role:
    name: str        # the key that matches twins: "imports", "train_one_epoch", "main: # Data"
    title: str       # what the row's heading says
    start: int       # first line, 1-based
    lines: list      # the source lines


def _first_line(node, lines):
    """The node's first line with its decorators and the comment lines right above it."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    while start > 1 and lines[start - 2].lstrip().startswith("#"):
        start -= 1
    return start


def _name(node):
    if isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
            and isinstance(node.value.value, str):
        return "docstring", "module docstring"
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return "imports", "imports"
    if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
        kind = "class" if isinstance(node, ast.ClassDef) else "def"
        return node.name, f"{kind} {node.name}"
    if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
        return "__main__", 'if __name__ == "__main__"'
    targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
    names = [t.id for t in targets if isinstance(t, ast.Name)]
    return (names[0], names[0]) if names else (f"line {node.lineno}", f"line {node.lineno}")


def section_of(line):
    """The shared section a comment line starts ("# Data", or "# Data: why ..."), or None."""
    text = line.strip()
    return next((s for s in SECTIONS if text == s or text.startswith(f"{s}:")), None)


def _main_sections(role):
    """main() cut at its section comments: the part before the first one, then one role
    per section."""
    cuts = [i for i, line in enumerate(role.lines) if section_of(line)]
    if not cuts:
        return [role]
    parts = [Role("main", "def main: arguments and device", role.start, role.lines[:cuts[0]])]
    for begin, end in zip(cuts, cuts[1:] + [len(role.lines)]):
        section = section_of(role.lines[begin])
        parts.append(Role(f"main: {section}", f"main: {section[2:]}", role.start + begin,
                          role.lines[begin:end]))
    return parts


def _trim(lines):
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def file_roles(path):
    """The roles of the Python file at `path`, in source order."""
    source = path.read_text(encoding="utf-8")
    lines, roles = source.splitlines(), []
    for node in ast.parse(source).body:
        name, title = _name(node)
        start = _first_line(node, lines)
        role = Role(name, title, start, _trim(lines[start - 1:node.end_lineno]))
        if roles and roles[-1].name == name == "imports":  # consecutive imports: one role
            roles[-1].lines = _trim(lines[roles[-1].start - 1:node.end_lineno])
        elif name == "main":
            roles += _main_sections(role)
        else:
            roles.append(role)
    return roles


def merge_order(columns):
    """One row order for several columns' role names: the first column's order, and each
    role missing there placed after the role that precedes it in its own column."""
    order = []
    for names in columns:
        previous = None
        for name in names:
            if name not in order:
                order.insert(0 if previous is None else order.index(previous) + 1, name)
            previous = name
    return order
