"""Chat formats for multi-turn agent episodes, rendered piece by piece as token ids.

An episode is never rendered from a message list and re-tokenized: its tokens are the first
prompt's, then each turn's generated tokens and the tokens appended between turns
(rollout/episode.py). A template therefore says how each piece becomes tokens:

- `first(tok, prompt, tools)`: BOS, the tools (where the format writes them itself), the
  task as the user message, and the opening of the first assistant turn;
- `observation(tok, text)`: a tool's result and the opening of the next assistant turn;
- `assistant(tok, call, content, reasoning)`: the tokens of a model turn that makes `call`
  (or answers with `content`), ending at EOS: what a model should generate, used for the
  supervised warm start and the tests;
- `parse(text)`: a generated turn's text back to its tool call, a ToolCallError, or None
  for a turn without a call (the final answer);
- `render(tok, prompt, tools, messages)`: a whole conversation as the concatenation of those
  pieces, the reference the episode records are checked against.

`TextChatTemplate` is for tokenizers without special tokens (the tiny models' characters).
`DeepSeekV32ChatTemplate` is DeepSeek-V3.2's format: `<｜User｜>` / `<｜Assistant｜>` roles,
reasoning closed by `</think>`, tool calls as a DSML `function_calls` block, tool results in
`<function_results>`, and the tool schemas as JSON in a system block. In thinking mode every
assistant turn of an episode follows its one user message, so each turn's reasoning stays in
the context for the next (the paper's thinking retention, token for token); the first turn
opens with `<think>`, and so does each turn after a tool result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rewards.agent import ToolCall, ToolCallError, format_tool_call, parse_tool_call


class TextTokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], keep_special: bool = False) -> str: ...


class ChatTemplate(Protocol):
    # whether the task prompt should end with the environment's tool list (False: the
    # template writes the tool schemas itself, or the tools are left undescribed)
    prompt_lists_tools: bool

    def first(self, tok: TextTokenizer, prompt: str, tools: Sequence[dict]) -> list[int]: ...

    def observation(self, tok: TextTokenizer, text: str) -> list[int]: ...

    def assistant(
        self, tok: TextTokenizer, call: ToolCall | None, content: str = "", reasoning: str = ""
    ) -> list[int]: ...

    def turn_text(self, tok: TextTokenizer, ids: Sequence[int]) -> str: ...

    def parse(self, text: str) -> ToolCall | ToolCallError | None: ...


def render(
    template: ChatTemplate,
    tok: TextTokenizer,
    prompt: str,
    tools: Sequence[dict],
    messages: Sequence[dict],
) -> list[int]:
    """A conversation after the first user message as token ids: messages are
    {"role": "assistant", "tool_call": ToolCall | None, "content": str, "reasoning": str} or
    {"role": "tool", "content": str}."""
    ids = template.first(tok, prompt, tools)
    for m in messages:
        if m["role"] == "assistant":
            call = m.get("tool_call")
            ids += template.assistant(tok, call, m.get("content", ""), m.get("reasoning", ""))
        elif m["role"] == "tool":
            ids += template.observation(tok, m["content"])
        else:
            raise ValueError(f"a message after the first is 'assistant' or 'tool', not {m}")
    return ids


@dataclass(frozen=True)
class TextChatTemplate:
    """A chat format in plain-text role markers, for tokenizers without special tokens (the
    tiny models' character tokenizer): BOS, then `<user>` + the task (its tools listed in
    it), `<assistant>`; each assistant turn ends at EOS; a tool's observation follows as
    `<tool>` + text, then `<assistant>` opens the next turn. Newlines, which the character
    vocabulary lacks, become " / ". Tool calls are rewards.agent's `<tool_call>` JSON.
    `list_tools=False` leaves the tools undescribed: for one fixed environment whose tools
    the policy learns in its warm start (a 2-core quickstart's prompts stay short)."""

    user: str = "<user>"
    tool: str = "<tool>"
    assistant_marker: str = "<assistant>"
    list_tools: bool = True

    @property
    def prompt_lists_tools(self) -> bool:
        return self.list_tools

    @staticmethod
    def _text(text: str) -> str:
        return " / ".join(line.strip() for line in text.strip().splitlines())

    def first(self, tok: TextTokenizer, prompt: str, tools: Sequence[dict] = ()) -> list[int]:
        return [tok.bos_id, *tok.encode(self.user + self._text(prompt) + self.assistant_marker)]

    def observation(self, tok: TextTokenizer, text: str) -> list[int]:
        return tok.encode(self.tool + self._text(text) + self.assistant_marker)

    def assistant(
        self, tok: TextTokenizer, call: ToolCall | None, content: str = "", reasoning: str = ""
    ) -> list[int]:
        text = content if call is None else format_tool_call(call.name, call.arguments)
        return [*tok.encode(text), tok.eos_id]

    def turn_text(self, tok: TextTokenizer, ids: Sequence[int]) -> str:
        return tok.decode([t for t in ids if t != tok.eos_id])

    def parse(self, text: str) -> ToolCall | ToolCallError | None:
        return parse_tool_call(text) if "<tool_call>" in text else None


BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
# Special-token strings a DeepSeek-V3.2 tokenizer must map to single tokens (tests build one).
SPECIAL_TOKENS = (BOS_TEXT, EOS_TEXT, USER, ASSISTANT, THINK, END_THINK, DSML)

_CALLS_OPEN = f"\n\n<{DSML}function_calls>\n"
_CALLS_CLOSE = f"</{DSML}function_calls>"
_INVOKE = re.compile(rf'<{DSML}invoke name="([^"\n]*)">\n(.*?)</{DSML}invoke>\n?', re.DOTALL)
_PARAM = re.compile(
    rf'<{DSML}parameter name="([^"\n]*)" string="(true|false)">(.*?)</{DSML}parameter>\n?',
    re.DOTALL,
)
DSML_HINT = (
    f'call a tool in a <{DSML}function_calls> block of one <{DSML}invoke name="..."> with a '
    f'<{DSML}parameter name="..." string="true|false"> per argument'
)


def _tools_block(tools: Sequence[dict]) -> str:
    """The system block listing the tools (DeepSeek-V3.2's wording of the DSML format)."""
    schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "## Tools\n"
        "You have access to a set of tools you can use to answer the user's question.\n"
        f'You can invoke functions by writing a "<{DSML}function_calls>" block like the '
        "following as part of your reply to the user:\n"
        f"<{DSML}function_calls>\n"
        f'<{DSML}invoke name="$FUNCTION_NAME">\n'
        f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE'
        f"</{DSML}parameter>\n...\n</{DSML}invoke>\n"
        f'<{DSML}invoke name="$FUNCTION_NAME2">\n...\n</{DSML}invoke>\n'
        f"</{DSML}function_calls>\n"
        "String and scalar parameters should be specified as is without any escaping or "
        'quotes, while lists and objects should use JSON format. The "string" attribute '
        'should be set to "true" for string type parameters and "false" for other types '
        "(numbers, booleans, arrays, objects).\n"
        "If the thinking_mode is enabled, then after function results you should strongly "
        "consider outputting a thinking block. Here is an example:\n"
        f"<{DSML}function_calls>\n...\n</{DSML}function_calls>\n"
        "<function_results>\n...\n</function_results>\n"
        f"{THINK}...thinking about results{END_THINK}\n"
        "Here are the functions available in JSONSchema format:\n"
        f"<functions>\n{schemas}\n</functions>\n"
    )


