"""A small, safe filter language over an index's metadata columns (`clipzsl.metadata`).

    folder = 'cats' and width > 512
    not (name in ('a.jpg', 'b.jpg') or height <= 100)

Grammar (keywords case-insensitive; strings in single quotes, '' for a quote inside):

    expr       := term ('or' term)*
    term       := factor ('and' factor)*
    factor     := 'not' factor | '(' expr ')' | comparison
    comparison := column op literal | column ['not'] 'in' '(' literal (',' literal)* ')' | column (of true/false)
    op         := '=' | '!=' | '<>' | '<' | '<=' | '>' | '>='
    literal    := 'text' | number | true | false
    column     := a name of letters, digits and '_' (not starting with a digit), or "any name" in double quotes

`parse` reads it with a recursive-descent parser (never `eval`) into a tree of `Compare`, `In`, `Not`,
`And`, `Or`; `check` matches it against a table's columns and types; `evaluate` computes it with
pyarrow.compute over the table, as SQL does: a comparison with a missing value (null) is unknown,
`and`/`or`/`not` follow three-valued (Kleene) logic, and only rows where the whole filter is true pass.
Every mistake is a `FilterError` naming the position, what was found and what to write instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import InputError

#: comparison operators, as written -> pyarrow.compute function
OPERATORS = {"=": "equal", "!=": "not_equal", "<>": "not_equal", "<": "less", "<=": "less_equal",
             ">": "greater", ">=": "greater_equal"}
KEYWORDS = ("and", "or", "not", "in", "true", "false")
#: most nested `not`s and parentheses a filter may have (deeper would exhaust Python's stack)
MAX_DEPTH = 64
_TOKEN = re.compile(r"""\s*(?:(?P<string>'(?:[^']|'')*')|(?P<quoted>"[^"]+")|(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
                        |(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op><=|>=|!=|<>|=|<|>)|(?P<punct>[(),]))""", re.VERBOSE)

Literal = Union[str, int, float, bool]


class FilterError(InputError):
    """A filter that cannot be read or applied: the message names the position (1-based), the column
    and how to write it."""

    def __init__(self, text: str, position: int, problem: str):
        self.position = position
        super().__init__(f"filter {text!r}, at position {position + 1}: {problem}")


@dataclass(frozen=True)
class Token:
    kind: str  # string, quoted, number, name, op, punct, end
    text: str
    position: int


@dataclass(frozen=True)
class Compare:
    column: str
    op: str  # a key of OPERATORS
    value: Literal
    position: int = field(default=0, compare=False)  # of the column's name in the text


@dataclass(frozen=True)
class In:
    column: str
    values: tuple[Literal, ...]
    negated: bool
    position: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Not:
    operand: "Expr"


@dataclass(frozen=True)
class And:
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class Or:
    left: "Expr"
    right: "Expr"


Expr = Union[Compare, In, Not, And, Or]


def tokens(text: str) -> list[Token]:
    """The filter's tokens, then an `end` token; a character no token starts with is a FilterError."""
    found, at = [], 0
    while text[at:].strip():
        match = _TOKEN.match(text, at)
        if match is None or match.lastgroup is None:
            start = len(text) - len(text[at:].lstrip())
            hint = " (strings go in single quotes: 'cats')" if text[start] in "\"'" else ""
            raise FilterError(text, start, f"unexpected {text[start]!r}{hint}")
        found.append(Token(match.lastgroup, match.group(match.lastgroup), match.start(match.lastgroup)))
        at = match.end()
    return found + [Token("end", "", len(text))]


