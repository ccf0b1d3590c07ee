"""The API's decoder: `pick` samples as OpenAI defines, `TextStream` releases only final text (no half
characters, no part of a stop string), and `complete()` on the real SmolLM2 picks the same tokens as
transformers' own greedy `generate()`."""

from __future__ import annotations

import threading

import pytest
import torch

from swarmllm.api.generation import Piece, Sampling, TextStream, complete, lookup, nucleus_candidates, pick
from tests.counters import CountForwards

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]

QUESTION = "What is the capital of France?"
TEXT = "Hello world. STOP here"  # tokens: 'Hello' ' world' '.' ' ST' 'OP' ' here'



# pick


def _probs_logits(*probs: float) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert pick(logits, Sampling(max_tokens=1, temperature=0), None) == int(logits.argmax())


def _samples(logits: torch.Tensor, sampling: Sampling, n: int = 300) -> set[int]:
    generator = torch.Generator().manual_seed(0)
    return {pick(logits, sampling, generator) for _ in range(n)}


@pytest.mark.parametrize(("top_p", "allowed"), [(1.0, {0, 1, 2}), (0.6, {0, 1}), (0.5, {0}), (0.4, {0})])
def test_top_p_samples_from_the_smallest_nucleus(top_p: float, allowed: set[int]) -> None:
    # Probabilities 0.5, 0.3, 0.2: 0.5 alone reaches top_p <= 0.5, 0.6 needs the second token too.
    logits = _probs_logits(0.5, 0.3, 0.2)
    assert _samples(logits, Sampling(max_tokens=1, top_p=top_p)) == allowed


@pytest.mark.parametrize("scale", [12.0, 1.0])  # peaked: the nucleus lies in the top 1024; flat: it does not
def test_top_p_ranks_only_the_tokens_its_nucleus_can_reach_and_draws_what_a_full_sort_draws(scale: float) -> None:
    """The nucleus is found among the 1,024 most likely tokens when they hold top_p's mass, and by sorting the
    whole vocabulary otherwise; either way a seeded generator draws what it draws after a full sort."""
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(3)) * scale
    sampling = Sampling(max_tokens=1, temperature=0.7, top_p=0.9)
    probs = torch.softmax(logits / 0.7, dim=-1)
    ranked, _ = nucleus_candidates(probs, 0.9)
    assert ranked.numel() == (1024 if scale > 1 else 49152)

    def full_sort(generator: torch.Generator) -> int:
        ranked, order = probs.sort(descending=True)
        ranked[ranked.cumsum(0) - ranked >= 0.9] = 0.0
        return int(order[torch.multinomial(ranked, 1, generator=generator)])

    fast, full = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    draws = [pick(logits, sampling, fast) for _ in range(50)]
    assert draws == [full_sort(full) for _ in range(50)] and len(set(draws)) > 1


