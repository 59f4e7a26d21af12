"""Answers as math: a small, safe parser from answer text to sympy, and equivalence of two answers.

Model output is untrusted text, so nothing here goes near eval(): sympy's own `sympify` / `parse_expr` run
Python's eval on the transformed string. The grammar is a recursive descent over
    expr  := term (('+' | '-') term)*
    term  := unary (('*' | '/' | '\\cdot' | '\\times' | implicit) unary)*      implicit: 2x, 3(4), 2\\pi
    unary := ('+' | '-') unary | power
    power := atom (('^' | '**') unary)?
    atom  := number | letter | '(' expr ')' | '{' expr '}' | '\\frac{expr}{expr}' | '\\sqrt{expr}' | sqrt(expr)
             | '\\pi' | pi
Numbers become exact rationals (0.5 == 1/2 exactly). The cost of any input is bounded without a timer (which
would need signals, unavailable off the main thread): the text is at most MAX_CHARS long, a power may have at
most MAX_EXPONENT as exponent and MAX_BITS bits as result (else 9^64^64^64 would take forever), and
equivalence is decided by exact arithmetic and by evaluating at a few fixed points, never by `simplify` or
`expand`, whose running times have no useful bound.
"""
from __future__ import annotations

import re

import sympy

MAX_CHARS = 200
MAX_EXPONENT = 64
MAX_BITS = 4096
_POINTS = [sympy.Rational(3, 7), sympy.Rational(-5, 11), sympy.Rational(13, 5)]   # for expressions with letters

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\\[a-zA-Z]+)|([a-zA-Z])|(\*\*|[-+*/^(){}]))")


class ParseError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; kind: num, cmd (a LaTeX command), name (one letter), op."""
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected {text[pos:pos + 10]!r}")
        kind = ("num", "cmd", "name", "op")[m.lastindex - 1]
        out.append((kind, m.group(m.lastindex)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self, want: str | None = None):
        kind, tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise ParseError(f"expected {want or 'more'}, found {tok!r}")
        self.i += 1
        return kind, tok

    def parse(self):
        value = self.expr()
        if self.i != len(self.toks):
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        return value

    def expr(self):
        value = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def _starts_atom(self) -> bool:
        kind, tok = self.peek()
        return kind in ("num", "name") or tok in ("(", "{", "\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\pi")

    def term(self):
        value = self.unary()
        while True:
            kind, tok = self.peek()
            if tok in ("*", "/", "\\cdot", "\\times", "\\div"):
                self.take()
                rhs = self.unary()
                if tok in ("/", "\\div"):
                    if rhs == 0:
                        raise ParseError("division by zero")
                    value = value / rhs
                else:
                    value = value * rhs
            elif self._starts_atom():
                # implicit product (2x, 3(4+1)); but two numbers in a row ("1 000") are not a product
                if kind == "num" and self.toks[self.i - 1][0] == "num":
                    raise ParseError("two numbers in a row")
                value = value * self.unary()
            else:
                return value

    def unary(self):
        tok = self.peek()[1]
        if tok in ("+", "-"):
            self.take()
            value = self.unary()
            return -value if tok == "-" else value
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek()[1] in ("^", "**"):
            self.take()
            exponent = self.unary()
            if not exponent.is_number:
                return base ** exponent
            if abs(exponent) > MAX_EXPONENT:
                raise ParseError(f"exponent {exponent} exceeds {MAX_EXPONENT}")
            if base == 0 and exponent <= 0:
                raise ParseError("0 to a non-positive power")
            if base.is_Rational and max(abs(base.p).bit_length(), base.q.bit_length()) * abs(exponent) > MAX_BITS:
                raise ParseError(f"power larger than {MAX_BITS} bits")
            value = base ** exponent
            # (a^b)^c folds into a^(bc): the folded exponent is what later evaluation pays for
            if value.is_Pow and value.exp.is_number and abs(value.exp) > MAX_EXPONENT:
                raise ParseError(f"exponent {value.exp} exceeds {MAX_EXPONENT}")
            return value
        return base

    def group(self):
        """A LaTeX argument: {expr}, or else one character (\\frac12 is 1/2, \\sqrt2x is sqrt(2)·x)."""
        kind, tok = self.peek()
        if tok == "{":
            self.take()
            value = self.expr()
            self.take("}")
            return value
        if kind == "num" and len(tok) > 1:
            self.toks[self.i] = ("num", tok[1:])
            return sympy.Rational(tok[0])
        return self.atom()

    def atom(self):
        kind, tok = self.take()
        if kind == "num":
            return sympy.Rational(tok)
        if kind == "name":
            if tok == "p" and self.peek()[1] == "i":
                self.take()
                return sympy.pi
            if tok == "s" and [t for _, t in self.toks[self.i:self.i + 3]] == ["q", "r", "t"]:
                self.i += 3
                return sympy.sqrt(self.paren())
            return sympy.Symbol(tok)
        if tok == "(":
            value = self.expr()
            self.take(")")
            return value
        if tok == "{":
            self.i -= 1
            return self.group()
        if tok in ("\\frac", "\\dfrac", "\\tfrac"):
            num, den = self.group(), self.group()
            if den == 0:
                raise ParseError("division by zero")
            return num / den
        if tok == "\\sqrt":
            return sympy.sqrt(self.group())
        if tok == "\\pi":
            return sympy.pi
        raise ParseError(f"unexpected {tok!r}")

    def paren(self):
        self.take("(")
        value = self.expr()
        self.take(")")
        return value


def parse(text: str):
    """sympy expression of `text`; ParseError when it is not a (supported) math expression or too long."""
    if len(text) > MAX_CHARS:
        raise ParseError(f"longer than {MAX_CHARS} characters")
    try:
        return _Parser(text).parse()
    except (ArithmeticError, TypeError, ValueError, RecursionError) as e:
        raise ParseError(str(e)) from None


def numbers(text: str) -> list:
    """The number literals of `text` as rationals, in order (countdown: which numbers an expression uses)."""
    return [sympy.Rational(t) for kind, t in _tokens(text) if kind == "num"]


def equivalent(a: str, b: str) -> bool:
    """Whether two answers denote the same value: exact for numbers (rationals, surds, π), by evaluation at a
    few fixed points for expressions with letters. Unparsable text is never equivalent to anything."""
    try:
        diff = parse(a) - parse(b)
        if diff == 0:
            return True
        letters = sorted(diff.free_symbols, key=str)
        if not letters:
            return _is_zero(diff)
        # two different polynomials / rational functions agree at a few arbitrary rational points only by accident
        return all(_is_zero(diff.xreplace({s: _POINTS[(i + k) % len(_POINTS)] for k, s in enumerate(letters)}))
                   for i in range(len(_POINTS)))
    except (ParseError, ArithmeticError, TypeError, ValueError, RecursionError):
        return False


def _is_zero(value) -> bool:
    """Zero to 30 significant digits: surds and π do not always cancel symbolically (sqrt(8) - 2*sqrt(2) does,
    (1 + sqrt(2))^2 - (3 + 2*sqrt(2)) does not), their 30-digit values do."""
    return abs(complex(sympy.N(value, 30))) < 1e-20
