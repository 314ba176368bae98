"""The synthesizer's output layout and its parser, on real-looking completions."""
import pytest

from scoder_ray.prompts import parse_sample, parse_solution, synthesizer_prompt, synthesizer_response

SNIPPET = "def area(w, h):\n    if w < 0 or h < 0:\n        raise ValueError('negative size')\n    return w * h\n"
GOOD = """### Problem
Write a function `perimeter(w, h)` that returns the perimeter of a rectangle and raises ValueError
for negative sides.

### Solution
```python
def perimeter(w, h):
    if w < 0 or h < 0:
        raise ValueError("negative size")
    return 2 * (w + h)
```
"""


@pytest.mark.parametrize("text, reason", [
    (GOOD, ""),
    (GOOD + "\nSome closing remarks.\n", ""),
    (GOOD.replace("### Problem", "## Problem:").replace("### Solution", "## Solution:"), ""),
    ("### Problem\nWrite perimeter(w, h).\n", "missing_sections"),  # no solution section
    ("### Problem\nWrite perimeter(w, h).\n\n### Solution\n```python\ndef perimeter(w, h):\n    return 2 * (w + h)\n",
     "unterminated_code"),
    ("Sure! Here is a nice problem about rectangles and a solution that computes the perimeter.", "missing_sections"),
    ("### Problem\nWrite perimeter(w, h).\n\n### Solution\nJust add the sides twice.\n", "missing_code"),
    ("### Problem\nWrite perimeter(w, h).\n\n### Solution\n```python\ndef perimeter(w, h)\n    return 2 * (w + h)\n```\n",
     "solution_syntax_error"),
    ("### Problem\n\n### Solution\n```python\nx = 1\n```\n", "empty_problem"),
    ("### Problem\nWrite perimeter.\n\n### Solution\n```python\n\n```\n", "empty_solution"),
    ("### Problem\nExplain this:\n" + SNIPPET + "\n### Solution\n```python\n" + SNIPPET + "```\n", "problem_restates_snippet"),
])
def test_parser_table(text, reason):
    problem, solution, got = parse_sample(text, SNIPPET)
    assert got == reason
    if not reason:
        assert problem.startswith("Write a function `perimeter") and solution.startswith("def perimeter")


def test_training_layout_round_trips_through_the_parser():
    response = synthesizer_response("Write perimeter(w, h).", "def perimeter(w, h):\n    return 2 * (w + h)\n")
    assert parse_sample(response, SNIPPET) == ("Write perimeter(w, h).", "def perimeter(w, h):\n    return 2 * (w + h)", "")
    assert SNIPPET.strip() in synthesizer_prompt(SNIPPET)


def test_scoder_solution_parser():
    assert parse_solution("Here:\n```python\nprint(1)\n```\nDone.") == ("print(1)\n", "")
    assert parse_solution("   ")[1] == "empty_solution"


def test_the_instruction_is_a_built_in_or_your_template_and_its_sentences_are_echoes():
    from scoder_ray.config import QualityConf
    from scoder_ray.prompts import INSTRUCTIONS, SYNTH_INSTRUCTION, instruction, instruction_problem
    from scoder_ray.quality import ECHO_PHRASES, echo_phrases, gate

    assert instruction("default") == SYNTH_INSTRUCTION and synthesizer_prompt(SNIPPET) == synthesizer_prompt(SNIPPET, "python", SYNTH_INSTRUCTION)
    examples = synthesizer_prompt(SNIPPET, "python", instruction("with_examples"))
    assert "2 to 4 examples" in examples and SNIPPET.strip() in examples and "### Solution" in examples
    assert all(instruction_problem(t) == "" for t in INSTRUCTIONS.values())
    mine = ("Study this {lang} code and invent a harder exercise for a job interview.\n```{lang}\n{snippet}\n```\n"
            "Reply as:\n### Problem\n<statement>\n\n### Solution\n```python\n<code>\n```")
    assert instruction(mine) == mine and instruction_problem(mine) == ""
    assert synthesizer_prompt(SNIPPET, "rust", mine).startswith("Study this rust code")
    echoes = echo_phrases(mine)
    assert echoes[:len(ECHO_PHRASES)] == ECHO_PHRASES and "study this code and invent a harder exercise for a job interview" \
        not in echoes  # {lang} cut out: the sentence is split there, as a model echoing it fills it in
    assert "code and invent a harder exercise for a job interview" in echoes
    problem = "Study this Python code and invent a harder exercise for a job interview. Then sum a list of numbers."
    solution = "def total(xs):\n    return sum(xs)\n"
    assert gate(problem, solution, None, QualityConf()) == ""  # the default instruction's echoes miss it
    assert gate(problem, solution, None, QualityConf(), echoes=echoes) == "prompt_echo"
    assert parse_sample(synthesizer_response(problem, solution), None, QualityConf(), None, echoes)[2] == "prompt_echo"
    # its example `assert add(2, 3) == 5` is code a real problem may hold: not an echo
    assert echo_phrases(instruction("with_examples"))[len(ECHO_PHRASES):] == tuple(sorted({
        "end the problem statement with 2 to 4 examples that the solution passes, each on its own line as a plain python "
        "assert statement, such as",
        "create a new, self-contained python programming problem inspired by it, and write a correct, complete solution"}))
