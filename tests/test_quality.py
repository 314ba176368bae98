"""Quality gates on real-looking bad outputs: each is dropped with its reason, good samples pass."""
import json

import pandas as pd
import pytest

from scoder_ray.config import QualityConf
from scoder_ray.evaluate.benchmarks import load_humaneval
from scoder_ray.prompts import SYNTH_INSTRUCTION, parse_sample, synthesizer_response
from scoder_ray.quality import contamination_index, decontam_report, gate, near_duplicates, seed_similarity
from scoder_ray.score.stage import judge_signal

SNIPPET = '''def _splitext(p, sep, altsep, extsep):
    """Split the extension from a pathname."""
    sepIndex = p.rfind(sep)
    if altsep:
        altsepIndex = p.rfind(altsep)
        sepIndex = max(sepIndex, altsepIndex)
    dotIndex = p.rfind(extsep)
    if dotIndex > sepIndex:
        return p[:dotIndex], p[dotIndex:]
    return p, p[:0]
'''
GOOD_PROBLEM = ("Write a function `common_suffix(paths)` that returns the longest file extension shared by every "
                "path in the list, or an empty string when they differ.\n\nassert common_suffix(['a.txt', 'b.txt']) == '.txt'")
GOOD_SOLUTION = '''import os


def common_suffix(paths):
    exts = {os.path.splitext(p)[1] for p in paths}
    return exts.pop() if len(exts) == 1 else ""
'''
# A real MBPP problem (Mbpp/2) in the evalplus format, as a user's MbppPlus file holds it.
MBPP_RECORD = {"task_id": "Mbpp/2", "entry_point": "similar_elements",
               "prompt": "Write a function to find the shared elements from the given two lists.",
               "canonical_solution": "def similar_elements(test_tup1, test_tup2):\n  res = tuple(set(test_tup1) & set(test_tup2))\n  return (res) ",
               "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]], "plus_input": [], "atol": 0}


def sample(problem: str, solution: str) -> str:
    return synthesizer_response(problem, solution)


HUMANEVAL_0 = load_humaneval()[0]  # has_close_elements, pasted back as a "new" problem
BAD = [
    ("placeholder", sample("<the problem statement>", GOOD_SOLUTION)),
    ("placeholder", sample(GOOD_PROBLEM, "def common_suffix(paths):\n    # <your code here>\n    pass")),
    ("placeholder", sample("Write a function that parses paths.\n<problem description here>\nIt must be fast.", GOOD_SOLUTION)),
    ("prompt_echo", sample(SYNTH_INSTRUCTION.split("Snippet:")[0] + "Make it about paths and file names please.", GOOD_SOLUTION)),
    ("problem_not_prose", sample("Fix `f`.", GOOD_SOLUTION)),
    ("problem_not_prose", sample("x = splitext(p)\nprint(x)", GOOD_SOLUTION)),
    ("problem_not_prose", sample("```python\ndef common_suffix(paths):\n    pass\n```", GOOD_SOLUTION)),
    # Problems written about the seed snippet, which the dataset does not carry.
    ("dangling_reference", sample("Refactor the following Python code snippet so that it splits paths on every platform.",
                                  GOOD_SOLUTION)),
    ("dangling_reference", sample("Write the above solution using the above solution.", GOOD_SOLUTION)),
    ("dangling_reference", sample("Using the given code, write a function `common_suffix(paths)` that returns the "
                                  "shared extension.", GOOD_SOLUTION)),
    ("dangling_reference", sample("Explain what the code below does, then rewrite it as `common_suffix(paths)`.",
                                  GOOD_SOLUTION)),
    ("seed_copy", sample("Write a function that splits the extension from a pathname and returns both parts.", SNIPPET)),
    ("seed_copy", sample("Write a function that splits the extension from a pathname and returns both parts.",
                         "# my solution\n" + SNIPPET.replace('    """Split the extension from a pathname."""\n', ""))),
    ("missing_definition", sample(GOOD_PROBLEM, "def other(paths):\n    return ''\n")),
    # A NameError the moment the function is called: a module never imported, a class never written.
    ("undefined_name", sample(GOOD_PROBLEM, "def common_suffix(paths):\n    exts = {os.path.splitext(p)[1] for p in paths}\n"
                                            "    return exts.pop() if len(exts) == 1 else ''\n")),
    ("undefined_name", sample(GOOD_PROBLEM, "def common_suffix(paths):\n    return SuffixTrie(paths).longest()\n")),
    ("stub_solution", sample(GOOD_PROBLEM, 'def common_suffix(paths):\n    """Return the shared extension."""\n    pass\n')),
    ("stub_solution", sample(GOOD_PROBLEM, "def common_suffix(paths):\n    raise NotImplementedError('todo')\n")),
    ("stub_solution", sample(GOOD_PROBLEM, "import os\n\n\ndef common_suffix(paths):\n    ...\n\n\n"
                                           "def _helper(p):\n    # TODO\n    pass\n")),
    ("stub_solution", sample("Write a small module that joins file paths for the current platform correctly.",
                             "import os\nimport sys\n")),
    ("infinite_recursion", sample(GOOD_PROBLEM, 'def common_suffix(paths):\n    """Shared extension."""\n'
                                                "    return common_suffix(paths)\n")),
    ("infinite_recursion", sample("Write a class `Stats` whose method `print_line(func)` prints one function's stats.",
                                  "class Stats:\n    def print_line(self, func):\n        self.print_line(func)\n")),
    ("repetitive", sample(GOOD_PROBLEM, 'def common_suffix(paths):\n    """Return the shared extension."""\n'
                          + '    """Return the shared extension."""\n' * 4 + "    return ''\n")),
    ("repetitive", sample("Write a function `common_suffix(paths)` that returns the shared extension of the paths. "
                          + "If the paths are empty, the empty string is returned. " * 3, GOOD_SOLUTION)),
    ("repetitive", sample("Write: Write: Check if a string is a list of strings, in `is_list_of_strings(s)`.",
                          "def is_list_of_strings(s):\n    return isinstance(s, list) and all(isinstance(x, str) for x in s)\n")),
    ("contaminated", sample("Implement the following function so that it passes its doctests, for any list of numbers.\n"
                            + HUMANEVAL_0["prompt"], HUMANEVAL_0["prompt"] + HUMANEVAL_0["canonical_solution"])),
    ("contaminated", sample("Write a function to find the shared elements from the given two lists, as a tuple.",
                            MBPP_RECORD["canonical_solution"])),
]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = tmp_path_factory.mktemp("mbpp") / "MbppPlus.jsonl"
    path.write_text(json.dumps(MBPP_RECORD) + "\n")
    conf = QualityConf()
    return conf, contamination_index(conf, {"mbpp": str(path)}), str(path)


@pytest.mark.parametrize("reason, text", BAD, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD)])
def test_bad_outputs_are_dropped_with_their_reason(reason, text, index):
    conf, idx, _ = index
    assert parse_sample(text, SNIPPET, conf, idx)[2] == reason


