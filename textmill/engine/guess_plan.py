"""Which guessed tokens a step carries (engine/ngram_draft.py guesses, engine/step_costs.py prices).

Only a step of decodes alone, with nobody waiting, carries guesses: a guess would take
budget and blocks that a waiting request or a prompt could use. Every decoding request of
a draftable kind (SamplingParams.draftable) proposes what its text suggests; each guess
holds with its request's odds (NgramDrafter.odds) to the power of its place, and the
likeliest go in while they raise the tokens a second that the step is expected to make.
"""
from __future__ import annotations

from collections import Counter

from textmill.engine.ngram_draft import NgramDrafter
from textmill.engine.request import Request
from textmill.engine.step_costs import StepCosts


def plan_guesses(running: list[Request], drafter: NgramDrafter, costs: StepCosts, budget: int,
                 max_model_len: int) -> dict[str, tuple[int, ...]]:
    """Each running request's guesses for this step (request id -> tokens; none: not there),
    none past max_tokens or the window (the last token of either is the sampled one), and at
    most `budget` less one token for each running request in all. The caller has checked
    that every running request is decoding and nothing waits."""
    spare = budget - len(running)
    # Not even guesses sure to hold would pay (the step is bound by arithmetic, or its rows
    # are not timed yet): propose nothing, which also spares every request's lookup.
    if spare <= 0 or costs.worth_taking(len(running), [1.0] * min(spare, len(running) * drafter.max_tokens)) == 0:
        return {}
    proposals: dict[str, tuple[int, ...]] = {}
    ranked: list[tuple[float, int, str]] = []  # (the chance it holds, its place, request)
    for request in running:
        room = min(spare, request.params.max_tokens - request.num_output_tokens - 1,
                   max_model_len - request.num_tokens - 1)
        if room <= 0 or not request.params.draftable:
            continue
        guess = drafter.propose(request, room)
        if guess:
            proposals[request.request_id] = guess
            odds = drafter.odds(request.request_id)
            ranked += [(odds ** (i + 1), i, request.request_id) for i in range(len(guess))]
    # Within a request the chances fall with the place (ties: the earlier place first), so
    # the best k keep each request's guesses a prefix of its proposal.
    ranked.sort(key=lambda g: (-g[0], g[1]))
    ranked = ranked[:spare]
    take = costs.worth_taking(len(running), [p for p, _, _ in ranked])
    counts = Counter(rid for _, _, rid in ranked[:take])
    return {rid: proposals[rid][:k] for rid, k in counts.items()}