def dsml_call(call: ToolCall) -> str:
    """One tool call as a DSML function_calls block (strings as they are, the rest JSON)."""
    params = "\n".join(
        f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
        f"{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</{DSML}parameter>"
        for k, v in call.arguments.items()
    )
    invoke = f'<{DSML}invoke name="{call.name}">\n{params}\n</{DSML}invoke>'
    return f"{_CALLS_OPEN}{invoke}\n{_CALLS_CLOSE}"


def parse_dsml(block: str) -> ToolCall | ToolCallError:
    """The single call of a function_calls block's body (after its opening line). Anything
    but whole invoke/parameter elements is an error the model is told about."""
    body, close, rest = block.partition(_CALLS_CLOSE)
    if not close:
        return ToolCallError(f"error: the function_calls block is not closed; {DSML_HINT}")
    if rest.strip():
        return ToolCallError("error: text after the function_calls block")
    invokes = _INVOKE.findall(body)
    if _INVOKE.sub("", body).strip():
        return ToolCallError(f"error: malformed function_calls block; {DSML_HINT}")
    if len(invokes) != 1:
        n = len(invokes)
        return ToolCallError(f"error: one tool call per turn, found {n}; {DSML_HINT}")
    name, params = invokes[0]
    if _PARAM.sub("", params).strip():
        return ToolCallError(f"error: malformed parameters of {name!r}; {DSML_HINT}")
    arguments: dict[str, Any] = {}
    for key, is_str, value in _PARAM.findall(params):
        if key in arguments:
            return ToolCallError(f"error: parameter {key!r} given twice")
        if is_str == "true":
            arguments[key] = value
            continue
        try:
            arguments[key] = json.loads(value)
        except ValueError:
            return ToolCallError(f'error: parameter {key!r} has string="false" but is not JSON')
    if not name:
        return ToolCallError(f"error: a tool call needs a name; {DSML_HINT}")
    return ToolCall(name, arguments)


