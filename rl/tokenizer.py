"""Tokenizers the trainer uses to turn task text into token ids and back.

`CharTokenizer` is a fixed character vocabulary for the built-in synthetic tasks (no files, no
downloads): id 0 is BOS and id 1 EOS, matching the `bos_token_id` / `eos_token_id` that
policy checkpoints declare, then the printable ASCII characters. `HFTokenizer` wraps the
tokenizer shipped in a real checkpoint directory (`tokenizer.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

BOS, EOS = 0, 1
_CHARS = [chr(c) for c in range(32, 127)]


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


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

    def decode(self, ids: list[int]) -> str:
        return "".join(_CHARS[i - 2] for i in ids if 2 <= i < self.vocab_size)


class HFTokenizer:
    """The `tokenizer.json` of a local checkpoint directory (never downloaded)."""

    def __init__(self, directory: str | Path, bos_id: int = BOS, eos_id: int = EOS) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(Path(directory) / "tokenizer.json"))
        self.bos_id, self.eos_id = bos_id, eos_id
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
