"""Chat templates (rollout/chat.py): DeepSeek-V3.2's format rendered exactly as written out
by hand, its DSML tool calls parsed back (and malformed ones refused with a message), and a
3-turn episode under it, on a byte-level BPE tokenizer with DeepSeek-V3.2's special tokens
made here, whose trained ids are the template's rendering piece for piece."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rewards.agent import ToolCall, ToolCallError
from rewards.agent.spec import lookup_family
from rl.tokenizer import HFTokenizer
from rollout import Sampling
from rollout.chat import (
    SPECIAL_TOKENS,
    DeepSeekV32ChatTemplate,
    TextChatTemplate,
    chat_template,
    dsml_call,
    render,
)
from rollout.episode import run_episodes
from rollout.trajectory import Trajectory

D = "｜DSML｜"


class StrTokenizer:
    """One id per character; BOS and EOS are ids past Unicode, decoded to their texts only
    with keep_special (as a real tokenizer's special tokens)."""

    bos_id, eos_id = 0x110000, 0x110001

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, keep_special=False):
        special = {self.bos_id: "<｜begin▁of▁sentence｜>", self.eos_id: "<｜end▁of▁sentence｜>"}
        return "".join(
            special[i] if i in special and keep_special else "" if i in special else chr(i)
            for i in ids
        )


TOOLS = [
    {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    }
]


def test_deepseek_v32_rendering_is_the_format_written_out():
    """Thinking mode, a tool call with a string and an integer argument, its result, then a
    final answer: the exact text of DeepSeek-V3.2's encoding of that conversation."""
    tok, t = StrTokenizer(), DeepSeekV32ChatTemplate(thinking=True, system="Be brief.")
    call = ToolCall("get_weather", {"city": "Oslo", "days": 2})
    ids = render(t, tok, "Weather in Oslo?", TOOLS, [
        {"role": "assistant", "tool_call": call, "reasoning": "Ask the tool."},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Rain.", "reasoning": "It rains."},
    ])  # fmt: skip
    text = tok.decode(ids, keep_special=True)
    schema = json.dumps(TOOLS[0])
    assert text.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools\n")
    user = "<｜User｜>Weather in Oslo?<｜Assistant｜><think>"
    assert f"<functions>\n{schema}\n</functions>\n{user}" in text
    tail = text[text.index("<｜Assistant｜>") :]
    assert tail == (
        "<｜Assistant｜><think>Ask the tool.</think>"
        f"\n\n<{D}function_calls>\n"
        f'<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Oslo</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">2</{D}parameter>\n'
        f"</{D}invoke>\n"
        f"</{D}function_calls><｜end▁of▁sentence｜>"
        "\n\n<function_results>\n<result>rain</result>\n</function_results>\n\n<think>"
        "It rains.</think>Rain.<｜end▁of▁sentence｜>"
    )  # fmt: skip


def test_without_thinking_the_turns_open_closed():
    tok, t = StrTokenizer(), DeepSeekV32ChatTemplate(thinking=False)
    first = tok.decode(t.first(tok, "Hi", []), keep_special=True)
    assert first == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    assert tok.decode(t.observation(tok, "x")).endswith("</function_results>\n\n</think>")
    turn = t.assistant(tok, None, "Hello")
    assert turn[-1] == tok.eos_id and tok.decode(turn) == "Hello"


@pytest.mark.parametrize("thinking", [True, False])
def test_dsml_calls_parse_back(thinking):
    t = DeepSeekV32ChatTemplate(thinking=thinking)
    arguments = {"cities": ["Oslo", "Rome"], "budget": 1200.5, "note": "a<b", "ok": True}
    call = ToolCall("plan", arguments)
    head = "weigh options</think>" if thinking else ""
    assert t.parse(head + "Planning." + dsml_call(call)) == call
    assert t.parse(head + "The answer is 4.") is None  # a turn without a call: the answer
    assert t.parse(head + dsml_call(ToolCall("noop", {}))) == ToolCall("noop", {})


@pytest.mark.parametrize(
    "body, message",
    [
        (f'<{D}invoke name="a">\n</{D}invoke>', "not closed"),
        (f"<{D}invoke name=\"a\">\n</{D}invoke>\n<{D}invoke name=\"b\">\n</{D}invoke>\n"
         f"</{D}function_calls>", "one tool call per turn, found 2"),
        (f'<{D}invoke name="a">\n<{D}parameter name="n" string="false">x y</{D}parameter>\n'
         f"</{D}invoke>\n</{D}function_calls>", "not JSON"),
        (f'<{D}invoke name="a">\n<{D}parameter name="n">1</{D}parameter>\n</{D}invoke>\n'
         f"</{D}function_calls>", "malformed parameters"),
        (f"junk</{D}function_calls>", "malformed function_calls"),
        (f'<{D}invoke name="a">\n</{D}invoke>\n</{D}function_calls> and more', "text after"),
    ],
)  # fmt: skip
def test_malformed_dsml_is_an_error_with_a_message(body, message):
    t = DeepSeekV32ChatTemplate(thinking=False)
    got = t.parse(f"\n\n<{D}function_calls>\n" + body)
    assert isinstance(got, ToolCallError) and message in got.message