class _Parser:
    """Recursive descent over `tokens(text)`, one method per rule of the grammar."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = tokens(text)
        self.at = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.at]

    def keyword(self, word: str) -> bool:
        """Consume the next token when it is the keyword `word`."""
        token = self.peek()
        if token.kind == "name" and token.text.lower() == word:
            self.at += 1
            return True
        return False

    def punct(self, mark: str) -> bool:
        if self.peek().kind == "punct" and self.peek().text == mark:
            self.at += 1
            return True
        return False

    def fail(self, wanted: str) -> FilterError:
        token = self.peek()
        found = "the end of the filter" if token.kind == "end" else repr(token.text)
        return FilterError(self.text, token.position, f"expected {wanted}, found {found}")

    def parse(self) -> Expr:
        expr = self.expr()
        if self.peek().kind != "end":
            raise self.fail("`and`, `or` or the end of the filter")
        return expr

    def expr(self) -> Expr:
        left = self.term()
        while self.keyword("or"):
            left = Or(left, self.term())
        return left

    def term(self) -> Expr:
        left = self.factor()
        while self.keyword("and"):
            left = And(left, self.factor())
        return left

    def factor(self) -> Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(self.text, self.peek().position, f"nested more than {MAX_DEPTH} deep; write it flatter")
        try:
            if self.keyword("not"):
                return Not(self.factor())
            if not self.punct("("):
                return self.comparison()
            inner = self.expr()
            if not self.punct(")"):
                raise self.fail("`)`")
            return inner
        finally:
            self.depth -= 1

    def comparison(self) -> Expr:
        token = self.peek()
        if token.kind not in ("name", "quoted") or token.text.lower() in KEYWORDS:
            raise self.fail("a column name (e.g. folder = 'cats')")
        self.at += 1
        column = token.text.strip('"')
        negated = self.keyword("not")
        if negated or self.keyword("in"):
            if negated and not self.keyword("in"):
                raise self.fail("`in` after `not`")
            return In(column, self.values(), negated, token.position)
        op = self.peek()
        if op.kind == "end" or op.text == ")" or op.text.lower() in ("and", "or"):
            return Compare(column, "=", True, token.position)  # a true/false column alone: `night` is `night = true`
        if op.kind != "op":
            raise self.fail(f"a comparison after {column!r} (=, !=, <, <=, >, >= or in (...))")
        self.at += 1
        return Compare(column, op.text, self.literal(), token.position)

    def values(self) -> tuple[Literal, ...]:
        if not self.punct("("):
            raise self.fail("`(` to start the list of `in`")
        values = [self.literal()]
        while self.punct(","):
            values.append(self.literal())
        if not self.punct(")"):
            raise self.fail("`,` or `)` in the list of `in`")
        return tuple(values)

    def literal(self) -> Literal:
        token = self.peek()
        self.at += 1
        if token.kind == "string":
            return token.text[1:-1].replace("''", "'")
        if token.kind == "number":
            return float(token.text) if re.search(r"[.eE]", token.text) else int(token.text)
        if token.kind == "name" and token.text.lower() in ("true", "false"):
            return token.text.lower() == "true"
        self.at -= 1
        quote = " (text goes in single quotes: 'cats')" if token.kind in ("name", "quoted") else ""
        raise self.fail(f"a value: 'text' in single quotes, a number, true or false{quote}")


def parse(text: str) -> Expr:
    """The filter `text` as a tree; a mistake is a FilterError naming its position and the fix."""
    if not text.strip():
        raise FilterError(text, 0, "empty; write a condition such as folder = 'cats'")
    return _Parser(text).parse()


def _kind(type_: Any) -> str:
    """'text', 'number' or 'bool': which literals a column of pyarrow `type_` compares with."""
    import pyarrow as pa

    if pa.types.is_boolean(type_):
        return "bool"
    return "number" if pa.types.is_integer(type_) or pa.types.is_floating(type_) else "text"


def _literal_kind(value: Literal) -> str:
    return "bool" if isinstance(value, bool) else "text" if isinstance(value, str) else "number"


def check(expr: Expr, schema: Any, text: str) -> None:
    """Refuse (FilterError) a column the table (pyarrow `schema`) lacks, listing those it has, and a
    value of another kind than its column's (text with a number...), saying what to compare it with."""
    if isinstance(expr, (And, Or)):
        check(expr.left, schema, text)
        check(expr.right, schema, text)
    elif isinstance(expr, Not):
        check(expr.operand, schema, text)
    else:
        if expr.column not in schema.names:
            raise FilterError(text, expr.position, f"no column {expr.column!r}; the columns are "
                                                   f"{', '.join(n for n in schema.names)}")
        kind = _kind(schema.field(expr.column).type)
        values = expr.values if isinstance(expr, In) else (expr.value,)
        wrong = next((v for v in values if _literal_kind(v) != kind), None)
        if wrong is not None:
            example = {"text": "'cats'", "number": "512", "bool": "true"}[kind]
            raise FilterError(text, expr.position, f"column {expr.column!r} holds {kind} values, not "
                                                   f"{_literal_kind(wrong)} like {wrong!r}; compare it with {kind} "
                                                   f"such as {expr.column} = {example}")
        if kind == "bool" and isinstance(expr, Compare) and expr.op not in ("=", "!=", "<>"):
            raise FilterError(text, expr.position, f"column {expr.column!r} holds true/false: compare it "
                                                   "with = or != only")


def evaluate(expr: Expr, table: Any) -> Any:
    """A pyarrow boolean array (nulls where unknown): `expr` on each row of `table`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(expr, And):
        return pc.and_kleene(evaluate(expr.left, table), evaluate(expr.right, table))
    if isinstance(expr, Or):
        return pc.or_kleene(evaluate(expr.left, table), evaluate(expr.right, table))
    if isinstance(expr, Not):
        return pc.invert(evaluate(expr.operand, table))
    column = table.column(expr.column)
    if _kind(column.type) == "number":
        column = pc.add(pc.cast(column, pa.float64()), 0.0)  # int and float alike (exact below 2**53); -0.0 as 0.0
    if isinstance(expr, Compare):
        return pc.call_function(OPERATORS[expr.op], [column, pa.scalar(expr.value)])
    values = [v + 0.0 if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in expr.values]  # is_in tells -0.0 from 0.0
    found = pc.is_in(column, value_set=pa.array(values, type=column.type), skip_nulls=True)
    found = pc.if_else(pc.is_null(column), pa.scalar(None, pa.bool_()), found)  # unknown, as SQL's `null in (...)`
    return pc.invert(found) if expr.negated else found


def matching(text: str, table: Any) -> Any:
    """A numpy bool array: the rows of pyarrow `table` the filter `text` holds true for (unknown: false)."""
    import pyarrow.compute as pc

    expr = parse(text)
    check(expr, table.schema, text)
    return pc.fill_null(evaluate(expr, table), False).to_numpy(zero_copy_only=False)
