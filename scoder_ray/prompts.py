"""Prompt templates and the completion parser: one place, shared by training and generation.

The synthesizer sees a seed snippet and answers in a fixed layout that `parse_sample` reads back:

    ### Problem
    <a self-contained problem statement>

    ### Solution
    ```python
    <a complete Python solution>
    ```

The SCoder model sees a problem and answers with one fenced Python block.
"""
from __future__ import annotations

import ast
import re
from typing import Optional

SYNTH_INSTRUCTION = (
    "Below is a code snippet. Create a new, self-contained Python programming problem inspired by it, "
    "and write a correct, complete solution.\n\n"
    "Snippet:\n```{lang}\n{snippet}\n```\n\n"
    "Answer in exactly this layout:\n"
    "### Problem\n<the problem statement>\n\n"
    "### Solution\n```python\n<the solution>\n```"
)
# `prompts.synthesizer: with_examples`: the same request, and the problem ends with examples its solution passes,
# one `assert` a line, which the sandbox checks every sample against (score/execution.py) -- with
# `quality.require_examples` a problem without them is rejected. paper-7b's choice (README "Choices").
SYNTH_INSTRUCTION_EXAMPLES = (
    "Below is a code snippet. Create a new, self-contained Python programming problem inspired by it, "
    "and write a correct, complete solution. End the problem statement with 2 to 4 examples that the solution "
    "passes, each on its own line as a plain Python assert statement, such as: assert add(2, 3) == 5\n\n"
    "Snippet:\n```{lang}\n{snippet}\n```\n\n"
    "Answer in exactly this layout:\n"
    "### Problem\n<the problem statement>\n\n"
    "### Solution\n```python\n<the solution>\n```"
)
INSTRUCTIONS = {"default": SYNTH_INSTRUCTION, "with_examples": SYNTH_INSTRUCTION_EXAMPLES}
SCODER_INSTRUCTION = "{problem}"
# The layout as a regex, for guided decoding (`teacher.constrain_layout`, `sample.constrain_layout`): a weak
# model then always writes the two sections and a closed fence; whether the code is valid Python is still
# for `parse_sample` to judge.
LAYOUT_REGEX = r"### Problem\n[^#`]+\n\n### Solution\n```python\n[^`]+\n```"
# A prompt the model's context cannot hold (our engines do not send it; a teacher refuses it): the finish reason of
# its empty answer, and the row's rejection reason.
PROMPT_TOO_LONG = "prompt_too_long"
PROBLEM_HEADER = "### Problem"
SOLUTION_HEADER = "### Solution"


def instruction(choice: str) -> str:
    """`prompts.synthesizer`'s template: a built-in by name (INSTRUCTIONS), else the text itself."""
    return INSTRUCTIONS.get(choice, choice)


def instruction_problem(template: str) -> str:
    """What is wrong with a template the teacher and the synthesizer would answer ('' if nothing): it must hold
    {snippet}, may hold {lang}, and must ask for the layout `parse_sample` reads."""
    try:
        template.format(snippet="", lang="")
    except (KeyError, IndexError, ValueError) as e:
        return (f"holds {e} where only {{snippet}} and {{lang}} are filled in (write a literal brace as {{{{ or }}}})"
                if isinstance(e, (KeyError, IndexError)) else f"is not a format string ({e})")
    if "{snippet}" not in template:
        return "does not hold {snippet}, the seed the sample is inspired by"
    if PROBLEM_HEADER not in template or SOLUTION_HEADER not in template:
        return (f"does not ask for the layout the parser reads ({PROBLEM_HEADER!r}, then {SOLUTION_HEADER!r} with one "
                "```python block)")
    return ""


def synthesizer_prompt(snippet: str, lang: Optional[str] = "python", template: str = SYNTH_INSTRUCTION) -> str:
    """The user message that asks for a (problem, solution) pair inspired by `snippet` (written in `lang`:
    seeds may be in any language; the problem and solution are Python, what the SCoder model is for). `template`:
    `instruction(cfg.prompts.synthesizer)`, the same for the teacher, training and sampling."""
    return template.format(snippet=snippet.strip("\n"), lang=lang or "python")


def synthesizer_response(problem: str, solution: str) -> str:
    """The target layout the synthesizer learns to write (and `parse_sample` reads)."""
    return f"{PROBLEM_HEADER}\n{problem.strip()}\n\n{SOLUTION_HEADER}\n```python\n{solution.strip()}\n```"


def scoder_prompt(problem: str) -> str:
    return SCODER_INSTRUCTION.format(problem=problem.strip())


def scoder_response(solution: str) -> str:
    return f"```python\n{solution.strip()}\n```"


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}]


# -- parsing -----------------------------------------------------------------------------------------
_SECTIONS = re.compile(r"^#{2,4}\s*Problem\s*:?\s*$(?P<problem>.*?)^#{2,4}\s*Solution\s*:?\s*$(?P<solution>.*)",
                       re.MULTILINE | re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(?P<code>.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)


def parse_sample(text: str, snippet: Optional[str] = None, quality=None, index=None,
                 echoes: Optional[tuple[str, ...]] = None) -> tuple[str, str, str]:
    """(problem, solution, reason) from a synthesizer completion; reason is '' when it parses.

    Rejected: no Problem/Solution sections, an empty problem, a solution without a closed code fence,
    an empty solution, a solution that is not valid Python, a problem that restates the snippet; with
    `quality` (a QualityConf), every gate of quality.py (placeholders, echoes of the instruction -- `echoes`, from
    `quality.echo_phrases` -- seed copies...).
    """
    m = _SECTIONS.search(text)
    if not m:
        return "", "", "missing_sections"
    problem = m.group("problem").strip()
    if not problem:
        return "", "", "empty_problem"
    body = m.group("solution")
    fence = _FENCE.search(body)
    if not fence:
        return problem, "", "unterminated_code" if "```" in body else "missing_code"
    solution = fence.group("code").strip("\n")
    if not solution.strip():
        return problem, "", "empty_solution"
    try:
        ast.parse(solution)
    except (SyntaxError, ValueError):
        return problem, solution, "solution_syntax_error"
    if snippet and restates(problem, snippet):
        return problem, solution, "problem_restates_snippet"
    if quality is not None:
        from scoder_ray.quality import gate

        return problem, solution, gate(problem, solution, snippet, quality, index, echoes)
    return problem, solution, ""


def restates(problem: str, snippet: str, threshold: float = 0.6) -> bool:
    """Whether the problem is mostly the snippet's own code lines pasted back."""
    lines = {line.strip() for line in snippet.splitlines() if len(line.strip()) > 8}
    if not lines:
        return False
    found = sum(1 for line in lines if line in problem)
    return found / len(lines) >= threshold


def parse_solution(text: str) -> tuple[str, str]:
    """(code, reason) from a SCoder completion: the first fenced block, or the whole text if none."""
    fence = _FENCE.search(text)
    code = fence.group("code") if fence else text
    if not code.strip():
        return "", "empty_solution"
    return code, ""