def test_thinking_mode_needs_the_reasoning_closed():
    got = DeepSeekV32ChatTemplate(thinking=True).parse("no end of thought")
    assert isinstance(got, ToolCallError) and "</think>" in got.message
    assert isinstance(DeepSeekV32ChatTemplate(False).parse(f"<{D}invoke"), ToolCallError)


def test_templates_by_name():
    assert isinstance(chat_template("deepseek-v3.2", thinking=False), DeepSeekV32ChatTemplate)
    assert chat_template("text", list_tools=False).prompt_lists_tools is False
    with pytest.raises(ValueError, match="chat template"):
        chat_template("chatml")


@pytest.fixture(scope="module")
def v32_tokenizer(tmp_path_factory):
    """A byte-level BPE whose special tokens are DeepSeek-V3.2's (BOS id 0, EOS id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ['<invoke name="find_book"> parameter name="id" string="true"> function_results'] * 50
    bpe.train_from_iterator(text, trainer)
    root = tmp_path_factory.mktemp("v32tok")
    bpe.save(str(root / "tokenizer.json"))
    (root / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return HFTokenizer(root)


class IdsEngine:
    """Answers each turn with the next scripted token ids (pi_old -0.5, routing 0)."""

    name, weight_version = "scripted", 0

    def __init__(self, turns):
        self.turns = list(turns)

    def generate(self, prompts, sampling, n=1):
        [prompt] = prompts
        ids = self.turns.pop(0)
        return [
            Trajectory(
                prompt_ids=list(prompt),
                response_ids=ids,
                logprobs=np.full(len(ids), -0.5, np.float32),
                routing=np.zeros((len(prompt) + len(ids) - 1, 1, 2), np.uint8),
                kept_ids=[np.zeros(0, np.int32)] * len(ids),
                sampling=sampling,
                finish_reason="stop",
                engine=self.name,
                weight_version=0,
            )  # fmt: skip
        ]


def test_a_v32_episode_trains_on_the_templates_rendering(v32_tokenizer):
    """A 3-hop lookup episode under DeepSeek-V3.2's format: the model's turns (reasoning, a
    DSML call, EOS) come from the template, the episode runner parses them from the tokens
    and appends the results; the record is the rendering, the mask exactly the turns."""
    tok, t = v32_tokenizer, DeepSeekV32ChatTemplate(thinking=True)
    spec = next(s for s in map(lookup_family, range(20)) if len(s.tools) == 5)  # 2 links
    task, calls = spec.generate(3)
    turns = [t.assistant(tok, c, reasoning=f"step {i}") for i, c in enumerate(calls)]
    env = spec.environment()
    [ep] = run_episodes(
        IdsEngine(turns), [env], [task], tok, Sampling(max_tokens=400), template=t,
        token_budget=8192,
    )  # fmt: skip
    assert ep.end_reason == "done" and ep.reward == 1.0 and ep.num_turns == len(calls) == 5
    replay = spec.environment()
    replay.tools_in_prompt = False
    prompt = replay.reset(task)
    assert "Tools:" not in prompt  # the schemas are in the system block instead
    messages = []
    for i, call in enumerate(calls):
        messages.append({"role": "assistant", "tool_call": call, "reasoning": f"step {i}"})
        observation, _ = replay.step(call)
        if i < len(calls) - 1:
            messages.append({"role": "tool", "content": observation})
    want = render(t, tok, prompt, replay.tool_schemas(), messages)
    assert ep.token_ids == want
    mask = [False] * len(want)
    for role, a, b in ep.spans:
        if role == "assistant":
            mask[a:b] = [True] * (b - a)
    assert ep.loss_mask == mask and sum(mask) == sum(map(len, turns))
    # ... and the learner's batch row is that rendering, its loss on exactly those turns.
    from rl.batch import Batch

    ep.reward = 1.0
    batch = Batch.from_episodes([ep], [0])
    assert batch.input_ids[0, : len(want)].tolist() == want
    assert batch.response_mask[0, : len(want)].tolist() == mask
    text = tok.decode(ep.token_ids, keep_special=True)
    assert text.count("<result>") == 4 and f'name="{calls[1].name}"' in text


def test_the_text_template_lists_tools_only_when_asked():
    spec = lookup_family(0)
    task, calls = spec.generate(0)
    for list_tools in (True, False):
        env = spec.environment()
        env.tools_in_prompt = TextChatTemplate(list_tools=list_tools).prompt_lists_tools
        assert ("Tools:" in env.reset(task)) is list_tools
