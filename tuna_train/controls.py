"""Controls for held-out ranking accuracy: does the model rank by the instruction, or by the answers alone?

- :func:`shuffled_prompts`: every held-out group's candidates under another held-out group's prompt. A
  model that follows instructions should fall to about chance there.
- :class:`BigramScorer`: a scorer that never sees the prompt: the mean character-bigram log-likelihood of a
  response (EOS included, add-one smoothing), fitted on the best responses of the training data.
  :func:`prompt_free_accuracy` is its held-out pairwise accuracy: what ranking by the look of the answers
  alone achieves.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Dict, List, Sequence

from .data import RankedExample
from .evaluation.ranking import ranking_metrics

_BOUNDARY = "\x00"  # start and end of a response


def shuffled_prompts(examples: Sequence[RankedExample]) -> List[RankedExample]:
    """Each example's candidates and scores with the prompt of the next example (the last takes the first)."""
    if len(examples) < 2:
        return []
    return [dataclasses.replace(example, instruction=other.instruction, input=other.input,
                                prompt_is_formatted=other.prompt_is_formatted)
            for example, other in zip(examples, list(examples[1:]) + [examples[0]])]


class BigramScorer:
    """Character-bigram language model of responses; ``score`` is the mean log-probability per character."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.pairs: Counter = Counter()
        self.firsts: Counter = Counter()
        alphabet = {_BOUNDARY}
        for text in texts:
            chars = _BOUNDARY + text + _BOUNDARY
            alphabet.update(chars)
            for a, b in zip(chars, chars[1:]):
                self.pairs[a, b] += 1
                self.firsts[a] += 1
        self.size = len(alphabet) + 1  # + one slot for characters never seen

    def score(self, text: str) -> float:
        chars = _BOUNDARY + text + _BOUNDARY
        logps = [math.log((self.pairs[a, b] + 1) / (self.firsts[a] + self.size)) for a, b in zip(chars, chars[1:])]
        return sum(logps) / len(logps)


def prompt_free_accuracy(train: Sequence[RankedExample], held_out: Sequence[RankedExample]) -> Dict[str, float]:
    """Ranking metrics (``tuna_train.evaluation.ranking.ranking_metrics``) of :class:`BigramScorer` fitted on the best
    response of every training example, on the held-out examples."""
    scorer = BigramScorer([example.responses[0] for example in train if example.responses])
    return ranking_metrics([[scorer.score(r) for r in e.responses] for e in held_out], [e.scores for e in held_out])