def test_a_seeded_generator_reproduces_its_samples() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    sampling = Sampling(max_tokens=1, temperature=1.5, top_p=0.9)

    def draw(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [pick(logits, sampling, generator) for _ in range(30)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


@pytest.mark.parametrize(("presence", "frequency", "count", "expected"), [
    (0.0, 0.0, 3, 0),  # no penalty: 2.0 beats 1.45
    (0.3, 0.1, 2, 0),  # 2.0 - (0.3 + 0.1*2) = 1.5 still beats 1.45
    (0.3, 0.1, 3, 1),  # 2.0 - (0.3 + 0.1*3) = 1.4 loses
    (0.6, 0.0, 1, 1),  # presence alone
    (0.0, 0.2, 3, 1),  # frequency alone: 2.0 - 0.6
    (0.0, 0.2, 2, 0),  # 2.0 - 0.4
])
def test_penalties_subtract_presence_plus_frequency_times_count(presence, frequency, count, expected) -> None:
    logits = torch.tensor([2.0, 1.45, 0.0])
    sampling = Sampling(max_tokens=1, temperature=0, presence_penalty=presence, frequency_penalty=frequency)
    assert pick(logits, sampling, None, {0: count}) == expected
    assert logits.tolist() == pytest.approx([2.0, 1.45, 0.0])  # the caller's logits are left alone


def test_a_negative_presence_penalty_favours_tokens_already_used() -> None:
    sampling = Sampling(max_tokens=1, temperature=0, presence_penalty=-1.5)
    assert pick(torch.tensor([1.0, 2.0]), sampling, None, {0: 1}) == 0


def test_logit_bias_adds_to_the_named_tokens_and_leaves_the_callers_logits_alone() -> None:
    logits = torch.tensor([2.0, 1.5, 0.0])
    assert pick(logits, Sampling(max_tokens=1, temperature=0, logit_bias=((0, -100.0),)), None) == 1
    assert pick(logits, Sampling(max_tokens=1, temperature=0, logit_bias=((2, 2.5),)), None) == 2
    assert pick(logits, Sampling(max_tokens=1, temperature=0, logit_bias=((1, 0.4),)), None) == 0  # 1.9 < 2.0
    sampled = Sampling(max_tokens=1, temperature=1.0, seed=0, logit_bias=((0, -100.0), (1, -100.0)))
    assert {pick(logits, sampled, torch.Generator().manual_seed(i)) for i in range(20)} == {2}
    assert logits.tolist() == [2.0, 1.5, 0.0]


# TextStream


def _feed(tokenizer, text: str, stops: tuple[str, ...] = ()) -> tuple[TextStream, list[str], str]:
    """Feed `text`'s tokens one by one, as `complete()` does (stopping at a stop string); returns the
    stream, the piece returned for each token, and what flush() released at the end."""
    stream = TextStream(tokenizer, stops)
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        pieces.append(stream.add(token))
        if stream.stopped:
            break
    return stream, pieces, stream.flush()


@pytest.mark.parametrize("text", [
    TEXT,
    "Café, naïve façade — 日本語のテキスト 🙂🎉 done.\n  Two  spaces,\ttabs and <b>tags</b>!",
    "def f(x):\n    return x ** 2  # comment\n",
])
def test_pieces_join_to_the_decoded_text(smollm2_tokenizer, text: str) -> None:
    stream, pieces, tail = _feed(smollm2_tokenizer, text)
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert "".join(pieces) + tail == smollm2_tokenizer.decode(ids) == text
    assert not stream.stopped and stream.flush() == ""


def test_a_character_split_across_byte_tokens_is_never_shown_half(smollm2_tokenizer) -> None:
    ids = smollm2_tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1 and "\ufffd" in smollm2_tokenizer.decode(ids[:1])  # the case under test really occurs
    stream, pieces, tail = _feed(smollm2_tokenizer, "I feel 🙂🙂, 日本 🎉")
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == "I feel 🙂🙂, 日本 🎉"
    stream, pieces, tail = _feed(smollm2_tokenizer, "🙂")
    assert pieces == ["", "🙂"] and tail == ""


@pytest.mark.parametrize(("stops", "expected"), [
    ((" world",), "Hello"),  # the stop string is one whole token
    (("orl",), "Hello w"),  # inside a token: the token's text before it is kept
    (("STOP",), "Hello world. "),  # across ' ST' 'OP'
    (("lo world. S",), "Hel"),  # across four tokens
    (("Hello",), ""),  # at the very start
    (("here", "STOP"), "Hello world. "),  # the earliest in the text wins, not the first listed
    (("world", "lo w"), "Hel"),  # both completed by the same token: the earlier one in the text wins
    (("lo w", "world"), "Hel"),
    (("", "STOP"), "Hello world. "),  # an empty stop string is ignored
])
def test_text_is_cut_before_the_first_stop_string(smollm2_tokenizer, stops, expected) -> None:
    stream, pieces, tail = _feed(smollm2_tokenizer, TEXT, stops)
    # Released text only grows, so equality at the end means no piece ever held any part of the stop.
    assert "".join(pieces) + tail == expected
    assert stream.stopped and stream.text == expected


def test_no_stop_string_found_releases_everything(smollm2_tokenizer) -> None:
    stream, pieces, tail = _feed(smollm2_tokenizer, TEXT, ("xyz", "STOPPED"))
    assert "".join(pieces) + tail == TEXT and not stream.stopped


def test_a_tail_that_only_looked_like_a_stop_string_is_released_later(smollm2_tokenizer) -> None:
    # After ' ST' and 'OP' the text ends in "ST", then "STOP": both could start "STOPPED", so they wait;
    # ' here' rules it out and the held text comes out with that token, not only at the end.
    stream, pieces, tail = _feed(smollm2_tokenizer, TEXT, ("STOPPED",))
    assert "ST" not in "".join(pieces[:-1])
    assert pieces[-1] == "STOP here" and tail == ""
    assert not stream.stopped


def test_flush_releases_a_held_tail_when_the_text_ends(smollm2_tokenizer) -> None:
    stream, pieces, tail = _feed(smollm2_tokenizer, "Hello world. ST", ("STOP",))
    assert "".join(pieces) == "Hello world. " and tail == "ST" and not stream.stopped


# complete() on the real SmolLM2


@pytest.fixture(scope="module")
def prompt(smollm2_tokenizer) -> list[int]:
    messages = [{"role": "user", "content": QUESTION}]
    return list(smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


@pytest.fixture(scope="module")
def eos(smollm2_local, smollm2_tokenizer) -> frozenset[int]:
    ids = smollm2_local.generation_config.eos_token_id
    return frozenset([*(ids if isinstance(ids, list) else [ids]), smollm2_tokenizer.eos_token_id])


def _join(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces)


@pytest.fixture(scope="module")
def greedy_reference(smollm2_local, prompt) -> list[int]:
    """transformers' greedy tokens for the prompt, ending with the EOS token it stopped at."""
    with torch.inference_mode():
        out = smollm2_local.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_generate(smollm2_local, smollm2_tokenizer, prompt, eos, greedy_reference) -> None:
    assert greedy_reference[-1] in eos and len(greedy_reference) < 16  # it ended by itself
    pieces: list[Piece] = []
    c = complete(smollm2_local, smollm2_tokenizer, prompt, Sampling(max_tokens=16, temperature=0), eos,
                 emit=pieces.append)
    assert c.token_ids == greedy_reference[:-1]  # the EOS is not part of the text...
    assert c.completion_tokens == len(greedy_reference)  # ...but was generated, so it is counted
    assert c.finish_reason == "stop" and c.prompt_tokens == len(prompt)
    assert c.text == smollm2_tokenizer.decode(greedy_reference, skip_special_tokens=True) == _join(pieces)
    assert c.logprobs is None and all(not p.logprobs for p in pieces)  # not asked for


def test_the_token_budget_ends_with_length(smollm2_local, smollm2_tokenizer, prompt, eos, greedy_reference) -> None:
    c = complete(smollm2_local, smollm2_tokenizer, prompt, Sampling(max_tokens=3, temperature=0), eos)
    assert c.finish_reason == "length"
    assert c.token_ids == greedy_reference[:3] and c.completion_tokens == 3


def test_a_stop_string_ends_the_completion(smollm2_local, smollm2_tokenizer, prompt, eos) -> None:
    pieces: list[Piece] = []
    c = complete(smollm2_local, smollm2_tokenizer, prompt, Sampling(max_tokens=16, temperature=0, stop=(" Paris",)),
                 eos, emit=pieces.append)
    assert c.finish_reason == "stop"
    assert c.text == _join(pieces) == "The capital of France is"


def test_cancel_stops_at_the_next_token(smollm2_local, smollm2_tokenizer, prompt, eos) -> None:
    cancel = threading.Event()
    pieces: list[Piece] = []

    def emit(piece: Piece) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()

    c = complete(smollm2_local, smollm2_tokenizer, prompt, Sampling(max_tokens=16, temperature=0), eos, cancel, emit)
    assert c.finish_reason == "cancelled"
    assert len(pieces) == 3  # nothing is flushed after a cancel
    assert c.completion_tokens == len(c.token_ids) == 3


def test_a_seed_reproduces_a_sample(smollm2_local, smollm2_tokenizer, prompt, eos) -> None:
    sampling = Sampling(max_tokens=6, temperature=0.9, seed=1234)
    first = complete(smollm2_local, smollm2_tokenizer, prompt, sampling, eos)
    second = complete(smollm2_local, smollm2_tokenizer, prompt, sampling, eos)
    assert first.text == second.text and first.token_ids == second.token_ids
    assert first.completion_tokens >= 1


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax at every position of one full forward over `ids` (positions, vocab)."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_logprobs_are_the_models_and_travel_with_their_text(smollm2_local, smollm2_tokenizer, prompt, eos,
                                                             greedy_reference) -> None:
    pieces: list[Piece] = []
    c = complete(smollm2_local, smollm2_tokenizer, prompt, Sampling(max_tokens=16, temperature=0, logprobs=3), eos,
                 emit=pieces.append)
    assert c.token_ids == greedy_reference[:-1]
    # Every generated token has an entry, the end-of-sequence one too (marked: it has no text).
    assert len(c.logprobs) == c.completion_tokens == len(greedy_reference)
    assert [e.end for e in c.logprobs] == [False] * len(c.token_ids) + [True]
    assert [lp for p in pieces for lp in p.logprobs] == c.logprobs  # each streamed piece carries its tokens'
    ref = _reference_logprobs(smollm2_local, prompt + c.token_ids)
    for i, (token, entry) in enumerate(zip(greedy_reference, c.logprobs)):
        want = ref[len(prompt) - 1 + i]
        assert entry.token == smollm2_tokenizer.decode([token])
        assert entry.logprob == pytest.approx(float(want[token]), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0] == (entry.token, entry.logprob)  # greedy: the best one
        best = want.topk(3)
        assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [t for t, _ in entry.top] == [smollm2_tokenizer.decode([t]) for t in best.indices.tolist()]


def test_max_tokens_0_scores_the_prompt_alone(smollm2_local, smollm2_tokenizer, prompt, eos) -> None:
    c = complete(smollm2_local, smollm2_tokenizer, prompt,
                 Sampling(max_tokens=0, temperature=0, logprobs=1, prompt_logprobs=True), eos)
    assert c.text == "" and c.completion_tokens == 0 and c.logprobs == [] and c.finish_reason == "length"
    assert len(c.prompt_logprobs) == len(prompt)
    assert c.prompt_logprobs[0].logprob is None and c.prompt_logprobs[0].token == smollm2_tokenizer.decode(prompt[:1])
    ref = _reference_logprobs(smollm2_local, prompt)
    for i, entry in enumerate(c.prompt_logprobs[1:], 1):
        assert entry.token == smollm2_tokenizer.decode([prompt[i]])
        assert entry.logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        assert entry.top[0][1] == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    # Scoring the prompt in the prefill does not change what is generated after it.
    both = complete(smollm2_local, smollm2_tokenizer, prompt,
                    Sampling(max_tokens=4, temperature=0, logprobs=0, prompt_logprobs=True), eos)
    plain = complete(smollm2_local, smollm2_tokenizer, prompt, Sampling(max_tokens=4, temperature=0), eos)
    assert both.token_ids == plain.token_ids
    assert [e.logprob for e in both.prompt_logprobs[1:]] == pytest.approx([e.logprob for e in c.prompt_logprobs[1:]])
    assert all(e.top == () for e in both.prompt_logprobs[1:])  # logprobs=0: no alternatives


# Prompt lookup (ApiConfig.prompt_lookup)


@pytest.mark.parametrize("history, most, expected", [
    ([1, 2, 3, 9, 1, 2, 3], 2, [9, 1]),  # the 3-token tail occurred before: what followed it
    ([5, 1, 2, 7, 8, 4, 2], 3, [7, 8, 4]),  # only the last token occurred before
    ([1, 2, 3], 4, []),  # nothing repeats
    ([4, 4, 4], 0, []),
])
def test_lookup_drafts_what_followed_the_latest_earlier_occurrence_of_the_tail(history, most, expected) -> None:
    assert lookup(history, most) == expected


@pytest.mark.parametrize("logprobs", [None, 2])
def test_prompt_lookup_gives_plain_greedys_tokens_in_fewer_steps(smollm2_local, smollm2_tokenizer, eos, logprobs) -> None:
    """A repetitive prompt: the drafts are often right. Same tokens, text and logprobs as without drafts."""
    text = "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog."
    prompt = list(smollm2_tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                        return_dict=True)["input_ids"])
    sampling = Sampling(max_tokens=24, temperature=0, logprobs=logprobs)
    counter = CountForwards(smollm2_local)
    try:
        plain = complete(smollm2_local, smollm2_tokenizer, prompt, sampling, eos)
        plain_steps, counter.calls = counter.calls, 0
        pieces: list[Piece] = []
        drafted = complete(smollm2_local, smollm2_tokenizer, prompt, sampling, eos, emit=pieces.append, prompt_lookup=5)
    finally:
        counter.handle.remove()
    assert drafted.token_ids == plain.token_ids and drafted.text == plain.text == _join(pieces)
    assert drafted.completion_tokens == plain.completion_tokens and drafted.finish_reason == plain.finish_reason
    if logprobs:
        assert [e.token for e in drafted.logprobs] == [e.token for e in plain.logprobs]
        for a, b in zip(drafted.logprobs, plain.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert counter.calls < plain_steps == plain.completion_tokens


def test_prompt_lookup_leaves_sampled_requests_alone(smollm2_local, smollm2_tokenizer, prompt, eos) -> None:
    sampling = Sampling(max_tokens=8, temperature=0.8, seed=3)
    counter = CountForwards(smollm2_local)
    try:
        c = complete(smollm2_local, smollm2_tokenizer, prompt, sampling, eos, prompt_lookup=5)
    finally:
        counter.handle.remove()
    assert counter.calls == c.completion_tokens
    assert c.token_ids == complete(smollm2_local, smollm2_tokenizer, prompt, sampling, eos).token_ids
