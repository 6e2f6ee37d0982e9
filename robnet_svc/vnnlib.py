"""VNN-LIB properties and VNN-COMP ``instances.csv`` files: the subset classifiers use.

VNN-COMP benchmarks pair an ONNX network with a VNN-LIB property (SMT-LIB syntax) that
states the *unsafe* region: an input box and a condition on the outputs. robnet-svc reads
and writes the form of robustness properties of classifiers (the public ``cifar_biasfield``
benchmark uses it)::

    (declare-const X_0 Real) ... (declare-const Y_0 Real) ...
    (assert (<= X_0 0.004)) (assert (>= X_0 -0.004)) ...       ; the input box
    (assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0)) ...))    ; some class j >= label

Supported: comments, ``declare-const`` of ``X_i``/``Y_i`` as ``Real``, input asserts
comparing one ``X_i`` with a number (alone or inside ``and``), and ONE output assert that
is a comparison ``Y_j >= Y_l`` (``(>= Y_j Y_l)`` or ``(<= Y_l Y_j)``) or an ``or`` of such
comparisons, each optionally wrapped in a one-element ``and``, all against the same label
``l``. Anything else (several input boxes, linear output terms, output constants, ...) is a
``RobnetError`` naming the file and line. The maintained PyPI parser (``vnnlib`` 1.x) reads
the new VNN-LIB 2.0 syntax only, not this VNN-COMP form, hence this small reader.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robnet_svc.errors import RobnetError

_VAR = re.compile(r"^([XY])_(\d+)$")
SUPPORTED = ("supported: declare-const X_i/Y_i Real, asserts bounding one X_i by a number, and one "
             "output assert (or (and (>= Y_j Y_label)) ...)")


@dataclass
class Property:
    """A robustness property: input box ``lower <= X <= upper`` (float64 ``[n]``), ``num_outputs``
    declared ``Y_i``; unsafe when ``Y_j >= Y_label`` for some ``j`` in ``targets`` (increasing)."""

    path: Path
    lower: np.ndarray
    upper: np.ndarray
    num_outputs: int
    label: int
    targets: list[int]

    @property
    def num_inputs(self) -> int:
        return int(self.lower.shape[0])


@dataclass
class _List:
    items: list
    line: int


def _fail(path: Path, line: int, problem: str) -> RobnetError:
    return RobnetError(f"{path}:{line}: {problem} ({SUPPORTED})")


def _parse_sexprs(path: Path, text: str) -> list[_List]:
    """Top-level s-expressions; atoms are strings, lists carry the line they open on."""
    stack: list[_List] = [_List([], 0)]
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(";", 1)[0]
        for token in re.findall(r"\(|\)|[^\s()]+", line):
            if token == "(":
                stack.append(_List([], number))
            elif token == ")":
                if len(stack) == 1:
                    raise _fail(path, number, "unbalanced ')'")
                done = stack.pop()
                stack[-1].items.append(done)
            else:
                stack[-1].items.append(token)
    if len(stack) > 1:
        raise _fail(path, stack[-1].line, "'(' is never closed")
    for item in stack[0].items:
        if not isinstance(item, _List):
            raise _fail(path, 1, f"stray token {item!r} outside any form")
    return stack[0].items


def _number(token) -> float | None:
    if not isinstance(token, str):
        return None
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _var(token) -> tuple[str, int] | None:
    match = _VAR.match(token) if isinstance(token, str) else None
    return (match.group(1), int(match.group(2))) if match else None


def _atoms(path: Path, expr, connective: str | None = None) -> list:
    """Flatten ``expr`` into comparison forms; ``connective``: the only connective allowed."""
    if not isinstance(expr, _List) or not expr.items:
        raise _fail(path, getattr(expr, "line", 0), f"expected a comparison, got {expr!r}")
    head = expr.items[0]
    if head in ("<=", ">="):
        return [expr]
    if head == connective:
        return [atom for sub in expr.items[1:] for atom in _atoms(path, sub, connective)]
    raise _fail(path, expr.line, f"unsupported form {head!r} here")


def read_property(path: str | Path) -> Property:
    """Parse a VNN-LIB file of the supported subset (module docstring); RobnetError otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RobnetError(f"VNN-LIB file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RobnetError(f"cannot read VNN-LIB file {path}: {exc}") from None
    declared: dict[str, set[int]] = {"X": set(), "Y": set()}
    lower: dict[int, float] = {}
    upper: dict[int, float] = {}
    outputs: list[tuple[int, list[tuple[int, int]]]] = []  # (line, [(j, l): Y_j >= Y_l])
    for form in _parse_sexprs(path, text):
        head = form.items[0] if form.items else None
        if head == "declare-const":
            if len(form.items) != 3 or _var(form.items[1]) is None or form.items[2] != "Real":
                raise _fail(path, form.line, "expected (declare-const X_i Real) or (declare-const Y_i Real)")
            kind, index = _var(form.items[1])
            declared[kind].add(index)
        elif head == "assert":
            if len(form.items) != 2:
                raise _fail(path, form.line, "assert takes one expression")
            expr = form.items[1]
            if isinstance(expr, _List) and expr.items and expr.items[0] == "or":
                clauses = []
                for clause in expr.items[1:]:
                    atoms = _atoms(path, clause, "and")
                    if len(atoms) != 1:
                        raise _fail(path, getattr(clause, "line", form.line),
                                    "a disjunct with several conditions is not supported")
                    clauses.append(_output_atom(path, atoms[0]))
                outputs.append((form.line, clauses))
                continue
            atoms = _atoms(path, expr, "and")
            kinds = {_var(t)[0] for a in atoms for t in a.items[1:] if _var(t)}
            if "Y" in kinds:
                if len(atoms) != 1:
                    raise _fail(path, form.line, "a conjunction of output conditions (or one mixed with input "
                                                 "bounds) is not supported")
                outputs.append((form.line, [_output_atom(path, atoms[0])]))
                continue
            for atom in atoms:
                _input_atom(path, atom, lower, upper)
        else:
            raise _fail(path, form.line, f"unsupported command {head!r}")
    return _property(path, declared, lower, upper, outputs)


def _input_atom(path: Path, atom: _List, lower: dict, upper: dict) -> None:
    """``(<= X_i v)``, ``(>= X_i v)``, ``(<= v X_i)``, ``(>= v X_i)`` into the box (tightest wins)."""
    if len(atom.items) != 3:
        raise _fail(path, atom.line, "a comparison takes two arguments")
    op, a, b = atom.items
    if _var(a) and _var(a)[0] == "X" and _number(b) is not None:
        index, value, is_upper = _var(a)[1], _number(b), op == "<="
    elif _var(b) and _var(b)[0] == "X" and _number(a) is not None:
        index, value, is_upper = _var(b)[1], _number(a), op == ">="
    else:
        raise _fail(path, atom.line, f"input constraint ({op} {a} {b}) must compare one X_i with a number")
    if is_upper:
        upper[index] = min(value, upper.get(index, math.inf))
    else:
        lower[index] = max(value, lower.get(index, -math.inf))


def _output_atom(path: Path, atom: _List) -> tuple[int, int]:
    """``(>= Y_j Y_l)`` / ``(<= Y_l Y_j)`` -> ``(j, l)``."""
    if len(atom.items) != 3:
        raise _fail(path, atom.line, "a comparison takes two arguments")
    op, a, b = atom.items
    va, vb = _var(a), _var(b)
    if not (va and vb and va[0] == vb[0] == "Y"):
        raise _fail(path, atom.line, f"output condition ({op} {a} {b}) must compare two outputs Y_j, Y_l")
    return (va[1], vb[1]) if op == ">=" else (vb[1], va[1])


def _property(path, declared, lower, upper, outputs) -> Property:
    n, k = len(declared["X"]), len(declared["Y"])
    for kind, count in (("X", n), ("Y", k)):
        if declared[kind] != set(range(count)) or count == 0:
            raise _fail(path, 1, f"the declared {kind}_i must be {kind}_0 .. {kind}_{{n-1}}, each once")
    used = set(lower) | set(upper)
    if not used <= declared["X"]:
        raise _fail(path, 1, f"X_{max(used - declared['X'])} is bounded but not declared")
    missing = [i for i in range(n) if i not in lower or i not in upper]
    if missing:
        raise _fail(path, 1, f"X_{missing[0]} has no {'lower' if missing[0] not in lower else 'upper'} bound "
                             "(every input needs both)")
    lo = np.array([lower[i] for i in range(n)], dtype=np.float64)
    hi = np.array([upper[i] for i in range(n)], dtype=np.float64)
    if (lo > hi).any():
        i = int(np.flatnonzero(lo > hi)[0])
        raise _fail(path, 1, f"the input box is empty: X_{i} >= {lo[i]} and X_{i} <= {hi[i]}")
    if len(outputs) != 1:
        line = outputs[1][0] if outputs else 1
        raise _fail(path, line, f"expected one output assert, found {len(outputs)}")
    line, clauses = outputs[0]
    labels = {l for _j, l in clauses}
    targets = sorted({j for j, _l in clauses})
    if len(labels) != 1:
        raise _fail(path, line, f"the disjuncts compare against several outputs {sorted(labels)}; "
                                "expected one label")
    label = labels.pop()
    if not all(0 <= i < k for i in [label, *targets]) or label in targets:
        raise _fail(path, line, f"output indices must be declared Y_i and differ from the label Y_{label}")
    return Property(path, lo, hi, k, label, targets)


def _fmt(value: float) -> str:
    """The shortest decimal that reads back as the same double (exact for float32 values)."""
    return repr(float(value))


def property_text(lower: np.ndarray, upper: np.ndarray, label: int, num_outputs: int,
                  comments: list[str] = ()) -> str:
    """A VNN-LIB property in the VNN-COMP form: the box ``lower <= X <= upper`` and the unsafe
    disjunction "some output ``Y_j`` (``j != label``) ``>= Y_label``"."""
    lines = [f"; {c}" for c in comments] + [""]
    lines += [f"(declare-const X_{i} Real)" for i in range(len(lower))] + [""]
    lines += [f"(declare-const Y_{i} Real)" for i in range(num_outputs)] + ["", "; Input constraints:"]
    for i, (lo, hi) in enumerate(zip(lower, upper)):
        lines += [f"(assert (<= X_{i} {_fmt(hi)}))", f"(assert (>= X_{i} {_fmt(lo)}))"]
    lines += ["", "; Output constraints (unsafe: some other class scores at least the label):", "(assert (or"]
    lines += [f"    (and (>= Y_{j} Y_{label}))" for j in range(num_outputs) if j != label]
    return "\n".join(lines + ["))", ""])


@dataclass
class Instance:
    """One row of ``instances.csv``: network, property, timeout in seconds (paths resolved)."""

    onnx: Path
    vnnlib: Path
    timeout: float


def read_instances(path: str | Path) -> list[Instance]:
    """``onnx,vnnlib,timeout`` rows (no header), paths relative to the file's folder."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = [(n, r) for n, r in enumerate(csv.reader(handle), start=1) if any(c.strip() for c in r)]
    except FileNotFoundError:
        raise RobnetError(f"instances file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RobnetError(f"cannot read instances file {path}: {exc}") from None
    out = []
    for number, row in rows:
        timeout = _number(row[2].strip()) if len(row) == 3 else None
        if timeout is None:
            raise RobnetError(f"{path}:{number}: expected 'onnx,vnnlib,timeout', got {','.join(row)!r}")
        out.append(Instance(path.parent / row[0].strip(), path.parent / row[1].strip(), timeout))
    if not out:
        raise RobnetError(f"instances file {path} lists no instance")
    return out
