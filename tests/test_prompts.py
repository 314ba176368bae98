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
