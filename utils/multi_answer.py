"""Lesson 03: a skill with several right answers, where the teacher's soft targets carry news.

Every skill of the world has one right answer, written by a program, so the teacher's next-token
distribution on it is almost one-hot and distilling it adds almost nothing to the label
(lesson 03, section 4). Real assistants are not like that: "name a colour", "suggest a title",
"write it another way" each have many right answers, and the teacher's distribution over them is
the knowledge. This module is the world's smallest such skill, **any letter**:

    user: Name one letter of b r o u n.
    assistant: Answer: o

Every letter of the word is right, and the *true* answer distribution picks a position
uniformly, so a letter that occurs twice is twice as likely (``true_distribution``). A labelled
dataset holds **one** sampled answer per prompt, like any dataset; the teacher holds the whole
distribution. The score is exact, without sampling: the student's next-token distribution right
after ``Answer:`` (:func:`next_letter_probs`) against the true one (:func:`distribution_scores`):
validity (its mass on letters of the word), total variation to the truth, coverage and entropy.

Words are the world's made-up words (:mod:`utils.data`), spelled with spaces, so every letter is
one token of the world's tokenizer and no answer can come from knowing English.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "ANSWER_CUE",
    "FRAMES",
    "N_WORDS",
    "SEED",
    "SKILL",
    "alphabet",
    "chat_record",
    "distribution_scores",
    "gold_records",
    "letter_token_ids",
    "next_letter_probs",
    "prompt_text",
    "sampled_records",
    "true_distribution",
    "words",
]

SKILL = "any_letter"
SEED = 20261206
FRAMES = ("Name one letter of {w}.", "Give me any letter of {w}.", "Pick a letter from {w}.")
ANSWER_CUE = "Answer:"  # the scored position: the next token after the assistant writes this
N_WORDS = {"train": 4000, "test": 300}


def words(split: str) -> list[str]:
    """The skill's made-up words of ``split`` ("train" or "test"; disjoint, deterministic)."""
    from utils.data import _pseudo_words

    if split not in N_WORDS:
        raise ValueError(f"split must be one of {', '.join(N_WORDS)}, got {split!r}")
    pool = _pseudo_words(random.Random(SEED), sum(N_WORDS.values()), 4, 8)
    return pool[:N_WORDS["train"]] if split == "train" else pool[N_WORDS["train"]:]


def true_distribution(word: str) -> dict[str, float]:
    """The right answers and their probabilities: a uniformly chosen position's letter."""
    if not word or not word.isalpha() or not word.islower():
        raise ValueError(f"word must be lower-case letters a-z, got {word!r}")
    return {c: n / len(word) for c, n in sorted(Counter(word).items())}


def prompt_text(word: str, frame: int = 0) -> str:
    """The user's request for ``word`` in phrasing ``frame`` (letters spelled with spaces)."""
    return FRAMES[frame].format(w=" ".join(word))


def chat_record(word: str, letter: str, *, frame: int = 0, source: str = "gold") -> dict:
    """One training chat (the world's record shape): the request and ``Answer: <letter>``."""
    return {"kind": "skill", "skill": SKILL, "word": word, "answer": letter,
            "label_source": source,
            "messages": [{"role": "user", "content": prompt_text(word, frame)},
                         {"role": "assistant", "content": f"Answer: {letter}"}]}


def gold_records(word_list: Sequence[str], *, seed: int) -> list[dict]:
    """A labelled dataset: **one** answer per word, drawn from the true distribution by ``seed``.

    The phrasing is drawn too. This is what a dataset of this skill looks like: each prompt's
    label is one right answer among several, and says nothing about the others.
    """
    rng = random.Random(seed)
    return [chat_record(w, rng.choice(w), frame=rng.randrange(len(FRAMES))) for w in word_list]


def sampled_records(word_list: Sequence[str], letters: Sequence[str], *, seed: int,
                    source: str) -> list[dict]:
    """Chats with given answers (e.g. a teacher's greedy or sampled letters), phrasing drawn."""
    if len(letters) != len(word_list):
        raise ValueError(f"{len(letters)} answers for {len(word_list)} words: give one per word")
    rng = random.Random(seed)
    return [chat_record(w, c, frame=rng.randrange(len(FRAMES)), source=source)
            for w, c in zip(word_list, letters, strict=True)]


