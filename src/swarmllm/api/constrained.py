"""Constrained decoding: output that parses as JSON and validates against a schema (response_format,
tool call arguments), with llguidance.

A grammar is compiled once per request from a JSON schema; each choice walks it with a matcher that says,
before every token, which tokens may come next. Those are the only ones the decoder may pick (greedy takes
the best allowed token, sampling renormalises over them), and the end-of-sequence token is allowed only
where the grammar may end. The model's distribution is untouched otherwise: logprobs stay the raw model's.
The cost is measured by bench/constrained.py.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from swarmllm.api.errors import ApiError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact JSON: a model free to write whitespace may spend its whole budget on it (tiny models do).
_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
_BITS = torch.arange(32, dtype=torch.int32)


def grammar_for(schema: dict[str, Any], param: str) -> str:
    """A grammar for output that validates against `schema`; 400 naming `param` if the schema is not one."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"{param}: not a JSON schema: {e}", param=param) from None


class Vocabulary:
    """The tokenizer as llguidance sees it (converting it takes ~0.5 s: one per engine), and grammar checks."""

    def __init__(self, tokenizer, eos: frozenset[int]):
        import llguidance.hf

        self.ll = llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(eos))

    def check(self, grammar: str, param: str) -> None:
        """400 naming `param` if llguidance cannot enforce the grammar (an unknown type or format, a keyword it
        does not implement): enforcing only part of a schema would return output that does not validate."""
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, self.ll)
        if error:
            raise ApiError(400, f"{param}: cannot enforce this schema: {error}", param=param)

    def matcher(self, grammar: str) -> Matcher:
        return Matcher(self, grammar)


class Matcher:
    """One choice's position in the grammar."""

    def __init__(self, vocabulary: Vocabulary, grammar: str):
        from llguidance import LLMatcher

        self._m = LLMatcher(vocabulary.ll, grammar, log_level=0)
        self._check()

    def allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens that may come next. Ids past the tokenizer's (the LM head's padding)
        never may."""
        words = torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.int32)  # (ceil(V / 32),)
        bits = ((words[:, None] >> _BITS) & 1).reshape(-1).bool()  # bit j of word i: token 32 i + j
        if bits.numel() < vocab:
            bits = torch.cat([bits, bits.new_zeros(vocab - bits.numel())])
        return bits[:vocab]

    def advance(self, token: int) -> None:
        self._m.consume_token(token)
        self._check()

    @property
    def complete(self) -> bool:
        """The output so far is a whole document of the grammar (it may end here)."""
        return self._m.is_accepting()

    def _check(self) -> None:
        if self._m.is_error():  # only a token outside the mask gets here: a decoder bug, not the request's
            raise RuntimeError(f"constrained decoding failed: {self._m.get_error()}")
