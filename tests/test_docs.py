"""The docs name only what exists: README.md and docs/*.md are checked against the repository and the scripts' parsers.

- every relative link and image points at a file of the repo, and a #fragment at a heading of that file (GitHub's
  anchors);
- every command line in a code block or an inline code span that runs one of our scripts (`python`, `accelerate
  launch`, `torchrun`, `sbatch examples/slurm.sh`, `python -m mrl.train.supervise ...` around any of them) names only flags
  of that script's parser; the launcher's own flags, before the script's name, are the launcher's business;
- every other `--flag` the docs mention is a flag of one of our parsers, or of the two launchers (accelerate launch,
  torchrun) where the docs talk about theirs;
- every repo path the docs name in backticks (mrl/..., tests/..., examples/...) exists;
- the README stays a front page: at most 250 lines, a link to every page under docs/, and a link back from each.
No training: the parsers are built, not run.
"""

import ast
import functools
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

# `python -m <module>` commands with a parser of their own; mrl.train.supervise wraps a launch command (its script is checked)
MODULES = {"mrl.report.workspace": "mrl/report/workspace.py", "mrl.hub.convert_reference": "mrl/hub/convert_reference.py",
           "mrl.data.prepare_imagenet": "mrl/data/prepare_imagenet.py"}
WRAPPERS = {"mrl.train.supervise"}
# Programs whose own flags the docs may pass without running a script of ours (pip's --index-url, pytest's -n ...)
FOREIGN = {"pip", "pip3", "hf", "wandb", "git", "sbatch", "srun", "bash", "sh", "timeout", "accelerate", "torchrun",
           "python", "python3", "cd", "export", "ls", "cat"}
REPO_DIRS = ("mrl", "tests", "benchmarks", "examples", "accelerate_configs", "docs")

FENCE = re.compile(r"^(```|~~~)\s*([\w+-]*)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_SRC = re.compile(r"<img\s[^>]*src=\"([^\"]+)\"")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "text"}


# ---- reading a markdown page


@functools.lru_cache(maxsize=None)
def parse_page(path):
    """(prose, code blocks, headings) of a markdown file: prose is its paragraphs outside fenced code, each joined
    into one line (a code span or a link may wrap); each code block is (language, [lines])."""
    prose, blocks, headings, block, paragraph = [], [], [], None, []
    for line in Path(path).read_text(encoding="utf-8").splitlines() + [""]:
        fence = FENCE.match(line.strip())
        if block is None and fence:
            block = (fence.group(2).lower(), [])
        elif block is not None and line.strip().startswith(("```", "~~~")):
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append(line)
        elif line.strip() and not re.match(r"^#{1,6}\s", line):
            paragraph.append(line.strip())
            continue
        elif line.strip():
            headings.append(line.lstrip("#").strip())
            prose.append(headings[-1])
        if paragraph:
            prose.append(" ".join(paragraph))
            paragraph = []
    return prose, blocks, headings


def shown(path):
    """A page's name in a message: relative to the repo (a test's page elsewhere: its file name)."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name


def github_anchors(headings):
    """GitHub's heading anchors: the rendered text lowercased, punctuation (backticks, colons, '&', emoji) dropped,
    spaces as hyphens; a repeated heading gets -1, -2, ..."""
    anchors, seen = set(), {}
    for heading in headings:
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def link_problems(path):
    """Each relative link or image of the page whose file, or #heading, does not exist."""
    prose, _, headings = parse_page(path)
    problems = []
    for number, line in enumerate(prose):
        text = CODE_SPAN.sub("", line)
        for target in LINK.findall(text) + IMG_SRC.findall(text):
            if re.match(r"^[a-z][\w+.-]*:", target):  # https:, mailto:
                continue
            file, _, fragment = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            where = f"{shown(path)}: link {target!r}"
            if not resolved.exists():
                problems.append(f"{where}: {file} does not exist")
            elif fragment and resolved.suffix == ".md" and fragment not in github_anchors(parse_page(resolved)[2]):
                problems.append(f"{where}: {resolved.name} has no heading with the anchor #{fragment}")
    return problems


# ---- the parsers


def option_strings(parser):
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


