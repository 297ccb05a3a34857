"""The docs tell the truth: every python example in README.md and docs/ runs,
the README keeps its two-command quick start, and every link, repository
path and ``kvmcoal`` name the docs mention exists.

An example whose first line is ``# needs /dev/kvm`` is skipped, with the
reason, where /dev/kvm does not work.  Anything else fenced as ``python``
must run anywhere: output listings and shell commands take another fence.
"""

from __future__ import annotations

import gc
import glob
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmcoal import kvm

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "docs" / "guide").glob("*.md"))]
# The changelog names what is gone, so only its links are checked.
LINKING = [*DOCS, ROOT / "CHANGES.md"]
NEEDS_KVM = "# needs /dev/kvm"
QUICK_START = ["pip install -e '.[test]' && python -m kvmcoal demo", "python -m pytest"]
# A code span naming one of these is a path in the repository.
REPO_DIRS = ("src", "kvmcoal", "tests", "benchmarks", "docs", ".ci")

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    path: Path
    lang: str
    line: int       # the line of the block's first code line in its file, from 1
    code: str

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines(keepends=True)
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, lang = opening.groups()
        end = i + 1
        while end < len(lines) and not lines[end].lstrip(" ").startswith(fence):
            end += 1
        blocks.append(Block(path, lang, i + 2, "".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def prose(path: Path) -> str:
    """The file with its fenced blocks blanked (line numbers kept)."""
    lines = path.read_text().splitlines(keepends=True)
    for block in fenced_blocks(path):
        first = block.line - 2            # the opening fence
        for k in range(first, min(first + block.code.count("\n") + 2, len(lines))):
            lines[k] = "\n"
    return "".join(lines)


def code_spans(path: Path) -> list[str]:
    # A span may wrap onto the next line; Markdown reads the break as a space.
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose(path))]


# "README.md#2": the second python block of the README.
EXAMPLES = {f"{b.name}#{n}": b for path in DOCS
            for n, b in enumerate((b for b in fenced_blocks(path) if b.lang == "python"), 1)}


def needs_kvm(block: Block) -> bool:
    lines = block.code.strip().splitlines()
    return bool(lines) and lines[0].strip() == NEEDS_KVM


def open_fds() -> dict[str, str]:
    """This process's open fds (as /proc names them) and what each refers to."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:      # the fd listdir itself used, now closed
            pass
    return found


@pytest.mark.parametrize("block", list(EXAMPLES.values()), ids=list(EXAMPLES))
def test_example_runs(block):
    if needs_kvm(block) and not kvm.available():
        pytest.skip(f"{block.name} line {block.line} needs /dev/kvm: {kvm.why_unavailable()}")
    # Padded so that a traceback names the line in the Markdown file.
    code = compile("\n" * (block.line - 1) + block.code, block.name, "exec")
    namespace = {"__name__": "__docs__"}
    fds = open_fds()
    try:
        exec(code, namespace)
        # Counted before the namespace goes: a buffer closes itself quietly
        # when collected, so only this shows that the example left it open.
        left_open = sorted(target for fd, target in open_fds().items() if fds.get(fd) != target)
        assert not left_open, f"the example leaves fds open: {left_open}"
    finally:
        # A Kvm, Vm or Vcpu left open warns when collected; collected here,
        # inside the test, the ResourceWarning fails it (filterwarnings = error).
        namespace.clear()
        gc.collect()


def test_examples_that_open_dev_kvm_are_marked():
    opens = {name for name, b in EXAMPLES.items() if re.search(r"\bKvm\(", b.code)}
    marked = {name for name, b in EXAMPLES.items() if needs_kvm(b)}
    assert opens <= marked, f"start these with {NEEDS_KVM!r}: {sorted(opens - marked)}"
    assert marked <= opens, f"these are marked but open no Kvm(): {sorted(marked - opens)}"


def test_readme_has_a_two_command_quick_start():
    quick = re.search(r"^## Quick start\n\n```sh\n(.*?)^```", (ROOT / "README.md").read_text(),
                      flags=re.S | re.M)
    assert quick is not None, "README.md needs '## Quick start' followed by a ```sh block"
    assert quick.group(1).strip().splitlines() == QUICK_START


def slugs(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of *path* (a repeated one gets -1, -2, ...)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        anchors.add(f"{slug}-{n}" if n else slug)
        seen[slug] = n + 1
    return anchors


@pytest.mark.parametrize("doc", LINKING, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_local_links_point_at_files_that_exist(doc):
    broken = []
    text = re.sub(r"`[^`]+`", "", prose(doc))       # a link in a code span is no link
    inline = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)    # [text](target)
    defined = re.findall(r"^ {0,3}\[[^\]]+\]:\s*(\S+)", text, flags=re.M)  # [ref]: target
    for target in inline + defined:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):     # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file).resolve() if file else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in slugs(linked):
            broken.append(f"{target}: {linked.name} has no heading #{anchor}")
    assert not broken, f"{doc.name}: {broken}"


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    return [expanded for choice in match.group(1).split(",")
            for expanded in _expand_braces(pattern[:match.start()] + choice
                                           + pattern[match.end():])]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_repository_paths_in_the_docs_exist(doc):
    missing = []
    for span in code_spans(doc):
        if not re.match(rf"^(?:{'|'.join(map(re.escape, REPO_DIRS))})/\S+$", span):
            continue
        path, _, test = span.partition("::")
        for pattern in _expand_braces(path):
            found = glob.glob(str(ROOT / pattern))
            if not found:
                missing.append(span)
            elif test:       # a test, or a prefix of test names ending in *
                name = re.match(r"\w+", test)
                if name is None or not any(f"def {name.group()}" in Path(f).read_text()
                                           for f in found):
                    missing.append(span)
    assert not missing, f"{doc.name} names what the repository does not have: {missing}"


def resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_kvmcoal_names_in_the_docs_exist(doc):
    missing = []
    for span in code_spans(doc):
        name = re.match(r"^(kvmcoal(?:\.\w+)+)(?:\(.*\))?$", span)
        if name is None:
            continue
        try:
            resolve(name.group(1))
        except (ImportError, AttributeError) as exc:
            missing.append(f"{span} ({exc})")
    assert not missing, f"{doc.name} names what kvmcoal does not have: {missing}"


def test_no_doc_calls_this_host_nested_amd():
    # /dev/kvm on the development machine is served by kvm_pvm, not by a
    # nested kvm_amd: a figure said to come from there would mislead.
    wrong = [doc.relative_to(ROOT).as_posix() for doc in DOCS
             if re.search(r"nested\s+amd", doc.read_text(), flags=re.I)]
    assert not wrong


STUBS = sorted((ROOT / "kvmcoal").rglob("*.pyi"))


@pytest.mark.parametrize("stub", STUBS, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_in_the_type_stubs_run(stub):
    """The compiled modules' docs live in their .pyi stubs, which pytest's doctest
    collector does not read: run their examples against the real module."""
    import ast
    import doctest

    module = importlib.import_module(
        ".".join(stub.relative_to(ROOT).with_suffix("").parts))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tree = ast.parse(stub.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
            doc = ast.get_docstring(node)
            if doc and ">>>" in doc:
                name = getattr(node, "name", stub.name)
                runner.run(doctest.DocTestParser().get_doctest(
                    doc, dict(vars(module)), name, str(stub), node.lineno))
    assert runner.failures == 0, f"{runner.failures} example(s) in {stub.name} failed"
    assert runner.tries >= stub.read_text().count(">>> "), "an example was not found"
