"""Cutting code that is not Python into snippets: language by file extension, then a generic cutter.

Python goes through its own parser (seeds.cut_text: whole functions and classes). Every other language goes
through one of two generic cutters, chosen by the language's block syntax:
  brace languages (C, C++, Java, JS/TS, Go, Rust, C#, Kotlin, Swift, Scala, PHP): a top-level `{...}` block
      with the lines just above it that belong to it (signature, annotations, doc comment); a block longer
      than max_lines is opened up into its inner blocks (a class into its methods, a namespace into classes);
  the rest (Ruby, shell, Lua, R, Julia, SQL, unknown): a paragraph that starts at column 0 and runs to the
      blank line before the next column-0 line, so indented bodies stay with their header.
Strings and comments are skipped when counting braces; a file whose braces do not balance yields nothing.
"""
from __future__ import annotations

import re
from bisect import bisect_left
from pathlib import PurePosixPath

LANGUAGES = {
    ".py": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp",
    ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".cs": "csharp", ".go": "go", ".rs": "rust",
    ".kt": "kotlin", ".swift": "swift", ".scala": "scala", ".php": "php", ".rb": "ruby", ".sh": "shell",
    ".bash": "shell", ".lua": "lua", ".jl": "julia", ".r": "r", ".sql": "sql",
}
BRACE_LANGUAGES = {"javascript", "typescript", "java", "c", "cpp", "csharp", "go", "rust", "kotlin", "swift",
                   "scala", "php"}
_SINGLE_QUOTE_STRINGS = {"javascript", "typescript", "php"}  # elsewhere ' is a char literal or a lifetime
_CHAR_LITERAL = re.compile(r"'(?:\\.[^']{0,8}|[^\\'])'")
_CONTAINER = re.compile(r"\b(class|struct|interface|impl|namespace|module|object|trait|enum|extension|protocol|"
                        r"record|extern)\b")  # blocks worth opening up when too long (not an if/for body)
_ALIASES = {"py": "python", "python3": "python", "js": "javascript", "ts": "typescript", "c++": "cpp",
            "c#": "csharp", "golang": "go", "bash": "shell", "sh": "shell"}


def language_of(path: str) -> str:
    """The language of a file by its extension ('' when the extension is not code)."""
    return LANGUAGES.get(PurePosixPath(path).suffix.lower(), "")


def normalize_language(name: str) -> str:
    """A dataset's language label ('Python', 'C++', 'js') as a LANGUAGES value, or 'text' if unknown."""
    name = str(name).strip().lower()
    name = _ALIASES.get(name, name)
    return name if name in set(LANGUAGES.values()) else "text"


def cut_spans(text: str, lang: str, min_lines: int, max_lines: int) -> list[tuple[int, int, str]]:
    """(first line (1-based), line count, reason) of each candidate snippet; reason '' keeps it,
    else too_short / too_long."""
    lines = text.splitlines()
    if lang in BRACE_LANGUAGES:
        blocks = _brace_blocks(lines, single_quote_strings=lang in _SINGLE_QUOTE_STRINGS)
        if blocks is None:
            return []
        ends = sorted(b[1] for b, _, _ in blocks)
        # a header never reaches above the enclosing block's opening or the block that closed last before
        # it: each snippet starts on a line of its own (`{..},` rows of an initializer stay apart)
        spans = [(_attach_header(lines, b[0], max(floor, ends[bisect_left(ends, b[0]) - 1] if bisect_left(ends, b[0]) else -1)),
                  b[0], b[1], depth) for b, floor, depth in blocks]
    else:
        spans = [(s, s, e, 0) for s, e in _paragraphs(lines)]
    out: list[tuple[int, int, str]] = []

    def visit(depth: int, lo: int, hi: int) -> None:
        for start, opens, end, d in spans:
            if d != depth or start < lo or end > hi:
                continue
            n = end - start + 1
            if n > max_lines and _CONTAINER.search(" ".join(lines[start:opens + 1])):
                visit(depth + 1, start, end)  # a big class or namespace still has good methods
                continue
            if all(start + 1 != o[0] for o in out):  # one snippet per first line: its seed id is (path, line)
                out.append((start + 1, n, "too_short" if n < min_lines else "too_long" if n > max_lines else ""))

    visit(0, 0, len(lines))
    return out


def _brace_blocks(lines: list[str], single_quote_strings: bool) -> list | None:
    """((open line, close line), line of the enclosing block's opening brace or -1, depth) of every brace
    block, 0-based; None when the braces do not balance."""
    stack: list[int] = []
    blocks = []
    quote, block_comment = "", False
    for ln, line in enumerate(lines):
        i = 0
        while i < len(line):
            if block_comment:
                j = line.find("*/", i)
                if j < 0:
                    break
                block_comment, i = False, j + 2
                continue
            c = line[i]
            if quote:
                if c == "\\":
                    i += 2
                    continue
                if c == quote:
                    quote = ""
                i += 1
                continue
            if line.startswith("//", i):
                break
            if line.startswith("/*", i):
                block_comment, i = True, i + 2
                continue
            if c == "'" and not single_quote_strings:
                m = _CHAR_LITERAL.match(line, i)
                i = m.end() if m else i + 1  # a char literal, or a Rust lifetime: no string follows
                continue
            if c in "\"'`":
                quote = c
            elif c == "{":
                stack.append(ln)
            elif c == "}":
                if not stack:
                    return None
                start = stack.pop()
                blocks.append(((start, ln), stack[-1] if stack else -1, len(stack)))
            i += 1
        if quote in ("'", '"'):
            quote = ""  # only template strings (`) span lines
    return None if stack or block_comment else blocks


def _attach_header(lines: list[str], open_line: int, floor: int, most: int = 6) -> int:
    """The first line of a block that opens on `open_line`: walk up over the lines that belong to it (a
    signature split over lines, annotations, a doc comment), stopping at a blank line, a line that ends a
    statement or block, or the enclosing block's opening line (`floor`)."""
    start = open_line
    while start - 1 > floor and open_line - (start - 1) <= most:
        prev = lines[start - 1].rstrip()
        if not prev.strip() or prev.endswith((";", "}", "{")):
            break
        start -= 1
    return start


def _paragraphs(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) 0-based lines of each column-0 paragraph (see the module docstring)."""
    spans: list[tuple[int, int]] = []
    start = last = None
    for ln, line in enumerate(lines):
        if not line.strip():
            continue
        top = not line[0].isspace()
        if start is not None and top and last is not None and last < ln - 1:
            spans.append((start, last))
            start = None
        if start is None:
            start = ln
        last = ln
    if start is not None:
        spans.append((start, last))
    return spans