@functools.lru_cache(maxsize=None)
def script_flags(relative):
    """The --flags of a script of this repo: its get_args_parser() where it has one (imported, so that flags added by
    helpers -- mrl.cli, each SSL method's own -- count), else the literal flags of its add_argument calls. None: the
    file does not exist."""
    path = ROOT / relative
    if not path.is_file():
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if any(isinstance(node, ast.FunctionDef) and node.name == "get_args_parser" for node in tree.body):
        spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # as `python <script>` runs it: its folder's modules import
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        return frozenset(option_strings(module.get_args_parser()))
    return frozenset(arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                     and getattr(node.func, "attr", None) == "add_argument" for arg in node.args
                     if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"))


OUR_SCRIPTS = ("train_supervised.py", "train_ssl.py", "evaluate.py", "embed.py", *MODULES.values())


@functools.lru_cache(maxsize=None)
def launcher_flags():
    """accelerate launch's and torchrun's own flags, from their parsers: the docs may talk about those too."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser as torchrun_parser

    return frozenset(option_strings(launch_command_parser()) | option_strings(torchrun_parser()))


@functools.lru_cache(maxsize=None)
def known_flags():
    """Any flag of our scripts' parsers or of the launchers'."""
    return frozenset().union(*(script_flags(s) for s in OUR_SCRIPTS), launcher_flags())


# ---- command lines


def segments(command):
    """A shell line as its simple commands (split at ; && || |), each a list of words; comments dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: prose in backticks, not a command
        return [command.split()]
    parts, current = [], []
    for word in words:
        if word and set(word) <= set(";&|"):
            parts.append(current)
            current = []
        else:
            current.append(word)
    return parts + [current]


def flag_names(words):
    return [word.split("=", 1)[0] for word in words if FLAG.fullmatch(word.split("=", 1)[0])]


def command_problems(words, where):
    """The flags of one simple command that its script does not have; flags of a command that is not ours (pip,
    pytest, a bare launcher) are not checked, and those of no command at all must be somebody's (known_flags)."""
    words = [w for w in words if w not in ("do", "then", "else", "time") and not re.match(r"^[A-Z_]+=", w)]
    script, start = None, None
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            module = words[i + 1]
            if module in MODULES:
                script, start = MODULES[module], i + 2
            elif module in WRAPPERS:
                continue
            break  # another module's command (pytest, venv, pip)
        if word.endswith(".py") and len(words) > 1:  # alone it is a file's name, not a command
            script, start = word, i + 1
            break
    if script is None:
        if words and (words[0] in FOREIGN or words[0].startswith(("$", "./", "."))):
            return []
        return [f"{where}: {flag} is no flag of our scripts (nor of accelerate launch or torchrun)"
                for flag in flag_names(words) if flag not in known_flags()]
    flags = script_flags(script)
    if flags is None:
        return [f"{where}: {script} does not exist"]
    if not flags:  # a script without flags of its own (tests/imagenet_fixture.py)
        flags = frozenset()
    return [f"{where}: {script} has no flag {flag}" for flag in flag_names(words[start:]) if flag not in flags]


def joined(lines):
    """Code block lines with their backslash continuations joined."""
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    return out + ([pending] if pending else [])


def flag_problems(path):
    """Every flag a page names that does not exist where the page says (see the module docstring)."""
    prose, blocks, _ = parse_page(path)
    name, problems = shown(path), []
    for language, lines in blocks:
        if language not in SHELL_LANGUAGES:
            continue  # python: code, not a command line
        for line in joined(lines):
            for words in segments(line):
                problems += command_problems(words, f"{name}: `{line.strip()}`")
    for line in prose:
        for _, span in CODE_SPAN.findall(line):
            for words in segments(span):
                problems += command_problems(words, f"{name}: `{span}`")
        problems += [f"{name}: --{flag} (in prose) is no flag of our scripts"
                     for flag in FLAG.findall(CODE_SPAN.sub(" ", line)) if "--" + flag not in known_flags()]
    return problems


def path_problems(path):
    """Repo paths the page names in backticks (mrl/..., examples/...) that do not exist."""
    prose, _, _ = parse_page(path)
    return [f"{shown(path)}: `{span}` does not exist" for line in prose
            for _, span in CODE_SPAN.findall(line)
            if re.fullmatch(rf"(?:{'|'.join(REPO_DIRS)})/[\w./-]*", span) and not (ROOT / span).exists()]


# ---- the tests


def test_pages_exist():
    assert README.is_file() and len(PAGES) > 5, PAGES


@pytest.mark.parametrize("check", [link_problems, flag_problems, path_problems], ids=lambda f: f.__name__)
def test_docs_name_only_what_exists(check):
    problems = [problem for page in PAGES for problem in check(page)]
    assert problems == [], "\n".join(problems)


def test_readme_is_a_front_page_linked_to_every_docs_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for line in parse_page(README)[0] for target in LINK.findall(line)}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(ROOT)}"
        head = "\n".join(page.read_text(encoding="utf-8").splitlines()[:4])
        assert "../README.md" in head, f"{page.relative_to(ROOT)} does not start with a link back to the README"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A page with a broken link, a missing anchor, a made-up flag, another script's flag and a missing path is
    reported on each, and its correct lines are not."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n## `train_ssl.py`: the W&B bits\n\n"
        "[ok](#train_sslpy-the-wb-bits) [ok](page.md#a-page) [broken](missing.md) [anchor](#no-such-heading)\n\n"
        "```bash\n"
        "python -m mrl.train.supervise torchrun --nproc_per_node 2 train_ssl.py --method vicreg --sim_coeff 25 \\\n"
        "    --made_up_flag 1\n"
        "python evaluate.py --checkpoint runs/x --tied   # a train_supervised.py flag\n"
        "python -m pytest -q -n 0 --whatever\n"
        "```\n\n"
        "Prose: `--dims 8,16` and --pretrained exist, --nonexistent_flag does not; `mrl/not_a_module.py` neither, "
        "`mrl/cli.py` does; `--machine_rank 0` is accelerate's.\n")
    problems = link_problems(page) + flag_problems(page) + path_problems(page)
    text = "\n".join(problems)
    for expected in ("missing.md does not exist", "#no-such-heading", "train_ssl.py has no flag --made_up_flag",
                     "evaluate.py has no flag --tied", "--nonexistent_flag (in prose)",
                     "`mrl/not_a_module.py` does not exist"):
        assert expected in text, text
    assert len(problems) == 6, text  # and nothing else: not pytest's flag, not the existing ones
