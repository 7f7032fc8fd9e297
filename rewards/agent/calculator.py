"""Calculator environment: compute an arithmetic expression exactly with a calculator tool.

Tools: `calculate(expression)` evaluates + - * / // % ** and parentheses on exact
fractions, with a small evaluator over Python's AST (never `eval`) and caps on exponent and
number size so a call cannot stall the environment; `submit(answer)` ends the episode.
Reward 1 when the submitted value equals the task's answer exactly ("7/2", "3.5" and
"14/4" all count), else 0. `generate(seed)` makes random expressions with a known answer.
`spec` is the same environment in the synthesis format (rewards/agent/spec.py).
"""

from __future__ import annotations

import ast
import operator
import random
from fractions import Fraction

from . import AgentVerifier, Environment, Tool, ToolCall, ToolError
from .spec import EnvSpec, ToolSpec

MAX_CHARS = 300
MAX_EXPONENT = 64
MAX_DIGITS = 400

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _check_size(value: Fraction) -> Fraction:
    if max(len(str(abs(value.numerator))), len(str(value.denominator))) > MAX_DIGITS:
        raise ToolError(f"number too large (over {MAX_DIGITS} digits)")
    return value


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(Fraction(repr(node.value)))  # "0.1" exactly, not binary 0.1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _eval(node.left), _eval(node.right)
        if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
            raise ToolError(f"exponent must be an integer of at most {MAX_EXPONENT}")
        if base == 0 and exponent < 0:
            raise ToolError("division by zero")
        return _check_size(base ** int(exponent))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        return _check_size(Fraction(_BINARY[type(node.op)](left, right)))
    raise ToolError(f"unsupported syntax: {ast.dump(node)[:60]}")


def evaluate(expression: str) -> Fraction:
    """Exact value of an arithmetic expression; ToolError on anything else."""
    if not isinstance(expression, str):
        raise ToolError("expression must be a string")
    if len(expression) > MAX_CHARS:
        raise ToolError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"cannot parse expression: {exc.msg}") from None
    return _eval(tree)


def show(value: Fraction) -> str:
    return (
        str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    )


class CalculatorEnv(Environment):
    name = "calculator"
    tools = {
        "calculate": Tool("evaluate an arithmetic expression exactly", {"expression": "text"}),
        "submit": Tool("submit the final answer and end the episode", {"answer": "text"}),
    }

    def reset(self, task: dict) -> str:
        self.state = {"answer": task["answer"], "submitted": None}
        self.steps, self.done = 0, False
        return self.with_tools(task["prompt"])

    def tool_calculate(self, expression: str) -> str:
        return show(evaluate(expression))

    def tool_submit(self, answer: str) -> str:
        self.state["submitted"] = str(answer)
        self.done = True
        return "submitted"

    def verify(self, final_state: dict) -> float:
        return verify_state(final_state)

    @staticmethod
    def generate(seed: int, depth: int = 3) -> tuple[dict, str]:
        rng = random.Random(seed)
        expression = _random_expression(rng, depth=depth)
        answer = show(evaluate(expression))
        prompt = f"Compute the exact value of {expression}. Give a fraction as a/b if needed."
        return {"prompt": prompt, "expression": expression, "answer": answer}, answer


def _random_expression(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.25:
        return str(rng.randint(1, 60))
    op = rng.choice("+-*/")
    left, right = _random_expression(rng, depth - 1), _random_expression(rng, depth - 1)
    if op == "/" and evaluate(right) == 0:
        op = "*"
    return f"({left} {op} {right})"


def verify_state(state: dict) -> float:
    """1 when the submitted value equals the answer exactly, else 0."""
    submitted = state.get("submitted")
    if submitted is None:
        return 0.0
    try:
        return float(evaluate(submitted) == Fraction(state["answer"]))
    except (ToolError, ValueError, ZeroDivisionError):
        return 0.0


verifier = AgentVerifier(CalculatorEnv)


def _spec(depth: int = 3) -> EnvSpec:
    """The calculator in the synthesis format (rewards/agent/spec.py): the same tools, tasks
    and verdict as CalculatorEnv; `depth` bounds the nesting of the task's expression."""

    def calculate(state: dict, expression: str) -> str:
        return show(evaluate(expression))

    def submit(state: dict, answer: str) -> str:
        state["submitted"], state["_done"] = str(answer), True
        return "submitted"

    def make_task(rng: random.Random) -> tuple[dict, list[ToolCall]]:
        task, answer = CalculatorEnv.generate(rng.randrange(2**31), depth)
        calls = [ToolCall("calculate", {"expression": task["expression"]})]
        return task, [*calls, ToolCall("submit", {"answer": answer})]

    def text_arg(name: str, description: str) -> dict:
        props = {name: {"type": "string", "description": description}}
        return {"type": "object", "properties": props, "required": [name]}

    return EnvSpec(
        name="calculator",
        tools=(
            ToolSpec(
                "calculate",
                "evaluate an arithmetic expression exactly",
                text_arg("expression", "the expression"),
                calculate,
            ),
            ToolSpec(
                "submit",
                "submit the final answer and end the episode",
                text_arg("answer", "the answer, a/b for a fraction"),
                submit,
            ),
        ),  # fmt: skip
        make_task=make_task,
        initial_state=lambda task: {"answer": task["answer"], "submitted": None},
        prompt=lambda task: task["prompt"],
        verify=lambda state, task: verify_state(state),
        max_steps=CalculatorEnv.max_steps,
    )


spec = _spec()
# One operation a task ("(12 * 5)"): the agent quickstart's environment, learnable by the tiny
# policy on 2 CPU cores.
simple_spec = _spec(depth=1)
