"""Multi-digit arithmetic worked column by column, in a format a ~5M-parameter model can learn.

The reasoning restates the problem canonically (`347 + 589`), then walks the columns from the right, one line
each, naming the column, the digits, the carry or borrow in, the digit written and what goes on:

    347 + 589
    ones: 7 + 9 + 0 = 16, write 6, carry 1
    tens: 4 + 8 + 1 = 13, write 3, carry 1
    hundreds: 3 + 5 + 1 = 9, write 9, carry 0
    result: 936

A missing digit is written as 0 so every line has the same shape. The answer is always stated the same way,
`The answer is N.`, which the evaluator parses.
"""

from __future__ import annotations

import random

from .example import Checkpoint, Example, assistant, maybe_system, user

PLACES: tuple[str, ...] = ("ones", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands",
                           "millions", "ten millions")
OPS = ("+", "-", "x")


def answer_text(value: int) -> str:
    return f"The answer is {value}."


def _digits(n: int, width: int) -> list[int]:
    """Digits of n from the right, padded with zeros to `width`."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def _place(i: int) -> str:
    if i >= len(PLACES):
        raise ValueError(f"numbers with more than {len(PLACES)} digits are out of range")
    return PLACES[i]


def _carry_columns(header: str, width: int, column, result: int) -> list[str]:
    """Column by column from the ones, carrying: `column(i, carry)` -> (the column's sum as text, its value).
    Addition and one-digit multiplication differ only in that sum."""
    lines, carry = [header], 0
    for i in range(width):
        text, total = column(i, carry)
        lines.append(f"{_place(i)}: {text} = {total}, write {total % 10}, carry {total // 10}")
        carry = total // 10
    if carry:
        lines.append(f"{_place(width)}: write {carry}")
    lines.append(f"result: {result}")
    return lines


def add_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    return _carry_columns(f"{a} + {b}", width,
                          lambda i, c: (f"{da[i]} + {db[i]} + {c}", da[i] + db[i] + c), a + b)


def subtract_steps(a: int, b: int) -> list[str]:
    if a < b:
        # a negative result: compute the positive difference and put the sign back
        inner = subtract_steps(b, a)
        return [f"{a} - {b}", f"{b} is larger than {a}, so compute {b} - {a} and make it negative", *inner[:-1],
                f"result: -{b - a}"]
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    lines, borrow = [f"{a} - {b}"], 0
    for i in range(width):
        top = da[i]
        if top - db[i] - borrow < 0:
            # borrowing shows as the 1 written in front of the top digit
            value = 10 + top - db[i] - borrow
            lines.append(f"{_place(i)}: {10 + top} - {db[i]} - {borrow} = {value}, write {value}, borrow 1")
            borrow = 1
        else:
            value = top - db[i] - borrow
            lines.append(f"{_place(i)}: {top} - {db[i]} - {borrow} = {value}, write {value}, borrow 0")
            borrow = 0
    lines.append(f"result: {a - b}")
    return lines


def multiply_steps(a: int, d: int) -> list[str]:
    if not 0 <= d <= 9:
        raise ValueError(f"the multiplier must be one digit, got {d}")
    width = len(str(a))
    da = _digits(a, width)
    return _carry_columns(f"{a} x {d}", width, lambda i, c: (f"{da[i]} x {d} + {c}", da[i] * d + c), a * d)


def solve(a: int, op: str, b: int) -> tuple[list[str], int]:
    """The worked lines and the value of `a op b`."""
    if op == "+":
        return add_steps(a, b), a + b
    if op == "-":
        return subtract_steps(a, b), a - b
    if op == "x":
        return multiply_steps(a, b), a * b
    raise ValueError(f"operator {op!r}: allowed {', '.join(OPS)}")


# ------------------------------------------------------------------------------------ phrasings
# {a} and {b} as the user writes them; the reasoning restates them canonically as `a op b`.
ADD_PHRASES = ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
               "{a} + {b} = ?", "Calculate the sum of {a} and {b}.", "How much is {a} plus {b}?",
               "What do you get when you add {a} and {b}?", "Please work out {a} + {b}.")
SUB_PHRASES = ("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
               "{a} - {b} = ?", "How much is {a} minus {b}?", "Take {b} away from {a}.",
               "What is the difference {a} minus {b}?", "Please work out {a} - {b}.")
MUL_PHRASES = ("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} x {b}.",
               "{a} * {b} = ?", "What is the product of {a} and {b}?", "How much is {a} times {b}?",
               "Please work out {a} * {b}.")
# the multiplier written first; the reasoning still puts the long number first
MUL_SWAPPED_PHRASES = ("What is {b} times {a}?", "Multiply {b} by {a}.", "How much is {b} * {a}?")

FOLLOW_ADD = ("Now add {n} to that.", "Add {n} to the result.", "What is that plus {n}?", "And plus {n}?")
FOLLOW_SUB = ("Now subtract {n} from that.", "Take {n} away from the result.", "What is that minus {n}?",
              "And minus {n}?")
FOLLOW_MUL = ("Now multiply that by {n}.", "Multiply the result by {n}.", "What is that times {n}?",
              "And times {n}?")


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)  # 1 digit: 1..9


def draw_problem(rng: random.Random, allow_negative: bool = True) -> tuple[int, str, int]:
    op = rng.choice(OPS)
    if op == "x":
        return _number(rng, 1, 3), op, rng.randint(2, 9)
    a, b = _number(rng, 2, 4), _number(rng, 2, 4)
    if op == "-" and a < b and not (allow_negative and rng.random() < 0.25):
        a, b = b, a
    return a, op, b


def question(rng: random.Random, a: int, op: str, b: int) -> str:
    if op == "+":
        return rng.choice(ADD_PHRASES).format(a=a, b=b)
    if op == "-":
        return rng.choice(SUB_PHRASES).format(a=a, b=b)
    if rng.random() < 0.2:
        return rng.choice(MUL_SWAPPED_PHRASES).format(a=a, b=b)
    return rng.choice(MUL_PHRASES).format(a=a, b=b)


def solved_turn(a: int, op: str, b: int, previous: int | None = None) -> tuple[dict, int]:
    lines, value = solve(a, op, b)
    if previous is not None:
        lines.insert(0, f"The previous answer is {previous}.")
    return assistant("\n".join(lines), answer_text(value)), value


def make_arithmetic(rng: random.Random) -> Example:
    a, op, b = draw_problem(rng)
    messages = [*maybe_system(rng), user(question(rng, a, op, b))]
    reply, value = solved_turn(a, op, b)
    messages.append(reply)
    return Example("arithmetic", messages, None, [Checkpoint(len(messages) - 1, "arithmetic", {"answer": value})])


def follow_up(rng: random.Random, previous: int) -> tuple[str, str, int]:
    """A follow-up question on the previous answer that keeps it non-negative and within the place names."""
    choices = ["+", "x"] if previous < 100_000 else ["+"]
    if previous >= 10:
        choices.append("-")
    op = rng.choice(choices)
    if op == "+":
        n = _number(rng, 1, 3)
        return rng.choice(FOLLOW_ADD).format(n=n), op, n
    if op == "-":
        n = rng.randint(1, min(previous, 999))
        return rng.choice(FOLLOW_SUB).format(n=n), op, n
    n = rng.randint(2, 9)
    return rng.choice(FOLLOW_MUL).format(n=n), op, n


def make_arithmetic_chain(rng: random.Random) -> Example:
    """Two or three turns where later questions work on the previous answer ("now add 17 to that")."""
    a, op, b = draw_problem(rng, allow_negative=False)
    messages = [*maybe_system(rng), user(question(rng, a, op, b))]
    reply, value = solved_turn(a, op, b)
    messages.append(reply)
    checkpoints = [Checkpoint(len(messages) - 1, "arithmetic", {"answer": value})]
    for _ in range(rng.randint(1, 2)):
        text, op, n = follow_up(rng, value)
        messages.append(user(text))
        reply, value = solved_turn(value, op, n, previous=value)
        messages.append(reply)
        checkpoints.append(Checkpoint(len(messages) - 1, "arithmetic", {"answer": value}))
    return Example("arithmetic_chain", messages, None, checkpoints)
