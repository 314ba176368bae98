"""Verdicts decided outside the process that runs untrusted code.

Test code is rewritten into checks: each `assert` becomes the expression the sandboxed program
evaluates (the candidate's call) and an expectation the evaluator keeps to itself (a literal from the
assert, or the reference solution's output from a separate sandbox run, as evalplus does). The program
only reports values, as plain data (None, bool, int, float, str, bytes, and lists, tuples, dicts, sets
of them: `_harness.plain`); a value of any other type is a failure. So a program that forges its
report, patches modules, or returns an object equal to everything gains nothing: it never sees what
it is compared with, and the comparison runs here, on data.

Asserts that cannot be put in that form (loops, helper variables, an expected side that is not a
literal) leave the test code as it is: the program then runs its own tests, and the verdict says
`decided: in-process` — it holds against wrong code, not against code written to cheat.
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence

_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
            ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
        ">=": operator.ge, "is": operator.is_, "is not": operator.is_not,
        "in": lambda a, b: a in b, "not in": lambda a, b: a not in b}


@dataclass(frozen=True)
class Check:
    expr: str  # evaluated in the sandbox, where `candidate` is the entry point
    op: str  # a comparison above, or truthy | falsy | abs_lt | abs_le | isclose | evalplus | record (any value)
    expected: Any = None  # never sent to the sandbox
    tol: Any = None  # abs_*: the bound; isclose: its keyword arguments; evalplus: atol
    line: int = 0


@dataclass(frozen=True)
class CheckedTests:
    """Tests whose verdict the evaluator decides: `entry_point` is bound to `candidate`, `inputs` (plain
    data) to `__inputs__` for the expressions to read."""
    entry_point: str
    checks: tuple
    inputs: Optional[list] = None


class NotCheckable(ValueError):
    """The test code has a statement that cannot be turned into checks."""


_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _literal(node: ast.AST) -> tuple[bool, Any]:
    """(True, value) for a literal, also `3 + 5`, `(2 * 3, 1)` and `tuple([1, 2])`: small constant
    arithmetic only (the test code may be model-written: nothing here may run long)."""
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        (ok_a, a), (ok_b, b) = _literal(node.left), _literal(node.right)
        small = all(type(v) in (int, float) and abs(v) < 1e15 for v in (a, b))
        return (True, _ARITH[type(node.op)](a, b)) if ok_a and ok_b and small else (False, None)
    if isinstance(node, (ast.Tuple, ast.List)):
        parts = [_literal(e) for e in node.elts]
        if all(ok for ok, _ in parts):
            values = [v for _, v in parts]
            return True, tuple(values) if isinstance(node, ast.Tuple) else values
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("tuple", "list", "set") \
            and len(node.args) == 1 and not node.keywords:
        ok, v = _literal(node.args[0])
        if ok and isinstance(v, (list, tuple, set, str)):
            return True, {"tuple": tuple, "list": list, "set": set}[node.func.id](v)
    return False, None


def _check(test: ast.expr, line: int) -> Optional[Check]:
    """One assert's test as a check; None for an assert that always holds (`assert True`)."""
    is_lit, value = _literal(test)
    if is_lit:
        if value:
            return None
        raise NotCheckable(f"line {line}: an assert that always fails")
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return Check(ast.unparse(test.operand), "falsy", line=line)
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        op, left, right = _COMPARE.get(type(test.ops[0])), test.left, test.comparators[0]
        # abs(X - L) < T, math.fabs(L - X) <= T
        if op in ("<", "<=") and isinstance(left, ast.Call) and ast.unparse(left.func) in ("abs", "math.fabs", "fabs") \
                and len(left.args) == 1 and isinstance(left.args[0], ast.BinOp) \
                and isinstance(left.args[0].op, ast.Sub):
            ok_t, bound = _literal(right)
            a, b = left.args[0].left, left.args[0].right
            ok_a, va = _literal(a)
            ok_b, vb = _literal(b)
            if ok_t and ok_b != ok_a:
                return Check(ast.unparse(a if ok_b else b), "abs_lt" if op == "<" else "abs_le",
                             vb if ok_b else va, bound, line)
        ok_l, vl = _literal(left)
        ok_r, vr = _literal(right)
        if op and ok_r and not ok_l:
            return Check(ast.unparse(left), op, vr, line=line)
        if op in _FLIP and ok_l and not ok_r:
            return Check(ast.unparse(right), _FLIP[op], vl, line=line)
    if isinstance(test, ast.Call) and ast.unparse(test.func) in ("math.isclose", "isclose") and len(test.args) == 2:
        kwargs = {}
        for kw in test.keywords:
            ok, v = _literal(kw.value)
            if not ok or kw.arg not in ("rel_tol", "abs_tol"):
                raise NotCheckable(f"line {line}: isclose with {ast.unparse(kw)}")
            kwargs[kw.arg] = v
        (ok_a, va), (ok_b, vb) = _literal(test.args[0]), _literal(test.args[1])
        if ok_a != ok_b:
            return Check(ast.unparse(test.args[1] if ok_a else test.args[0]), "isclose", va if ok_a else vb, kwargs, line)
    if isinstance(test, (ast.Call, ast.Subscript, ast.Attribute, ast.Name)):
        return Check(ast.unparse(test), "truthy", line=line)
    raise NotCheckable(f"line {line}: `assert {ast.unparse(test)[:80]}` has no literal to compare with")