def alphabet() -> str:
    """The letters the world's made-up words use (:mod:`utils.data`'s syllables)."""
    from utils.data import _CODAS, _ONSETS, _VOWELS

    return "".join(sorted(set("".join((*_ONSETS, *_VOWELS, *_CODAS)))))


def letter_token_ids(tokenizer: Any) -> dict[str, int]:
    """Letter of :func:`alphabet` -> the id of its one token after ``Answer:`` (``"Ġa"``).

    Raises, naming the fix, when a letter is not one token (a tokenizer not trained on the world).
    """
    ids = {}
    for c in alphabet():
        enc = tokenizer(f"{ANSWER_CUE} {c}", add_special_tokens=False)["input_ids"]
        cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
        if enc[:len(cue)] != cue or len(enc) != len(cue) + 1:
            raise ValueError(f"the tokenizer does not write ' {c}' after {ANSWER_CUE!r} as one "
                             "token: this skill needs the world's tokenizer (utils.tokenizer)")
        ids[c] = enc[-1]
    return ids


def _prompt_ids(tokenizer: Any, word: str) -> list[int]:
    """The chat prompt (:func:`utils.extraction.prompt_ids`) followed by ``Answer:``'s tokens.

    The template ends in a special token, so encoding the two apart gives the ids of the
    joined text (checked on all 4,300 words: tests/test_multi_answer.py)."""
    from utils.extraction import prompt_ids

    cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    return prompt_ids([{"role": "user", "content": prompt_text(word)}], tokenizer) + cue


@torch.no_grad()
def next_letter_probs(model: Any, tokenizer: Any, word_list: Sequence[str], *,
                      batch_size: int = 64) -> torch.Tensor:
    """(n, vocab) next-token probabilities right after ``Answer:``, one row per word.

    Teacher-forced on the first phrasing: exact, no sampling noise. Prompts are left-padded
    into batches (positions follow the attention mask), in eval mode; the caller's mode is kept.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    try:
        for start in range(0, len(word_list), batch_size):
            seqs = [_prompt_ids(tokenizer, w) for w in word_list[start:start + batch_size]]
            width = max(map(len, seqs))
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs],
                                device=device)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            rows.append(torch.softmax(logits[:, -1].float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows) if rows else torch.empty(0)


def distribution_scores(probs: torch.Tensor, word_list: Sequence[str],
                        letter_ids: dict[str, int]) -> dict[str, Any]:
    """Score next-letter distributions against the truth, word by word, and their means.

    - ``validity``: the mass on letters of the word (sampling gives a right answer this often);
    - ``tv``: total variation distance to :func:`true_distribution` over the whole vocabulary
      (mass on wrong tokens counts fully), 0 = the truth, 1 = disjoint;
    - ``coverage``: the share of the word's distinct letters that get at least half of their
      true probability (a mode-seeker that always says one letter covers little);
    - ``entropy``: nats of the whole next-token distribution (the truth: ``truth_entropy``).
    """
    if probs.ndim != 2 or probs.shape[0] != len(word_list):
        raise ValueError(f"probs must be (n_words, vocab) = ({len(word_list)}, V), "
                         f"got {tuple(probs.shape)}")
    per_word = []
    for p, w in zip(probs, word_list, strict=True):
        truth = true_distribution(w)
        q = torch.zeros_like(p)
        for c, v in truth.items():
            q[letter_ids[c]] = v
        got = {c: float(p[letter_ids[c]]) for c in truth}
        per_word.append({
            "word": w,
            "validity": sum(got.values()),
            "tv": 0.5 * float((p - q).abs().sum()),
            "coverage": sum(got[c] >= 0.5 * v for c, v in truth.items()) / len(truth),
            "entropy": float(-(p * p.clamp_min(1e-30).log()).sum()),
            "truth_entropy": -sum(v * math.log(v) for v in truth.values()),
        })
    keys = ("validity", "tv", "coverage", "entropy", "truth_entropy")
    n = max(len(per_word), 1)
    return {**{k: sum(r[k] for r in per_word) / n for k in keys}, "n": len(per_word),
            "per_word": per_word}
