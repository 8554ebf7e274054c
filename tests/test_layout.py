"""The shape of mrl/, read from its imports: no import circles (between modules, nor between packages), package
__init__.py files without code, and docs/layout.md's picture and module list the ones the code gives today.

    python tests/test_layout.py    # rewrites the generated part of docs/layout.md after a change of structure
"""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_supervised.py", "train_ssl.py", "evaluate.py", "embed.py")
LAYOUT = ROOT / "docs" / "layout.md"
START, END = "<!-- layout:start -->", "<!-- layout:end -->"


def modules():
    """{dotted name: path} of every module of mrl/."""
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for path in sorted((ROOT / "mrl").rglob("*.py"))}


def imports_of(path, known):
    """The mrl modules `path` imports, anywhere in it (a function-level import is an import too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mrl" and not node.level:
            for alias in node.names:  # `from mrl.data import shards` imports the module mrl.data.shards
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "mrl")
    return {name for name in found if name in known and name != "mrl"}


def node_of(module):
    """A module's place in the picture: its package (mrl.data.sources -> data), or itself at the top of mrl/."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else parts[1] if len(parts) == 2 else "mrl"


def graphs():
    """(module -> modules it imports, package-level node -> nodes it imports), the scripts included as 'scripts'."""
    known = modules()
    module_graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    node_graph = {}
    for name, targets in module_graph.items():
        node_graph.setdefault(node_of(name), set()).update(node_of(t) for t in targets)
    node_graph["scripts"] = set()
    for script in SCRIPTS:
        node_graph["scripts"].update(node_of(t) for t in imports_of(ROOT / script, known))
    return module_graph, {n: targets - {n, "mrl"} for n, targets in node_graph.items() if n != "mrl"}


def circles(graph):
    """The strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floors(graph):
    """Each node's floor: 1 + the highest floor of what it imports (1 for a node that imports none)."""
    floor = {}

    def of(v):
        if v not in floor:
            floor[v] = 1 + max((of(w) for w in graph.get(v, ())), default=0)
        return floor[v]

    for v in graph:
        of(v)
    return floor


def summary(path):
    """The first sentence of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.split())
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    if len(sentence) > 110:  # a long first sentence: up to its colon, if that says enough
        head = re.split(r"(?<=[:;])\s", sentence, maxsplit=1)[0].rstrip(":;")
        sentence = head if 25 <= len(head) <= 110 else sentence[:107].rsplit(" ", 1)[0] + " ..."
    return sentence


def render():
    """The generated part of docs/layout.md: the picture of the packages and their imports, and one line per module."""
    _, graph = graphs()
    floor = floors(graph)
    order = sorted(graph, key=lambda n: (-floor[n], n))
    lines = ["```mermaid", "flowchart TD"]
    for n in order:
        label = "scripts: " + ", ".join(SCRIPTS) if n == "scripts" else (
            f"mrl/{n}/" if (ROOT / "mrl" / n).is_dir() else f"mrl/{n}.py")
        lines.append(f'  {n}["{label}"]')
    for n in order:
        for target in sorted(graph[n], key=lambda t: (-floor[t], t)):
            lines.append(f"  {n} --> {target}")
    lines += ["```", "", "Floors, from the top (a floor imports only from the floors below it):", ""]
    for f in sorted(set(floor.values()), reverse=True):
        lines.append(f"{f}. " + ", ".join(f"`{n}`" for n in order if floor[n] == f))
    lines += ["", "Every module, by package (the first sentence of its docstring):", ""]
    known = modules()
    for n in order:
        if n == "scripts":
            continue
        if (ROOT / "mrl" / n).is_dir():
            lines.append(f"- **mrl/{n}/** -- {summary(known[f'mrl.{n}'])}")
            for m in (m for m in known if m.startswith(f"mrl.{n}.")):
                lines.append(f"  - `{m.split('.')[-1]}.py`: {summary(known[m])}")
        else:
            lines.append(f"- **mrl/{n}.py** -- {summary(known[f'mrl.{n}'])}")
    lines.append(f"- **mrl/\\_\\_init\\_\\_.py** -- {summary(known['mrl'])}")
    return "\n".join(lines)


def written():
    text = LAYOUT.read_text()
    return text[text.index(START) + len(START):text.index(END)].strip("\n")


def test_no_module_imports_in_a_circle():
    module_graph, _ = graphs()
    assert circles(module_graph) == []


def test_no_package_imports_in_a_circle():
    """Nothing imports upward: the packages (and the top-level modules) form a stack."""
    _, graph = graphs()
    assert circles(graph) == []


def test_package_inits_hold_no_code():
    for init in (ROOT / "mrl").glob("*/__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body), init
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init}: say what the package holds"


def test_docs_layout_is_the_code_of_today():
    assert written() == render(), "the structure changed: run `python tests/test_layout.py` and commit docs/layout.md"


if __name__ == "__main__":
    text = LAYOUT.read_text()
    LAYOUT.write_text(text[:text.index(START) + len(START)] + "\n" + render() + "\n" + text[text.index(END):])
    print(f"wrote {LAYOUT.relative_to(ROOT)}", file=sys.stderr)
