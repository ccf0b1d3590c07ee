"""Scoring helpers of swarmllm.models.evaluation on a tiny random Llama, with a byte-level stand-in tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm.models import evaluation, quant


class ByteTokenizer:
    """Maps each byte to a token id below the tiny model's vocabulary of 97."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [b % 97 for b in text.encode()]}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_the_shipped_text_is_long_enough_to_score():
    assert len(evaluation.eval_text().split()) > 1500


def test_perplexity_is_the_exponent_of_the_mean_window_loss(tiny):
    text, tok = evaluation.eval_text()[:300], ByteTokenizer()
    ids = evaluation.token_ids(tok, text)  # 300 tokens: windows of 128, 128 and 44
    with torch.no_grad():
        losses = [(tiny(input_ids=ids[None, s : s + 128], labels=ids[None, s : s + 128]).loss, min(128, 300 - s) - 1)
                  for s in range(0, 300, 128)]
    want = math.exp(sum(loss.item() * n for loss, n in losses) / sum(n for _, n in losses))
    assert evaluation.perplexity(tiny, tok, text, window=128) == pytest.approx(want, rel=1e-5)
    assert evaluation.score_text(tiny, tok, text, window=128).top1.numel() == 297


def test_a_model_agrees_with_itself_and_its_quantized_copy_mostly(tiny):
    text, tok = evaluation.eval_text()[:256], ByteTokenizer()
    assert evaluation.top1_agreement(tiny, tiny, tok, text, window=64) == 1.0
    copy = evaluation.quantized_copy(tiny, "int8")
    assert not any(isinstance(m, quant.QuantizedLinear) for m in tiny.modules())  # the original is untouched
    assert sum(isinstance(m, quant.QuantizedLinear) for m in copy.modules()) == 4 * 7
    assert evaluation.top1_agreement(tiny, copy, tok, text, window=64) > 0.8


def test_greedy_agreement_counts_matches_and_the_first_difference():
    assert evaluation.greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
    assert evaluation.greedy_agreement([1, 2, 3, 4], [1, 5, 3, 6]) == (0.5, 1)
    with pytest.raises(ValueError):
        evaluation.greedy_agreement([1], [1, 2])