def _statements(body: Sequence[ast.stmt]) -> list[Check]:
    checks = []
    for stmt in body:
        if isinstance(stmt, ast.Assert):
            c = _check(stmt.test, stmt.lineno)
            if c is not None:
                checks.append(c)
        elif isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        else:
            raise NotCheckable(f"line {stmt.lineno}: {type(stmt).__name__} statement")
    return checks


def from_asserts(test_code: str, entry_point: str) -> CheckedTests:
    """Checks from test code made of asserts: module-level ones (a problem's stated examples), or a
    human-eval `check(candidate)` function of asserts beside literal assignments (METADATA) and imports,
    followed by `check(<entry_point>)`. Raises NotCheckable naming the first statement that does not fit."""
    try:
        tree = ast.parse(test_code)
    except SyntaxError as e:
        raise NotCheckable(f"test code does not parse: {e.msg}") from None
    checks: list[Check] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "check" and [a.arg for a in stmt.args.args] == ["candidate"]:
            checks += _statements(stmt.body)
        elif isinstance(stmt, ast.Assign) and _literal(stmt.value)[0] or isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue  # METADATA = {...}; imports the checks' own forms (math.isclose) need here, not there
        elif isinstance(stmt, ast.Expr) and ast.unparse(stmt.value) == f"check({entry_point})":
            continue
        else:
            checks += _statements([stmt])
    if not checks:
        raise NotCheckable("no assert to check")
    return CheckedTests(entry_point, tuple(checks))


def evalplus_checks(entry_point: str, inputs: list, expected: Optional[Sequence[Any]] = None,
                    atol: float = 0.0) -> CheckedTests:
    """evalplus inputs: each call is the entry point on a deep copy of one input, compared as evalplus does
    with the `expected` outputs; without them, checks that record the outputs (the reference's run)."""
    checks = tuple(Check(f"candidate(*__copy__(__inputs__[{i}]))", "record" if expected is None else "evalplus",
                         None if expected is None else expected[i], atol) for i in range(len(inputs)))
    return CheckedTests(entry_point, checks, inputs)


def decode(data: Any) -> Any:
    """The sandbox's plain-data encoding back to values (see `_harness.plain`)."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if isinstance(data, dict):
        (tag, v), = data.items()
        if tag == "tuple":
            return tuple(decode(x) for x in v)
        if tag == "set":
            return {decode(x) for x in v}
        if tag == "frozenset":
            return frozenset(decode(x) for x in v)
        if tag == "dict":
            return {decode(k): decode(x) for k, x in v}
        if tag == "bytes":
            return bytes.fromhex(v)
        raise ValueError(f"unknown tag {tag!r}")
    return data


def evalplus_equal(got: Any, exp: Any, atol: float) -> bool:
    """evalplus's comparison: floats with a tolerance, containers element by element, types kept."""
    if isinstance(exp, float) or (isinstance(got, float) and isinstance(exp, int) and not isinstance(exp, bool)):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return False
        if math.isnan(exp):
            return math.isnan(got)
        return math.isclose(got, exp, rel_tol=1e-07, abs_tol=atol or 1e-06)
    if isinstance(exp, (list, tuple)):
        return type(got) is type(exp) and len(got) == len(exp) and all(evalplus_equal(g, e, atol) for g, e in zip(got, exp))
    if isinstance(exp, dict):
        return isinstance(got, dict) and got.keys() == exp.keys() and all(evalplus_equal(got[k], exp[k], atol) for k in exp)
    return type(got) is type(exp) and got == exp


def holds(check: Check, got: Any) -> bool:
    """Whether the reported value meets the check. Comparisons of mismatched plain types fail."""
    try:
        if check.op == "record":
            return True
        if check.op == "truthy":
            return bool(got)
        if check.op == "falsy":
            return not got
        if check.op in ("abs_lt", "abs_le"):
            d = abs(got - check.expected)
            return d < check.tol if check.op == "abs_lt" else d <= check.tol
        if check.op == "isclose":
            return math.isclose(got, check.expected, **check.tol)
        if check.op == "evalplus":
            return evalplus_equal(got, check.expected, check.tol)
        return bool(_OPS[check.op](got, check.expected))
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        return False


def judge(tests: CheckedTests, results: list) -> tuple[bool, str]:
    """(passed, reason) from the sandbox's report: one {"value"} per check until one {"raised"}."""
    for i, check in enumerate(tests.checks):
        if i >= len(results):
            return False, f"no result for check {i + 1} (`{check.expr[:80]}`)"
        r = results[i]
        if not isinstance(r, dict):
            return False, "malformed report"
        if "raised" in r:
            return False, f"`{check.expr[:80]}` raised {str(r['raised'])[:200]}"
        if "unplain" in r:
            return False, f"`{check.expr[:80]}` returned {str(r['unplain'])[:100]}: not plain data"
        try:
            got = decode(r.get("value"))
        except (ValueError, TypeError, AttributeError) as e:
            return False, f"malformed value: {e}"
        if not holds(check, got):
            exp = "" if check.op in ("truthy", "falsy") else f" {check.expected!r:.80}"
            return False, f"`{check.expr[:80]}` gave {got!r:.80}, expected {check.op}{exp}"
    return True, ""
