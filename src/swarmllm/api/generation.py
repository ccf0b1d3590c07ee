"""One completion, token by token: sampling, stop conditions, incremental text and cancellation.

The API does not call `generate()`: it needs a random generator per request (so `seed` reproduces a sample
while other requests sample concurrently; `generate()` draws from torch's one global generator), a check for
cancellation between steps (a client that hangs up frees its server-side session at once), and text
released as it becomes final (stop strings may not leak). Greedy decoding picks the same tokens as
`generate(do_sample=False)`: the API tests assert it against the swarm and local transformers.

The loop runs on any causal LM: the distributed model (its cache is the servers' session) or a local
transformers model (a DynamicCache), which the unit tests use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from swarmllm.api.constrained import Vocabulary

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Sampling:
    """What a request asks of the decoder; validated by the API's request schemas."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit before picking)
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely tokens there
    prompt_logprobs: bool = False  # also score the prompt's tokens (completions' echo), in the same prefill
    # Output constrained to this llguidance grammar (response_format's JSON modes; see api/constrained.py).
    grammar: str | None = None
    grammar_param: str = "response_format"  # the request field it came from, which errors name


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (its raw distribution: before temperature, top_p and
    penalties, as OpenAI reports it), and the most likely tokens at that position, best first."""

    token: str  # the token decoded alone (a character split across tokens shows as U+FFFD)
    logprob: float | None  # None only for a prompt's first token: nothing comes before it
    top: tuple[tuple[str, float], ...] = ()
    end: bool = False  # the end-of-sequence token: generated and counted, but it has no text


@dataclass
class Piece:
    """Text that became final, with the logprobs of the tokens generated since the previous piece."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # only on the piece sent right after the prefill


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # every generated token, an end-of-sequence one included
    prompt_logprobs: list[TokenLogprob] | None = None  # every prompt token, the first with logprob None


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
         counts: dict[int, int] | None = None, allowed: torch.Tensor | None = None) -> int:
    """The next token from one position's logits (vocab,). OpenAI's penalties subtract from the logits of
    tokens already generated: presence once, frequency per occurrence; `logit_bias` adds to the logits of the
    tokens it names (-100 bans a token in practice, 100 all but forces it). `allowed` (vocab,) bool: the
    only tokens that may be picked (a grammar's)."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))  # a copy: the reported logprobs stay the model's
    penalised = counts and (sampling.presence_penalty or sampling.frequency_penalty)
    if penalised or sampling.logit_bias:
        logits = logits.clone()  # the caller's logits also feed the reported logprobs: leave them alone
    if penalised and counts:
        ids = torch.tensor(list(counts))
        n = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits[ids] -= sampling.presence_penalty + sampling.frequency_penalty * n
    if sampling.logit_bias:
        biased, bias = zip(*sampling.logit_bias)
        logits[list(biased)] += torch.tensor(bias, dtype=logits.dtype)
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        # Nucleus: the smallest set of most likely tokens whose mass reaches top_p (never empty).
        ranked, order = nucleus_candidates(probs, sampling.top_p)
        outside = ranked.cumsum(0) - ranked >= sampling.top_p
        # The draw runs over the whole vocabulary's length, zeros past the nucleus, as with a full sort: the same
        # generator draws the same token.
        weights = probs.new_zeros(probs.shape)
        weights[: ranked.numel()] = ranked.masked_fill(outside, 0.0)
        return int(order[torch.multinomial(weights, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


# The most likely tokens ranked first for top_p. Sorting SmolLM2's whole vocabulary (49,152) costs 2.9 ms of CPU
# per token, most of what the host spends on a sampled token (its share of an 8-row LM-head pass: 1.4 ms).
NUCLEUS_FIRST = 1024


def nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`probs` (vocab,) in descending order, with their token ids, as far as top_p's nucleus can reach: the top
    `NUCLEUS_FIRST` when their mass reaches `top_p` (the nucleus then lies within them: every later token
    follows at least that mass), the whole vocabulary sorted otherwise (a flat distribution)."""
    if probs.numel() > NUCLEUS_FIRST:
        ranked, order = probs.topk(NUCLEUS_FIRST)
        if float(ranked.sum()) >= top_p:
            return ranked, order
    return probs.sort(descending=True)


