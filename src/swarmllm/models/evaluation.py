"""Quality checks for a changed model (quantized, another dtype) against a reference, on a fixed text.

Models are plain local transformers causal LMs. Texts are scored in consecutive, non-overlapping windows
of `window` tokens, each scored on its own (no context carried across windows, so the first token of each
window is never predicted). This is cheaper than a strided sliding window and gives slightly higher
perplexities, but every model is scored on exactly the same predictions, which is what a comparison needs.
"""

from __future__ import annotations

import copy
import importlib.resources
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarmllm.models.family import family_of, root_of
from swarmllm.models.quant import QuantMode, quantize_blocks
from swarmllm.models.span import text_config

logger = logging.getLogger(__name__)


def eval_text() -> str:
    """The evaluation text shipped with swarmllm (`swarmllm/data/eval.txt`, CC0, ~2,200 words)."""
    return (importlib.resources.files("swarmllm") / "data" / "eval.txt").read_text(encoding="utf-8")


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:  # (tokens,)
    """The text's token ids without special tokens, cut to the first `max_tokens` if given."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


def _windows(ids: torch.Tensor, window: int) -> Iterator[torch.Tensor]:  # yields (1, <= window)
    if window < 2:
        raise ValueError(f"a window needs at least 2 tokens, got {window}")
    for start in range(0, ids.numel(), window):
        chunk = ids[start : start + window]
        if chunk.numel() >= 2:  # a lone trailing token predicts nothing
            yield chunk[None]


@dataclass(frozen=True)
class TextScore:
    """One model's teacher-forced predictions on a text: all that perplexity and agreement need."""

    nll: float
    """Summed next-token negative log-likelihood (nats) over the predicted positions."""
    top1: torch.Tensor
    """(positions,) the model's argmax next token at each predicted position, in text order."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.top1.numel())

    def agreement(self, other: TextScore) -> float:
        """Fraction of positions where both scores' argmax tokens are the same (same text and windows)."""
        if self.top1.shape != other.top1.shape:
            raise ValueError(f"scores of different texts or windows: {self.top1.shape} != {other.top1.shape}")
        return (self.top1 == other.top1).float().mean().item()


@torch.inference_mode()
def score_text(model: nn.Module, tokenizer, text: str, window: int = 512, max_tokens: int | None = None) -> TextScore:
    """Run `model` over the text's windows once and keep the summed NLL and the argmax tokens."""
    ids = token_ids(tokenizer, text, max_tokens)
    nll, top1 = 0.0, []
    for chunk in _windows(ids, window):
        logits = model(input_ids=chunk).logits[0, :-1].float()  # (w - 1, vocab)
        nll += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        top1.append(logits.argmax(-1))
    return TextScore(nll=nll, top1=torch.cat(top1))


def perplexity(model: nn.Module, tokenizer, text: str, window: int = 512, max_tokens: int | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over non-overlapping windows of `window` tokens."""
    return score_text(model, tokenizer, text, window, max_tokens).perplexity


def top1_agreement(
    model_a: nn.Module, model_b: nn.Module, tokenizer, text: str, window: int = 512, max_tokens: int | None = None,
) -> float:
    """Fraction of positions (teacher-forced, same windows as `perplexity`) where both models' next-token
    argmax is the same token. To compare several models with one reference, score each once with
    `score_text` and use `TextScore.agreement`."""
    a = score_text(model_a, tokenizer, text, window, max_tokens)
    return a.agreement(score_text(model_b, tokenizer, text, window, max_tokens))


@torch.inference_mode()
def greedy_tokens(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> list[int]:  # ids: (1, prompt)
    """Exactly `new_tokens` greedy tokens after `ids` (an early EOS does not shorten the run)."""
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def greedy_agreement(reference: list[int], other: list[int]) -> tuple[float, int | None]:
    """(fraction of positions with the same token, index of the first difference or None if identical).

    Positions after the first difference are still compared; they usually differ since the contexts do.
    """
    if len(reference) != len(other):
        raise ValueError(f"token lists differ in length: {len(reference)} != {len(other)}")
    same = [a == b for a, b in zip(reference, other)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / len(same), first


def quantized_copy(model: nn.Module, mode: QuantMode) -> nn.Module:
    """A deep copy of a transformers causal LM whose decoder blocks (the family's stack) are
    quantized (a plain copy for "none"); embeddings, final norm and lm_head stay as they are, as on a
    swarm, where servers hold only blocks. `model` itself is left unchanged."""
    clone = copy.deepcopy(model)
    family = family_of(text_config(clone.config))
    quantize_blocks(root_of(clone, family).get_submodule(family.layers), mode)
    return clone
