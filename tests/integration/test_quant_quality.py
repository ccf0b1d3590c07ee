"""Quality gates of the real SmolLM2 under int8, int4, NF4 and bfloat16, on the first 512 tokens of the
shipped evaluation text (two windows of 256, scored as bench/quant.py scores the whole ~2,650 tokens). The
whole text took 148 s of the suite on 2 cores that emulate bfloat16 GEMMs, and 1,024 tokens 42-78 s;
bench/quant.py keeps reporting the whole text.

The gate is perplexity within 5% of float32. int8, int4 and bfloat16 pass it. int4 (groups of 32, min..max
grid) is GGUF's Q4_1 layout, which SmolLM2's weights come from: it finds every weight's own 4-bit code again
and differs from the checkpoint only by its bfloat16 scales. NF4 does not pass on this 135M model
(its weights come from a Q4_1 GGUF, i.e. already 4-bit, and rounding them onto the NF4 grid costs ~24-31%;
NF4 blocks down to 8 did not close the gap, see docs/quantization.md). So NF4's gate is an expected
failure (strict: it flags the day it passes), and a looser bound guards NF4 against regressions.
"""

from __future__ import annotations

import logging

import pytest
import torch

from swarmllm.models.evaluation import eval_text, quantized_copy, score_text

pytestmark = pytest.mark.real_model

logger = logging.getLogger(__name__)

WINDOW = 256
TOKENS = 512
GATE = 1.05
# Measured on these 512 tokens (perplexity ratio to float32, top-1 agreement with float32): int8 0.9978 /
# 0.963, int4 1.0010 / 0.986, bfloat16 1.0017 / 0.969, nf4 1.350 / 0.706 (on the first 1,024 in windows of
# 512: int8 1.0000 / 0.968, int4 0.9993 / 0.985, bfloat16 1.0017 / 0.961, nf4 1.311 / 0.715; on the whole
# text: int8 1.003 / 0.966, int4 1.0003 / 0.984, bfloat16 1.0006 / 0.966, nf4 1.242 / 0.723). int4 through
# its kernel at every row count measured 1.0005 / 0.983 once by forcing it; tests/unit/test_quant.py checks
# the kernel against the dequantized weight. The bounds below leave margin for other torch builds and CPUs.
MIN_TOP1 = {"int8": 0.93, "int4": 0.95, "bfloat16": 0.93, "nf4": 0.65}
NF4_MAX_RATIO = 1.50  # NF4 varies most with the text: 1.24 on the whole text, 1.35 on these 512 tokens


@pytest.fixture(scope="module")
def scores(smollm2_local, smollm2_tokenizer) -> dict[str, tuple[float, float]]:
    """variant -> (perplexity ratio to float32, top-1 agreement with float32), computed once."""
    text = eval_text()
    base = score_text(smollm2_local, smollm2_tokenizer, text, WINDOW, TOKENS)
    out = {}
    for variant in ("int8", "int4", "nf4", "bfloat16"):
        if variant == "bfloat16":
            model = quantized_copy(smollm2_local, "none").to(torch.bfloat16)
        else:
            model = quantized_copy(smollm2_local, variant)
        score = score_text(model, smollm2_tokenizer, text, WINDOW, TOKENS)
        ratio, top1 = score.perplexity / base.perplexity, score.agreement(base)
        logger.info("%s: perplexity ratio %.4f, top-1 agreement %.4f (float32 perplexity %.3f)",
                    variant, ratio, top1, base.perplexity)
        out[variant] = (ratio, top1)
        del model
    return out


@pytest.mark.parametrize("variant", [
    "int8", "int4", "bfloat16",
    pytest.param("nf4", marks=pytest.mark.xfail(strict=True, reason="NF4 costs SmolLM2-135M ~24% perplexity")),
])
def test_perplexity_within_5_percent_of_float32(variant, scores, record_property):
    ratio, top1 = scores[variant]
    record_property("perplexity_ratio", ratio)
    record_property("top1_agreement", top1)
    assert ratio < GATE, f"{variant}: perplexity ratio {ratio:.4f} (top-1 agreement {top1:.4f})"


@pytest.mark.parametrize("variant", ["int8", "int4", "bfloat16", "nf4"])
def test_top1_agreement_with_float32(variant, scores):
    ratio, top1 = scores[variant]
    assert top1 >= MIN_TOP1[variant], f"{variant}: top-1 agreement {top1:.4f} (perplexity ratio {ratio:.4f})"


def test_nf4_perplexity_does_not_regress(scores):
    ratio, _ = scores["nf4"]
    assert ratio < NF4_MAX_RATIO, f"nf4: perplexity ratio {ratio:.4f}"