def test_a_good_sample_passes_every_gate(index):
    conf, idx, _ = index
    assert parse_sample(sample(GOOD_PROBLEM, GOOD_SOLUTION), SNIPPET, conf, idx) == (GOOD_PROBLEM, GOOD_SOLUTION.strip(), "")
    # Without a QualityConf the parser only parses (the placeholder passes): the gates are opt-in per caller.
    assert parse_sample(sample("<the problem statement>", GOOD_SOLUTION), SNIPPET)[2] == ""


def test_names_are_undefined_only_where_no_statement_binds_them():
    from scoder_ray.quality import undefined_names

    assert undefined_names("def f(xs: List[int]) -> int:\n    return helper(xs) + len(xs)\n") == ["List", "helper"]
    assert undefined_names("class A:\n    def m(self):\n        return B()\n") == ["B"]
    bound = [
        "from __future__ import annotations\ndef f(xs: List[int]) -> Dict:\n    return xs\n",  # annotations unevaluated
        "def f():\n    global COUNT\n    COUNT = 1\n\n\ndef g():\n    return COUNT\n",  # bound through `global`
        "try:\n    import numpy as np\nexcept ImportError:\n    np = None\n\n\ndef f(x):\n    return np.asarray(x)\n",
        "def f(xs):\n    return [(last := x) for x in xs], last\n",  # a walrus binds in the enclosing scope
        "def f(p):\n    match p:\n        case (x, y):\n            return x + y\n",
        "def f():\n    return g()\n\n\ndef g():\n    return __name__\n",  # defined later: bound when called
        "class A:\n    def m(self):\n        return super().m() + [__class__]\n",
        "def top(items):\n    first = items[0]\n    return first\n",  # symtable takes a function named `top` for the module
        "from os.path import *\nprint(join('a', 'b'))\n",  # a star import: not judged
        "exec('x = 1')\nprint(x)\n", "globals()['x'] = 1\nprint(x)\n",  # bound where no statement shows it
        "def f(:\n",  # does not parse: the parser names that
    ]
    assert [code for code in bound if undefined_names(code)] == []
    # A class the problem states in its code block, for the solution to use, is defined; one in prose is not.
    linked = "def length(head):\n    return 0 if head is None else 1 + length(head.next)\n\n\ndef make():\n    return ListNode(1)\n"
    stated = "Count the nodes of a linked list, given\n```python\nclass ListNode:\n    def __init__(self, val, next=None):\n        ...\n```"
    assert undefined_names(linked) == ["ListNode"] and undefined_names(linked, given=stated) == []
    assert undefined_names(linked, given="Count the nodes of a `ListNode` list.") == ["ListNode"]
    assert gate(GOOD_PROBLEM, "def common_suffix(paths):\n    return Trie(paths)\n", None,
                QualityConf(reject_undefined_names=False)) == ""


