"""README.md and DESIGN.md cannot drift from the code or from each other. Fast lane.

Names. Every backticked span of README.md and DESIGN.md that is
  (a) `from M import N` or `from M import N1, N2` with M under one of the project's top-level
      packages (PACKAGES): M imports and each N is an attribute (or submodule) of it; or
  (b) a dotted name `p.a.b` (optionally ending in `()`), p one of PACKAGES, whose last part is not
      a file extension (`export.py`, `weights.bin` are files, not names): the longest prefix that
      imports as a module imports, and the rest resolves by getattr (a function, class, constant,
      or a class's attribute)
must resolve, under the var_ssg namespace the distribution installs (`graphs.dse_matrix` is
var_ssg.graphs.dse_matrix; a span may also spell the `var_ssg.` prefix). Anything else in backticks (shell commands, file paths, JSON keys) is not a name.

Sections. A cross-reference is a document name (`DESIGN.md`, `DESIGN`, `README.md`, `README`),
optionally a comma, one space, then a section title in double quotes, e.g. DESIGN.md "Layers" or
(README, "Serving"), as written in the two documents, in every .py file of the project and in
pyproject.toml. The title must be one of the target document's sections: a markdown heading's
text (`## Title`; a heading's subtitle after ": " or " (" is not part of its title), or a bold
lead-in (a line or list item that starts with `**Title**`, the title without a trailing "." or
":"), matched exactly. An unquoted reference such as `(DESIGN.md, start-up)` is refused: quote
the title so this test can check it.
"""
import importlib
import os
import re

import pytest

# references known to be missing, each removed when fixed (the test fails when one is fixed and
# still listed, so the list only shrinks)
PENDING = set()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "DESIGN.md")
PACKAGES = ("common", "cluster", "graphs", "contract", "export", "runtime", "tools", "evaluation", "benchmarks",
            "serving")
FILE_EXTS = {"py", "sh", "json", "onnx", "npz", "npy", "png", "md", "bin", "plan", "cache", "toml", "txt", "lock",
             "pth", "safetensors", "log", "csv", "yaml", "pt"}
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?")
FROM_IMPORT = re.compile(r"from ([A-Za-z_][\w.]*) import ([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*)")
REF = re.compile(r"\b(DESIGN|README)(?:\.md)?,? \"([^\"\n]+)\"")
UNQUOTED_REF = re.compile(r"\((DESIGN|README)(?:\.md)?, [A-Za-z][^\"()\n]*\)")


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _spans(text):
    return re.findall(r"`([^`\n]+)`", text)


def cited_names():
    """(doc, span, module, attribute path) for every name the rule above picks out."""
    out = []
    for doc in DOCS:
        for span in _spans(_read(doc)):
            if span.startswith("from var_ssg."):
                span = "from " + span.removeprefix("from var_ssg.")
            span = span.removeprefix("var_ssg.")
            m = FROM_IMPORT.fullmatch(span)
            if m and m.group(1).split(".")[0] in PACKAGES:
                out += [(doc, span, m.group(1), [n]) for n in m.group(2).split(", ")]
            elif DOTTED.fullmatch(span):
                parts = span.removesuffix("()").split(".")
                if parts[0] in PACKAGES and parts[-1] not in FILE_EXTS:
                    out.append((doc, span, None, parts))
    return out


def resolve(module, parts):
    """Import the longest module prefix, getattr the rest; the error says what is missing."""
    if module is not None:
        obj, rest, where = importlib.import_module(f"var_ssg.{module}"), parts, module
    else:
        for i in range(len(parts), 0, -1):
            name = ".".join(parts[:i])
            try:
                obj = importlib.import_module(f"var_ssg.{name}")
            except ModuleNotFoundError as e:
                if e.name is not None and not f"var_ssg.{name}".startswith(e.name) and e.name != f"var_ssg.{name}":
                    raise                      # the module exists but one of its imports is missing
                continue
            rest, where = parts[i:], name
            break
        else:
            raise AssertionError(f"no module {parts[0]}")
    for p in rest:
        if not hasattr(obj, p):
            try:
                obj = importlib.import_module(f"var_ssg.{where}.{p}")
            except ModuleNotFoundError:
                raise AssertionError(f"{where} has no {p}") from None
        else:
            obj = getattr(obj, p)
        where = f"{where}.{p}"
    return obj


