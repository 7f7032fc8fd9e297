"""Tokenizers the trainer uses to turn task text into token ids and back.

`CharTokenizer` is a fixed character vocabulary for the built-in synthetic tasks (no files, no
downloads): id 0 is BOS and id 1 EOS, matching the `bos_token_id` / `eos_token_id` that
policy checkpoints declare, then the printable ASCII characters. `HFTokenizer` wraps the
tokenizer shipped in a real checkpoint directory (`tokenizer.json`, with the BOS/EOS ids of its
config.json and the chat template of its tokenizer_config.json when it has one).

`load_tokenizer(model_config)` is the config's choice (`model.tokenizer`): "auto" takes the
checkpoint's own tokenizer when `model.checkpoint` has a tokenizer.json and the character
tokenizer otherwise; "char" forces the latter; any other value is a directory holding a
tokenizer.json. Every command that turns a run's tokens into text (train, replay, inspect)
uses the run's tokenizer this way. `prompt_ids(text)` is how a task's prompt becomes the
tokens a rollout starts from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

BOS, EOS = 0, 1
_CHARS = [chr(c) for c in range(32, 127)]


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], keep_special: bool = False) -> str: ...

    def prompt_ids(self, text: str) -> list[int]: ...


class CharTokenizer:
    """One id per printable ASCII character (ids 2..96), BOS = 0, EOS = 1."""

    bos_id, eos_id = BOS, EOS
    vocab_size = 2 + len(_CHARS)

    def __init__(self) -> None:
        self._ids = {ch: i + 2 for i, ch in enumerate(_CHARS)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is outside the char tokenizer's "
                "printable-ASCII vocabulary"
            ) from None

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        """The characters of ids (BOS and EOS have no text, kept or not)."""
        return "".join(_CHARS[i - 2] for i in ids if 2 <= i < self.vocab_size)

    def prompt_ids(self, text: str) -> list[int]:
        """BOS, then the prompt's characters."""
        return [self.bos_id, *self.encode(text)]


class HFTokenizer:
    """The `tokenizer.json` of a local directory (never downloaded), with the BOS/EOS ids of
    the directory's config.json (0 and 1 when it has none) and, when its
    tokenizer_config.json has a `chat_template`, prompts rendered as one user message."""

    def __init__(self, directory: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        directory = Path(directory)
        self._tok = _Tok.from_file(str(directory / "tokenizer.json"))
        config = _json(directory / "config.json")
        self.bos_id = int(config.get("bos_token_id", BOS))
        self.eos_id = int(config.get("eos_token_id", EOS))
        self.vocab_size = self._tok.get_vocab_size()
        self.chat_template = _json(directory / "tokenizer_config.json").get("chat_template")
        self._template: Any = None  # the compiled chat template, built at first use

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        """The text of ids; special tokens (BOS, EOS, role and tool-call markers) only with
        keep_special (a chat template parsing a turn needs them)."""
        return self._tok.decode(ids, skip_special_tokens=not keep_special)

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt as the checkpoint expects it: its chat template applied to one user
        message (the template writes its own BOS), else BOS then the text."""
        if not self.chat_template:
            return [self.bos_id, *self.encode(text)]
        if self._template is None:  # compiled once: every prompt of every step renders it
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            self._template = ImmutableSandboxedEnvironment().from_string(self.chat_template)
        rendered = self._template.render(
            messages=[{"role": "user", "content": text}],
            add_generation_prompt=True,
            bos_token=self._tok.id_to_token(self.bos_id) or "",
            eos_token=self._tok.id_to_token(self.eos_id) or "",
        )
        return self.encode(rendered)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def load_tokenizer(model: Any) -> Tokenizer:
    """The tokenizer `model.tokenizer` names (see the module docstring); `model` is the
    config's `model` section."""
    choice = model.tokenizer
    if choice == "char":
        return CharTokenizer()
    if choice == "auto":
        if model.checkpoint and (Path(model.checkpoint).expanduser() / "tokenizer.json").exists():
            return HFTokenizer(Path(model.checkpoint).expanduser())
        return CharTokenizer()
    directory = Path(choice).expanduser()
    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(f"model.tokenizer: {directory} holds no tokenizer.json")
    return HFTokenizer(directory)