def test_code_that_does_something_is_not_a_stub():
    from scoder_ray.quality import calls_itself_unchanged, is_repetitive, is_stub

    abstract_and_concrete = ("class Shape:\n    def area(self):\n        raise NotImplementedError\n\n\n"
                             "class Square(Shape):\n    def __init__(self, s):\n        self.s = s\n\n"
                             "    def area(self):\n        return self.s ** 2\n")
    fields_only = "from dataclasses import dataclass\n\n\n@dataclass\nclass Point:\n    x: int\n    y: int\n"
    script = "import sys\nprint(sum(int(x) for x in sys.argv[1:]))\n"
    assert not any(is_stub(code) for code in (GOOD_SOLUTION, abstract_and_concrete, fields_only, script, "def f(:"))
    # Recursion that moves, and a method calling the builtin it is named after, are not infinite recursion.
    moving = "def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)\n\n\ndef walk(node):\n    return walk(node.next)\n"
    builtin_namesake = "class File:\n    def open(self, path):\n        return open(path)\n"
    assert not any(calls_itself_unchanged(code) for code in (moving, builtin_namesake, abstract_and_concrete))
    table = "GRID = [\n" + "    [0, 0, 0, 0, 0, 0],\n" * 6 + "]\n"  # repeated rows of data are not a loop
    assert not is_repetitive(GOOD_PROBLEM, table) and not is_repetitive(GOOD_PROBLEM, GOOD_SOLUTION)
    # A repeated word inside a sentence, or one that differs in case or separator, is no stutter.
    assert not any(is_repetitive(p, GOOD_SOLUTION) for p in ("Write Write-ahead logs to `log(path)` in order, one per line.",
                                                           "Log log lines of `f(x)`.", "Return that that value holds."))
    assert gate(GOOD_PROBLEM, "def common_suffix(paths):\n    pass\n", None, QualityConf(reject_degenerate=False)) == ""


@pytest.mark.parametrize("problem", [
    GOOD_PROBLEM,
    # the code referred to is in the problem: after the words, before them, fenced or inline
    "Refactor the following code so that it runs in linear time:\n\n```python\ndef f(xs):\n    return sorted(xs)[0]\n```",
    "```python\nx = [i * i for i in range(10)]\n```\nRewrite the above code as a generator expression and explain why.",
    "Translate the following Python code into a function with a docstring: `print(sum(range(10)))`",
    # "given"/"provided" code as the function's own input, not a reference outside the problem
    "Write a function that counts the tokens in the given code and returns a dict from token type to count.",
    "Write a function to convert the given Fortran source code into a list of statements, one per line.",
    # other "given"/"following" words
    "Given a list of integers, return the following statistics: mean, median and the mode of the list.",
    "Write a decorator that calls the original function at most once per second and returns its last result.",
])
def test_problems_that_hold_what_they_refer_to_pass(problem):
    from scoder_ray.quality import dangling_reference

    assert dangling_reference(problem) == "" and gate(problem, GOOD_SOLUTION, None, QualityConf()) in ("", "missing_definition")


def test_the_dangling_reference_gate_can_be_turned_off_and_says_what_it_saw():
    from scoder_ray.quality import dangling_reference

    problem = "Fix the bug in the provided Python code so that it returns the shared file extension of every path."
    assert dangling_reference(problem) == "Fix the bug in the provided Python code"
    assert gate(problem, GOOD_SOLUTION, None, QualityConf()) == "dangling_reference"
    assert gate(problem, GOOD_SOLUTION, None, QualityConf(reject_dangling_references=False)) == ""


def test_the_same_code_has_one_key_whatever_its_comments_docstrings_and_case():
    from scoder_ray.quality import code_key

    commented = GOOD_SOLUTION.replace("def common_suffix(paths):\n", 'def Common_Suffix(paths):  # shared\n'
                                      '    """The extension every path has."""\n')
    assert code_key(commented) == code_key(GOOD_SOLUTION)
    assert code_key(GOOD_SOLUTION.replace('""', "None")) != code_key(GOOD_SOLUTION)


