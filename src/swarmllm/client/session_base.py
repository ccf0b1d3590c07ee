"""What every inference session shares, remote (`InferenceSession`) or mixed with local blocks
(`PipelineSession`): its position in the sequence, rewinding it, and counters of the work it did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SessionCounters:
    steps: int = 0  # steps taken: each is one pass through the route's servers, one after another
    fed: int = 0  # tokens fed to the blocks (a prompt, drafted tokens, replays after a longrope restart)
    rewound: int = 0  # cached tokens dropped by rewinds (rejected draft tokens, cache invalidation)


class SessionBase:
    """Position and counters. Subclasses step through their parts and call `_advance`; `_rewind_parts(n)` makes
    every part keep its first `n` tokens."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self._position = 0
        self.prefix = 0  # prompt-tuning tokens the caches hold before the first real token
        self.counters = SessionCounters()
        # Token history kept by `generate` to continue the session in a later call.
        self.output_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None

    @property
    def position(self) -> int:
        """Tokens every part's cache holds (prompt-tuning tokens included). Setting it lower rewinds."""
        return self._position

    @position.setter
    def position(self, n: int) -> None:
        self.rewind(n)

    def rewind(self, n: int) -> None:
        """Keep only the first `n` cached tokens: the next step continues at position `n` (Petals' cache
        invalidation; assisted generation dropping rejected draft tokens)."""
        if not 0 <= n <= self._position:
            raise ValueError(f"can rewind a session of {self._position} tokens to 0..{self._position}, not {n}")
        if n == self._position:
            return
        self._rewind_parts(n)
        self.counters.rewound += self._position - n
        self._position = n

    def _rewind_parts(self, n: int) -> None:
        raise NotImplementedError

    def _advance(self, tokens: int) -> None:
        self._position += tokens
        self.counters.steps += 1
        self.counters.fed += tokens


class GenerationSession(Protocol):
    """What `generate`, the backbone and the API use of a session: `InferenceSession` (all blocks remote) and
    `PipelineSession` (some blocks on the client) both provide it, through `SessionBase`."""

    max_length: int
    prefix: int
    counters: SessionCounters
    output_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None

    @property
    def position(self) -> int: ...

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def rewind(self, n: int) -> None: ...

    def reorder(self, hypo_ids: torch.Tensor) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class GenerationStats:
    """What one `generate` call cost. Each step yields one token of its own (the model's next token) plus the
    draft tokens it accepts, so accepted = new_tokens - steps and drafted = accepted + rewound."""

    new_tokens: int  # positions generated (per sequence)
    steps: int  # round trips through the route
    drafted: int  # draft tokens checked (assisted generation, prompt lookup); 0 without drafts
    accepted: int

    @classmethod
    def between(cls, before: SessionCounters, after: SessionCounters, new_tokens: int) -> GenerationStats:
        steps = after.steps - before.steps
        rewound = after.rewound - before.rewound
        accepted = max(0, new_tokens - steps)
        return cls(new_tokens, steps, accepted + rewound, accepted)

    @property
    def steps_per_token(self) -> float:
        return self.steps / max(1, self.new_tokens)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens over those checked; None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    def __str__(self) -> str:
        text = f"{self.new_tokens} tokens in {self.steps} steps ({self.steps_per_token:.2f} per token)"
        if self.drafted:
            text += f"; {self.accepted} of {self.drafted} draft tokens accepted ({self.acceptance_rate:.0%})"
        return text