@dataclass(frozen=True)
class DeepSeekV32ChatTemplate:
    """DeepSeek-V3.2's chat format (see the module docstring). `thinking`: the model reasons
    before each turn (the first turn and every turn after a tool result open with <think>);
    off: those places hold </think> and the model answers at once. The tokenizer must map
    SPECIAL_TOKENS to single tokens (a DeepSeek-V3.2 tokenizer does) and decode them back."""

    thinking: bool = True
    system: str = ""
    prompt_lists_tools = False  # the schemas go in the system block

    @property
    def _open(self) -> str:
        return THINK if self.thinking else END_THINK

    def first(self, tok: TextTokenizer, prompt: str, tools: Sequence[dict] = ()) -> list[int]:
        system = self.system + ("\n\n" + _tools_block(tools) if tools else "")
        return [tok.bos_id, *tok.encode(f"{system}{USER}{prompt}{ASSISTANT}{self._open}")]

    def observation(self, tok: TextTokenizer, text: str) -> list[int]:
        results = f"\n\n<function_results>\n<result>{text}</result>\n</function_results>"
        return tok.encode(f"{results}\n\n{self._open}")

    def assistant(
        self, tok: TextTokenizer, call: ToolCall | None, content: str = "", reasoning: str = ""
    ) -> list[int]:
        head = f"{reasoning}{END_THINK}" if self.thinking else ""
        calls = "" if call is None else dsml_call(call)
        return [*tok.encode(f"{head}{content}{calls}"), tok.eos_id]

    def turn_text(self, tok: TextTokenizer, ids: Sequence[int]) -> str:
        """The turn's text with its special tokens (the DSML markers are what parse reads)."""
        return tok.decode([t for t in ids if t != tok.eos_id], keep_special=True)

    def parse(self, text: str) -> ToolCall | ToolCallError | None:
        if self.thinking:
            _, closed, text = text.partition(END_THINK)
            if not closed:
                return ToolCallError(f"error: the reasoning is not closed with {END_THINK}")
        start = text.find(_CALLS_OPEN)
        if start < 0:
            if DSML in text:
                return ToolCallError(f"error: malformed tool call; {DSML_HINT}")
            return None  # a turn without a call: the final answer
        return parse_dsml(text[start + len(_CALLS_OPEN) :])


TEMPLATES = {"text": TextChatTemplate, "deepseek-v3.2": DeepSeekV32ChatTemplate}


def chat_template(name: str, thinking: bool = True, list_tools: bool = True) -> ChatTemplate:
    """A template by its config name (`agent.chat_template`, `agent.thinking`,
    `agent.list_tools`)."""
    if name == "text":
        return TextChatTemplate(list_tools=list_tools)
    if name == "deepseek-v3.2":
        return DeepSeekV32ChatTemplate(thinking=thinking)
    raise ValueError(f"chat template must be one of {sorted(TEMPLATES)}, not {name!r}")


__all__ = [
    "ChatTemplate",
    "DeepSeekV32ChatTemplate",
    "TextChatTemplate",
    "chat_template",
    "dsml_call",
    "parse_dsml",
    "render",
]