def test_seed_similarity_ignores_comments_and_docstrings_but_not_new_code():
    assert seed_similarity(SNIPPET, SNIPPET) == 1.0
    assert seed_similarity("# copied\n" + SNIPPET.replace('"""Split the extension from a pathname."""', '"""Other."""'), SNIPPET) == 1.0
    assert seed_similarity(GOOD_SOLUTION, SNIPPET) < 0.5
    assert gate(GOOD_PROBLEM, SNIPPET, SNIPPET, QualityConf(max_seed_similarity=1.0)) == "missing_definition"  # copy gate off


def test_decontamination_reports_what_it_checked(index, monkeypatch):
    conf, _, path = index
    monkeypatch.delenv("MBPP_OVERRIDE_PATH", raising=False)
    assert decontam_report(conf, {"mbpp": path})["checked"] == ["humaneval", "mbpp"]
    skipped = decontam_report(conf, {})
    assert skipped["checked"] == ["humaneval"] and "MBPP_OVERRIDE_PATH" in skipped["skipped"]["mbpp"]


def test_near_duplicates_within_and_against_a_reference():
    a = GOOD_PROBLEM + "\n" + GOOD_SOLUTION
    a2 = a.replace("or an empty string when they differ", "or an empty string if they differ")
    b = "Write a function that counts the vowels of a string, case-insensitively.\ndef vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())\n"
    assert near_duplicates([a, a2, b], 0.8) == ["", "near_duplicate", ""]
    assert near_duplicates([a, b], 0.8, reference=[a2]) == ["near_duplicate_of_reference", ""]
    assert near_duplicates([a, b], 0.8, reference=[a2], reference_threshold=1.0) == ["", ""]  # reference check off
    assert near_duplicates([a, a2], 1.0) == ["", ""]


def test_a_degenerate_judge_is_flagged():
    names = ["consistency", "relevance", "difficulty"]
    same = pd.DataFrame({f"aspect_{n}": [8] * 20 for n in names})
    flat = judge_signal(same, names, 0.5)
    assert flat["degenerate"] and any("near-constant" in p for p in flat["problems"])
    assert flat["all_aspects_equal_share"] == 1.0
    rows = pd.DataFrame({"aspect_consistency": [i % 10 for i in range(20)], "aspect_relevance": [(i * 3) % 10 for i in range(20)],
                         "aspect_difficulty": [9 - i % 10 for i in range(20)]})
    good = judge_signal(rows, names, 0.5)
    assert not good["degenerate"] and good["aspect_rank_correlation"]["consistency~difficulty"] == -1.0
    one_value_each = pd.DataFrame({f"aspect_{n}": [i % 10 for i in range(20)] for n in names})  # aspects all equal
    assert judge_signal(one_value_each, names, 0.5)["degenerate"]


def test_the_audit_counts_what_a_dataset_holds():
    from scoder_ray.quality import audit

    rows = [{"seed_id": "a", "snippet": SNIPPET, "problem": GOOD_PROBLEM, "solution": GOOD_SOLUTION},
            {"seed_id": "b", "snippet": SNIPPET, "problem": "<the problem statement>", "solution": SNIPPET}]
    rows.append({"seed_id": "b", "problem": GOOD_PROBLEM, "solution": "def common_suffix(paths):\n    ...\n"})
    assert audit(rows, QualityConf()) == {"rows": 3, "placeholders": 1, "prompt_echoes": 0, "seed_copies": 1,
                                          "dangling_references": 0, "with_examples": 2, "stubs": 1, "infinite_recursions": 0, "undefined_names": 0,
                                          "repetitive": 0,
                                          "distinct_seeds": 2}


def test_builtin_teacher_rows_pass_the_gates_and_do_not_copy_their_seed():
    from scoder_ray.seeds import documented_functions

    rows = documented_functions(64)
    assert len(rows) == 64 and len({r["snippet"] for r in rows}) == 64
    assert all(gate(r["problem"], r["solution"], r["snippet"], QualityConf()) == "" for r in rows)
    assert max(seed_similarity(r["solution"], r["snippet"]) for r in rows) < 0.6
    # A problem is the docstring's first sentence, not its first line (which stopped mid-sentence in 39 of 64).
    by_name = {r["problem"].split("`")[1]: r["problem"] for r in rows}
    assert by_name["_is_param_expr"].endswith("``ParamSpec`` or ``_ConcatenateGenericAlias`` from typing.py")
    assert by_name["_rshift_nearest"].endswith("use round-to-even in case of a tie.")
    assert not any(">>>" in p for p in by_name.values())