@pytest.mark.parametrize("doc,span,module,parts", cited_names(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_cited_name_imports(doc, span, module, parts):
    resolve(module, parts)


def sections(doc):
    """The titles a cross-reference may name in `doc` (the rule in the module docstring)."""
    titles = set()
    for line in _read(doc).splitlines():
        h = re.match(r"#{1,6} (.+)", line)
        if h:
            titles.add(re.split(r": | \(", h.group(1).strip(), maxsplit=1)[0])
        b = re.match(r"\s*(?:- )?\*\*([^*]+)\*\*", line)
        if b:
            titles.add(b.group(1).strip().rstrip(".:"))
    return titles


def reference_sources():
    files = list(DOCS) + ["pyproject.toml"]
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("build", "__pycache__")]
        files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names if n.endswith(".py")]
    return sorted(set(files) - {os.path.join("tests", "test_docs.py")})      # this file shows the forms


def cross_references():
    out = []
    for f in reference_sources():
        text = _read(f)
        for m in REF.finditer(text):
            out.append((f, text.count("\n", 0, m.start()) + 1, m.group(1) + ".md", m.group(2)))
    return out


def test_the_rules_find_what_they_should():
    """The rules themselves, on the forms the documents use."""
    names = {(span, module) for _, span, module, _ in cited_names()}
    assert ("graphs.config.get_preset", None) in names and ("graphs.dse_matrix", None) in names
    assert not any(span.endswith(".py") for span, _ in names)
    assert {"Layers", "Parity bounds", "Export cost"} <= sections("DESIGN.md")
    refs = {(doc, title) for _, _, doc, title in cross_references()}
    assert ("DESIGN.md", "Layers") in refs and ("DESIGN.md", "What the hashes promise") in refs
    assert REF.search('(README, "Serving")') and UNQUOTED_REF.search("(DESIGN.md, start-up)")
    with pytest.raises(AssertionError, match="graphs.config has no no_such_name"):
        resolve(None, ["graphs", "config", "no_such_name"])


def test_every_cross_referenced_section_exists():
    have = {doc: sections(doc) for doc in DOCS}
    refs = cross_references()
    missing = [f"{f}:{line}: {doc} \"{title}\"" for f, line, doc, title in refs
               if title not in have[doc] and (f, doc, title) not in PENDING]
    assert not missing, "sections that do not exist:\n" + "\n".join(missing)
    gone = PENDING - {(f, doc, title) for f, _, doc, title in refs if title not in have[doc]}
    assert not gone, f"fixed: remove {sorted(gone)} from PENDING"


def test_sections_are_cited_in_quotes():
    bad = [f"{f}: {m.group(0)}" for f in reference_sources() for m in UNQUOTED_REF.finditer(_read(f))]
    assert not bad, "quote the section title:\n" + "\n".join(bad)


def test_the_package_version_follows_the_changelog():
    """pyproject's version is past the CHANGELOG's last release, and a development version while
    the CHANGELOG has an Unreleased section (it once said 0.1.0 after 0.3 was released)."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(\.dev\d+)?", version)
    assert m, f"version {version!r} is not MAJOR.MINOR.PATCH[.devN]"
    heads = re.findall(r"^## (.+)$", _read("CHANGELOG.md"), flags=re.M)
    released = [tuple(int(x) for x in h.split(".")) for h in heads if re.fullmatch(r"\d+(\.\d+)*", h)]
    last = max(released)
    ours = tuple(int(x) for x in m.groups()[:3])
    assert ours > last + (0,) * (3 - len(last)), f"version {version} is not after the CHANGELOG's {last}"
    assert ("Unreleased" in heads) == bool(m.group(4)), "an Unreleased section goes with a .devN version"


def test_every_cited_project_file_exists():
    """A path into the project's own folders (`tests/…py`, `scripts/…`, `graphs/…py`, …) named in
    the documents or in the code is a file of this checkout (a part in capitals, like
    scripts/NAME.py, is a placeholder, not a path)."""
    folders = "|".join(("tests", "scripts", "docs") + PACKAGES)
    path = re.compile(rf"(?<![\w./-])(?:{folders})/[\w/.-]*\w\.(?:py|sh|png|md)\b")
    missing = sorted({f"{f}: {m.group(0)}" for f in reference_sources() for m in path.finditer(_read(f))
                      if not os.path.exists(os.path.join(ROOT, m.group(0)))
                      and not re.search(r"/[A-Z_]+(?:\.|/)", m.group(0))})
    assert not missing, "files that do not exist:\n" + "\n".join(missing)