class TextStream:
    """Turns tokens into text that is safe to show: holds back an incomplete UTF-8 character and any tail
    that could be the start of a stop string, and cuts the text at the first stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; return the newly final text (maybe empty). Sets `stopped` at a stop string."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        self.text = text
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1 and (not self.stopped or at < len(self.text)):
                self.text, self.stopped = text[:at], True
        if self.stopped:
            return self._release(len(self.text))
        return self._release(len(text) - self._held(text))

    def flush(self) -> str:
        """Everything not yet released (at the end of the completion)."""
        return self._release(len(self.text))

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text) - self.sent), longest, -1):
                if stop.startswith(text[len(text) - n:]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out


@contextlib.contextmanager
def _cache(model, max_length: int) -> Iterator[DynamicCache]:
    """The distributed model keeps its cache on the servers, in a session closed on exit (also when the
    client hangs up); a local model keeps a DynamicCache."""
    if hasattr(model, "inference_session"):
        from swarmllm.client.model import RemoteCache

        with model.inference_session(max_length=max_length) as session:
            yield RemoteCache(session)
    else:
        yield DynamicCache()


class _Decoder:
    """The per-token bookkeeping of one completion: picking, counts for penalties, the grammar, logprobs, the
    released text and pieces."""

    def __init__(self, tokenizer, sampling: Sampling, eos: frozenset[int], emit: Callable[[Piece], None] | None,
                 matcher):
        self.tokenizer, self.sampling, self.eos, self.emit, self.matcher = tokenizer, sampling, eos, emit, matcher
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator()
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator.manual_seed(seed)
        self.stream = TextStream(tokenizer, sampling.stop)
        self.counts: dict[int, int] = {}
        self.produced: list[TokenLogprob] = []
        self.pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not released yet

    @property
    def generated(self) -> int:
        return sum(self.counts.values())

    def take(self, logits: torch.Tensor) -> tuple[int, bool]:
        """Pick the next token from its position's logits (vocab,) and account for it; (token, stop here)."""
        allowed = self.matcher.allowed(logits.shape[-1]) if self.matcher is not None else None
        token = pick(logits, self.sampling, self.generator, self.counts, allowed)
        if self.matcher is not None and token not in self.eos:
            self.matcher.advance(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.sampling.logprobs is not None:
            [entry] = score(self.tokenizer, logits[None], [token], self.sampling.logprobs)
            self.pending.append(dataclasses.replace(entry, end=True) if token in self.eos else entry)
        if token in self.eos:
            return token, True
        piece = self.stream.add(token)
        if piece:
            self.produced.extend(self.pending)
            if self.emit is not None:
                self.emit(Piece(piece, self.pending))
            self.pending = []
        return token, self.stream.stopped


def lookup(history: list[int], most: int, ngram: int = 3) -> list[int]:
    """Prompt lookup: up to `most` tokens that followed the latest earlier occurrence of the longest tail of
    `history` (`ngram` tokens down to 1) that occurred before; [] when none did."""
    if most <= 0:
        return []
    for n in range(min(ngram, len(history) - 1), 0, -1):
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == tail:
                return history[start + n : start + n + most]
    return []


def complete(model, tokenizer, prompt: list[int], sampling: Sampling, eos: frozenset[int],
             cancel: threading.Event | None = None, emit: Callable[[Piece], None] | None = None,
             vocabulary: Vocabulary | None = None, prompt_lookup: int = 0) -> Completion:
    """Decode up to `sampling.max_tokens` tokens after `prompt`, calling `emit` with each piece of final text.
    Stops at an end-of-sequence token, a stop string, the token budget, or when `cancel` is set.
    `max_tokens` may be 0: with `prompt_logprobs`, that scores the prompt alone. A `sampling.grammar` needs
    the tokenizer's `vocabulary`; the end of sequence then comes only where the grammar may end.

    `prompt_lookup` > 0 drafts that many tokens per step by prompt lookup (`lookup`) for a greedy request
    without a grammar: one pass checks them all, the tokens up to the first the model would not have picked
    are kept, and the cache is rewound past the rest. The tokens are exactly those of plain greedy decoding
    (up to the float rounding of a multi-token pass); there are fewer steps when drafts are right."""
    matcher = None
    if sampling.grammar is not None:
        if vocabulary is None:
            raise ValueError("a grammar needs the tokenizer's vocabulary")
        matcher = vocabulary.matcher(sampling.grammar)
    if sampling.max_tokens == 0 and not sampling.prompt_logprobs:  # nothing to compute: open no session
        return Completion("", "length", len(prompt), 0, logprobs=[] if sampling.logprobs is not None else None)
    cancel = cancel or threading.Event()
    drafts = prompt_lookup if sampling.temperature == 0 and matcher is None else 0
    decoder = _Decoder(tokenizer, sampling, eos, emit, matcher)
    prompt_logprobs = None
    finish: FinishReason = "length"
    device = model.device  # the client's embeddings and head may live on a GPU; picking and scoring stay on the CPU
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    history = list(prompt)
    with _cache(model, len(prompt) + sampling.max_tokens) as cache, torch.inference_mode():
        ahead = None  # logits for the next position, when the prefill already gave them
        if sampling.prompt_logprobs and not cancel.is_set():
            logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=0).logits[0].cpu()  # (prompt, vocab)
            first = TokenLogprob(tokenizer.decode(prompt[:1]), None)
            prompt_logprobs = [first, *score(tokenizer, logits[:-1], prompt[1:], sampling.logprobs or 0)]
            ahead = logits[-1:]
            if emit is not None:  # a stream echoes the prompt first, with these
                emit(Piece("", prompt_logprobs=prompt_logprobs))
        while decoder.generated < sampling.max_tokens:
            if cancel.is_set():
                finish = "cancelled"
                break
            draft = lookup(history, min(drafts, sampling.max_tokens - decoder.generated - 1)) if ahead is None else []
            if ahead is None:
                step = torch.cat([ids, torch.tensor([draft], dtype=torch.long, device=device)], 1) if draft else ids
                rows = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1 + len(draft)).logits[0].cpu()
            else:
                rows, ahead = ahead, None
            for j, row in enumerate(rows):  # (vocab,) each: the position after ids, then after each draft token
                token, stop = decoder.take(row)
                history.append(token)
                if stop:
                    finish = "stop"
                    break
                if j == len(draft) or token != draft[j] or decoder.generated == sampling.max_tokens:
                    break
            if finish == "stop":
                break
            if draft and j < len(draft):
                cache.crop(j - len(draft))  # keep ids and the j draft tokens taken; drop the rest
            ids = torch.tensor([[token]], dtype=torch.long, device=device)
    stream = decoder.stream
    rest = stream.flush() if finish != "cancelled" else ""
    decoder.produced.extend(decoder.pending)
    if (rest or decoder.pending) and emit is not None and finish != "cancelled":
        emit(Piece(rest, decoder.pending))
    return Completion(stream.text, finish, len(prompt), decoder.generated, stream.ids,
                      logprobs=decoder.produced if sampling.logprobs is not None else None,
                      prompt_logprobs=prompt_logprobs)


def score(tokenizer, logits: torch.Tensor, tokens: list[int], k: int, rows: int = 256) -> list[TokenLogprob]:
    """Each of `tokens` scored by the logits of its position (positions, vocab), with the `k` best there.
    In slices of `rows` positions: a long prompt's log-softmax at once would take gigabytes."""
    out = []
    for start in range(0, len(tokens), rows):
        lp = torch.log_softmax(logits[start:start + rows].float(), dim=-1)  # (rows, vocab)
        chosen = lp.gather(1, torch.tensor(tokens[start:start + rows])[:, None])[:, 0].tolist()
        top_values, top_ids = lp.topk(k, dim=-1) if k else (None, None)
        for i, token in enumerate(tokens[start:start + rows]):
            top = () if top_ids is None or top_values is None else tuple(
                (tokenizer.decode([t]), v) for t, v in zip(top_ids[i].tolist(), top_values[i].tolist()))
            out.append(TokenLogprob(tokenizer.decode([token]), chosen[i], top))
    return out