def test_builtin_teacher_rows_run_alone_in_the_sandbox():
    """Each stand-in sample's solution runs as a module by itself (the bootstrap runs teacher samples in the
    sandbox), and reads no name it lacks: the module imports it needs come first, and a function that needs its
    module's helpers or constants (`def dump(value, fmt=FMT_XML)`, `monthrange` reading `mdays`: 84 of the 108
    rows of the top-level modules before) is not a stand-in sample."""
    import numpy as np

    from scoder_ray.quality import undefined_names
    from scoder_ray.score.execution import execute_batch
    from scoder_ray.seeds import documented_functions

    rows = documented_functions(64) + documented_functions(64, seed="itself")
    out = execute_batch({"problem": np.array([r["problem"] for r in rows], dtype=object),
                         "solution": np.array([r["solution"] for r in rows], dtype=object)}, 5.0, 2)
    assert [(r["problem"], why) for r, v, why in zip(rows, out["exec_verdict"], out["exec_reason"]) if v != "passed"] == []
    assert [r["problem"] for r in rows if undefined_names(r["solution"])] == []
    by_name = {r["problem"].split("`")[1]: r["solution"] for r in rows}
    assert by_name["b64encode"].startswith("import binascii\n\n\ndef b64encode(s, altchars=None):")
    assert by_name["weekday"].startswith("import datetime\n\n\ndef weekday(year, month, day):")
    assert "monthrange" not in by_name  # calendar's helpers (isleap, mdays) are not imports


def test_a_docstrings_first_sentence_spans_its_lines_and_stops_at_a_doctest():
    from scoder_ray.seeds import first_sentence

    assert first_sentence("Closest integer to n.  a is\n    the rest.") == "Closest integer to n."
    assert first_sentence("Return weekday and days for\n    year, month.\n\n    More.") == "Return weekday and days for year, month."
    assert first_sentence("Yield the nodes\n\nthat are fields") == "Yield the nodes"
    assert first_sentence("Read a float.\n>>> read(b'')") == "Read a float." and first_sentence(">>> f()\n1") == ""


def test_diversity_tells_a_synthesizer_repeating_one_template_from_varied_problems():
    from scoder_ray.quality import distinct_ngrams, diversity, narrowing_warning
    from scoder_ray.seeds import documented_functions

    teacher = [r["problem"] for r in documented_functions(64)]
    varied = [r["problem"] for r in documented_functions(128, seed="itself") if r["problem"] not in teacher][:48]
    template = [f"Write a function that returns the sum of the first {i} numbers of a list of integers." for i in range(40)]
    assert distinct_ngrams(["a b c a b c"]) == 3 / 4 and distinct_ngrams([]) == 0.0
    assert distinct_ngrams(["```python\nx = 1\n```\nsum the list"]) == 1.0  # fenced code is not the problem's words
    good, narrow = diversity(varied, teacher), diversity(template, teacher)
    assert good["k"] == len(varied) >= 40 and 0.85 < good["ratio"] <= 1.1 and narrow["k"] == 40 and narrow["ratio"] < 0.4
    assert diversity(varied, teacher) == good  # seeded draws: the same numbers on a rerun
    assert narrowing_warning(good, "the final dataset", 0.75) == []
    assert narrowing_warning(narrow, "the final dataset", 0.0) == []  # off
    (warning,) = narrowing_warning(narrow, "the final dataset", 0.75)
    assert warning.startswith("the final dataset: its problems are much less varied") and "over 40 problems each" in warning
    assert diversity(template[:1], teacher) == {"k": 1, "distinct_3": None, "teacher_distinct_3": None, "ratio": None}


def test_examples_can_be_required():
    no_example = "Write a function `common_suffix(paths)` that returns the longest file extension shared by every path."
    assert gate(no_example, GOOD_SOLUTION, None, QualityConf()) == ""
    assert gate(no_example, GOOD_SOLUTION, None, QualityConf(require_examples=True)) == "no_examples"
    assert gate(GOOD_PROBLEM, GOOD_SOLUTION, None, QualityConf(require_examples=True)) == ""


def test_a_bootstrap_that_kept_nothing_says_what_to_do_about_its_commonest_rejection():
    from scoder_ray.generate.bootstrap import nothing_kept

    message = nothing_kept({"requested": 5, "rejected": {"undefined_name": 4, "placeholder": 1}}, "s3://b/r/rejected")
    assert message.startswith("the bootstrap kept none of its 5 teacher samples (undefined_name 4, placeholder 1;")
    assert "quality.reject_undefined_names=false" in message and "s3://b/r/rejected" in message
