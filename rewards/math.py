"""Math verifier: extract the final answer from a response and test it for equivalence.

Extraction, first match wins: the last `\\boxed{...}` (or `\\fbox{...}`), a GSM8K-style
`#### 42` line, "the (final) answer is ..." / "answer: ...", else the last number in the text.
Equivalence is decided by math-verify (LaTeX -> sympy), so 1/2, 0.5, \\frac{1}{2} and 50% agree,
sets and intervals compare as sets and intervals, and units and `\\text{...}` are stripped.
A reference without an "answer" field makes the verifier not apply (returns None).

math-verify guards its own parsing with SIGALRM, which only works on the main thread; off it
we switch that guard off and rely on the scorer's timeout (use isolation="process" to kill
a pathological expression rather than abandon it).
"""

from __future__ import annotations

import logging
import re
import threading

from latex2sympy2_extended import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from .contract import Sample

_LATEX = LatexExtractionConfig(
    boxed_match_priority=0,
    normalization_config=NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=False, nits=True, boxed="all"
    ),
)
_CONFIG = [_LATEX, ExprExtractionConfig()]
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?|-?\.\d+%?"
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|the\s+answer)\s*(?:is|:|=)\s*:?\s*(.+)|^\s*answer\s*:\s*(.+)",
    re.IGNORECASE | re.MULTILINE,
)
_HASHES = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER_WITH_WORDS = re.compile(rf"({_NUMBER})\s+[A-Za-z][A-Za-z\s]*")
_MAX_CHARS = 1000  # longer "answers" are not answers; sympy on them only burns time


class _DropTimeoutWarning(logging.Filter):
    # We disable math-verify's SIGALRM guard on worker threads on purpose (see docstring);
    # its warning about that would otherwise be logged on every call.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarning())


def last_braced(text: str, commands: tuple[str, ...] = ("\\boxed", "\\fbox")) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces (or `\\boxed 5`)."""
    starts = [(text.rfind(c), c) for c in commands]
    pos, cmd = max(starts)
    if pos < 0:
        return None
    i = pos + len(cmd)
    if i < len(text) and text[i] == " ":
        m = re.match(r"\s*([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: a truncated response has no final answer


def extract_answer(text: str) -> str | None:
    """The response's final answer as a string, or None if it gives none."""
    if "\\boxed" in text or "\\fbox" in text:
        # A box that never closes is a truncated response: no final answer, not a guess.
        boxed = last_braced(text)
        return None if boxed is None else boxed.strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1]
    stated = _ANSWER_IS.findall(text)
    if stated:
        first, second = stated[-1]
        return _stated(first or second)
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def _stated(text: str) -> str:
    """The answer part of "the answer is <text>": a $...$ span, or up to the sentence's end."""
    text = _trim(text)
    if text.startswith("$") and text.find("$", 1) > 0:
        return text[1 : text.find("$", 1)].strip()
    return _trim(re.split(r"\.(?:\s|$)", text)[0])


def _trim(answer: str) -> str:
    answer = answer.strip().strip("*").strip()
    return answer.rstrip(".").strip()


def normalize_answer(answer: str) -> str:
    """Light clean-up before parsing: delimiters, bare `\\sqrt2`/`\\frac12`, trailing words."""
    s = _trim(str(answer))
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right) - 1:
            s = s[len(left) : len(s) - len(right)].strip()
    s = re.sub(r"\\([dt]?frac)(\d)(\d)", r"\\\1{\2}{\3}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"(\d)(?:\\,|\{,\}|\\!)(?=\d{3})", r"\1", s)  # 1\,000 and 1{,}000
    words = _NUMBER_WITH_WORDS.fullmatch(s)
    return words.group(1) if words else s


def _parse(answer: str, timeout: int | None) -> list:
    return parse(
        f"${normalize_answer(answer)}$", extraction_config=_CONFIG, parsing_timeout=timeout
    )


def equivalent(gold: str, predicted: str) -> bool:
    """Whether `predicted` is mathematically the same answer as `gold`."""
    if len(predicted) > _MAX_CHARS:
        return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed, pred_parsed = _parse(gold, timeout), _parse(predicted, timeout)
    if not gold_parsed or not pred_parsed:
        # Not mathematics (a name, a letter choice): compare the cleaned-up text.
        return normalize_answer(gold).casefold() == normalize_answer(predicted).casefold()
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def verify_math(sample: Sample) -> dict | None:
    """Reward 1.0 if the response's final answer equals reference["answer"], else 0.0."""
    if "answer" not in sample.reference:
        return None
    gold = str(sample.reference["answer"])
    gold = extract_answer(gold) if "\\boxed" in gold else gold
    predicted = extract_answer(sample.response)
    if predicted is None:
        return {"reward": 0.0, "extracted": 0.0}
    return {"reward": float(equivalent(gold, predicted)), "extracted": 1.0}
