"""How often the problem-text gate `dangling_reference` fires, where it should and where it should not; and
where the solution gate `undefined_name` fires on real modules.

    .venv/bin/python bench/gates.py [CODE_ALPACA_JSON ...]
    .venv/bin/python bench/gates.py names [FOLDER ...]

CODE_ALPACA_JSON: Code Alpaca's data files (github.com/sahil280114/codealpaca, data/new_codealpaca.json and
data/code_alpaca_2k.json: records with `instruction` and `input`). An instruction whose `input` holds the code
it is about, and which itself refers to code but holds none, must be caught once the input is left out (the
catch rate); one without an input is self-contained and should pass (the false alarms, printed to read), and goes through
every problem-side gate too (counts by reason: `problem_not_prose` takes those under 6 words).
Without files, only the second check: the first sentences of every documented function and class of the
standard library, read as problems (printed: most that fire say "the above ...").
`names`: every module under FOLDER (default: the stdlib, with its site-packages) read as a solution; each that
fires is printed with its names, to read whether each is truly missing when its line runs.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
import sysconfig
from collections import Counter

from scoder_ray.config import QualityConf
from scoder_ray.quality import dangling_reference, gate, holds_code, undefined_names
from scoder_ray.seeds import first_sentence

REFERS_TO_CODE = re.compile(r"\b(?:given|following|below|provided|previous|existing|attached|above)\s+(?:\w+\s+)?"
                            r"(?:code|snippet|program|script)|\bthe above\b|\b(?:code|snippet)\s+(?:above|below)", re.I)


def code_alpaca(paths: list[str]) -> None:
    rows = [r for p in paths for r in json.load(open(p, encoding="utf-8"))]
    needs_input = [r["instruction"] for r in rows if r["input"].strip() and REFERS_TO_CODE.search(r["instruction"])
                   and not holds_code(r["instruction"])]
    caught = sum(bool(dangling_reference(x)) for x in needs_input)
    alone = [r["instruction"] for r in rows if not r["input"].strip()]
    fired = [x for x in alone if dangling_reference(x)]
    print(f"instructions about code held in `input`, left without it: {caught}/{len(needs_input)} caught "
          f"({caught / max(1, len(needs_input)):.1%})")
    print(f"self-contained instructions (no `input`): {len(fired)}/{len(alone)} caught")
    for x in fired:
        print("   ", x[:140].replace("\n", " "))
    # Every gate on the problem's side (the solution a trivial one): what real instructions lose, by reason.
    reasons = Counter(gate(x, "def f():\n    return 1\n", None, QualityConf(check_definitions=False)) or "passed"
                      for x in alone)
    print("self-contained instructions through every problem-side gate:", dict(reasons.most_common()))


def stdlib() -> None:
    n, fired = 0, []
    for folder, _, files in os.walk(sysconfig.get_paths()["stdlib"]):
        for name in files:
            try:
                tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read()) if name.endswith(".py") else None
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree) if tree else ():
                doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
                if doc:
                    n += 1
                    sentence = first_sentence(doc)
                    if dangling_reference(sentence):
                        fired.append(sentence)
    print(f"standard library docstrings' first sentences: {len(fired)}/{n} caught")
    for x in fired:
        print("   ", x[:140])


def names(folders: list[str]) -> None:
    n, modules, fired = 0, 0, Counter()
    for root in folders or [sysconfig.get_paths()["stdlib"]]:
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(f for f in files if f.endswith(".py")):
                try:
                    src = open(os.path.join(folder, name), encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue
                n += 1
                missing = undefined_names(src)
                if missing:
                    modules += 1
                    fired.update(missing)
                    print(f"   {os.path.relpath(os.path.join(folder, name), root)}: {', '.join(missing[:8])}")
    print(f"modules where undefined_name fires: {modules}/{n}; most common names: {dict(fired.most_common(8))}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["names"]:
        names(sys.argv[2:])
        sys.exit()
    if sys.argv[1:]:
        code_alpaca(sys.argv[1:])
    stdlib()
