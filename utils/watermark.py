"""Kirchenbauer et al. (2023) watermark detection by hand, and radioactivity (lesson 04).

The watermark: before sampling each token, a pseudo-random "green list" of
``gamma * V`` tokens is drawn from a seed that depends on the previous token, and
``bias`` is added to their logits. Text written this way holds more green tokens than
chance. Detection needs no model: recompute each green list, count the green tokens g
among the T scored ones and test against Binomial(T, gamma):

    z = (g - gamma T) / sqrt(T gamma (1 - gamma)),    p = P[Binomial(T, gamma) >= g].

The green lists here are drawn exactly as transformers' ``WatermarkLogitsProcessor`` draws
them (``lefthash``: ``torch.Generator`` seeded with ``hashing_key * previous_token``, then
``torch.randperm(V)[:int(gamma V)]``; ``selfhash``: the min-hash of the window with the
candidate token through the same fixed 1,000,003-entry table), so this detector agrees with
``transformers.WatermarkDetector`` token for token. Two documented differences:

- repeated n-grams: by default each (context, token) pair is counted once
  (``ignore_repeated=True``), because a repeated phrase is not fresh evidence and would
  inflate z; ``WatermarkDetector`` counts repeats unless ``ignore_repeated_ngrams=True``.
- the p-value here is the exact binomial tail (``scipy.stats.binom.sf``);
  ``WatermarkDetector`` reports the normal approximation ``1 - Phi(z)``.
  The z-scores are identical when both count the same tokens.

Radioactivity (Sander et al. 2024, "Watermarking makes language models radioactive"): a
student fine-tuned on watermarked text reproduces the green-list bias. Score the student's
own generations (or its teacher-forced next-token predictions), count each
(context, token) pair once across all texts, and run one combined binomial test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from scipy.stats import binom

_TABLE_SIZE = 1_000_003  # transformers' WatermarkLogitsProcessor.table_size


@dataclass(frozen=True)
class WatermarkScore:
    """Green-token count and the test against chance."""

    num_scored: int
    num_green: int
    greenlist_ratio: float
    z_score: float
    p_value: float

    @property
    def green_fraction(self) -> float:
        return self.num_green / self.num_scored if self.num_scored else float("nan")


def _settings(config: Any) -> dict:
    d = config if isinstance(config, dict) else config.to_dict()
    return {"greenlist_ratio": float(d.get("greenlist_ratio", 0.25)),
            "hashing_key": int(d.get("hashing_key", 15485863)),
            "seeding_scheme": d.get("seeding_scheme", "lefthash"),
            "context_width": int(d.get("context_width", 1))}


@lru_cache(maxsize=4)
def _fixed_table(hashing_key: int) -> torch.Tensor:
    rng = torch.Generator(device="cpu")
    rng.manual_seed(hashing_key)
    return torch.randperm(_TABLE_SIZE, generator=rng)


@lru_cache(maxsize=65536)
def _greenlist_from_seed(seed: int, vocab_size: int, greenlist_size: int) -> frozenset[int]:
    rng = torch.Generator(device="cpu")
    rng.manual_seed(seed % (2**64 - 1))
    return frozenset(torch.randperm(vocab_size, generator=rng)[:greenlist_size].tolist())


def greenlist(window: Sequence[int], vocab_size: int, config: Any) -> frozenset[int]:
    """The green token ids for a seeding ``window`` (as ``WatermarkLogitsProcessor``).

    ``lefthash``: the window is the context before the scored token (only its last token
    seeds). ``selfhash``: the window ends with the candidate token itself.
    """
    s = _settings(config)
    size = int(vocab_size * s["greenlist_ratio"])
    window = list(window)[-s["context_width"]:]
    if not window:
        raise ValueError("empty seeding window: a token needs a previous token to be scored")
    if s["seeding_scheme"] == "lefthash":
        seed = s["hashing_key"] * int(window[-1])
    elif s["seeding_scheme"] == "selfhash":
        table = _fixed_table(s["hashing_key"])
        seq = torch.tensor(window, dtype=torch.long)
        a = table[seq % _TABLE_SIZE] + 1
        b = table[seq[-1] % _TABLE_SIZE] + 1
        seed = int((s["hashing_key"] * a * b).min().item())  # int64 arithmetic, as upstream
    else:
        raise ValueError(f"seeding_scheme must be 'lefthash' or 'selfhash', got "
                         f"{s['seeding_scheme']!r}")
    return _greenlist_from_seed(seed, vocab_size, size)


def scored_pairs(token_ids: Sequence[int], config: Any, *,
                 start: int = 0) -> list[tuple[tuple[int, ...], int]]:
    """(context, token) pairs a detector scores, for tokens at positions >= ``start``.

    ``lefthash`` scores each token after the first ``context_width`` with the
    ``context_width`` tokens before it; ``selfhash`` uses the window ending at the token.
    """
    s = _settings(config)
    cw = s["context_width"]
    ids = [int(t) for t in token_ids]
    out = []
    if s["seeding_scheme"] == "lefthash":
        for t in range(max(cw, start), len(ids)):
            out.append((tuple(ids[t - cw: t]), ids[t]))
    else:
        for t in range(max(cw - 1, start), len(ids)):
            out.append((tuple(ids[t - cw + 1: t]), ids[t]))
    return out


def is_green(context: Sequence[int], token: int, vocab_size: int, config: Any) -> bool:
    """Whether ``token`` is green after ``context``."""
    s = _settings(config)
    window = list(context) if s["seeding_scheme"] == "lefthash" else [*context, token]
    return int(token) in greenlist(window, vocab_size, config)


def watermark_z(num_green: float, num_scored: float, greenlist_ratio: float) -> float:
    """z = (g - gamma T) / sqrt(T gamma (1 - gamma)) (Kirchenbauer et al. 2023, Eq. 3)."""
    if num_scored <= 0:
        raise ValueError("no tokens were scored: the text is too short to test")
    g, T, gamma = num_green, num_scored, greenlist_ratio
    return (g - gamma * T) / math.sqrt(T * gamma * (1 - gamma))


def binomial_p_value(num_green: int, num_scored: int, greenlist_ratio: float) -> float:
    """Exact one-sided p-value P[Binomial(T, gamma) >= g]."""
    return float(binom.sf(int(num_green) - 1, int(num_scored), greenlist_ratio))


def score_pairs(pairs: Iterable[tuple[tuple[int, ...], int]], vocab_size: int, config: Any, *,
                ignore_repeated: bool = True) -> WatermarkScore:
    """Count green tokens among (context, token) pairs and test against chance."""
    pairs = list(pairs)
    if ignore_repeated:
        pairs = list(dict.fromkeys(pairs))
    if not pairs:
        raise ValueError("no tokens to score: give at least context_width + 1 tokens")
    gamma = _settings(config)["greenlist_ratio"]
    g = sum(is_green(c, t, vocab_size, config) for c, t in pairs)
    T = len(pairs)
    return WatermarkScore(T, g, gamma, watermark_z(g, T, gamma), binomial_p_value(g, T, gamma))


def score_tokens(token_ids: Sequence[int], vocab_size: int, config: Any, *,
                 ignore_repeated: bool = True) -> WatermarkScore:
    """Detect the watermark in one token sequence (pass the generated part, no prompt)."""
    return score_pairs(scored_pairs(token_ids, config), vocab_size, config,
                       ignore_repeated=ignore_repeated)


def score_text(text: str, tokenizer: Any, vocab_size: int, config: Any, *,
               ignore_repeated: bool = True) -> WatermarkScore:
    """Detect the watermark in a text (re-tokenised without special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return score_tokens(ids, vocab_size, config, ignore_repeated=ignore_repeated)


# ----------------------------------------------------------------------------------------
# Radioactivity (Sander et al. 2024)


@torch.no_grad()
def radioactivity_score(student: Any, tokenizer: Any, prompts: Sequence[str],
                        watermark_config: Any, *, mode: Literal["generate", "read"] = "generate",
                        max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                        vocab_size: int | None = None) -> WatermarkScore:
    """Green-token test on what ``student`` writes, deduplicated over all prompts.

    ``mode="generate"``: the student samples a continuation of each prompt (chat template
    applied when the tokenizer has one); its generated tokens are scored.
    ``mode="read"``: teacher-forced reading of each prompt text; the student's argmax
    prediction at each position is scored with the true preceding tokens as context.
    Each (context, token) pair counts once over the whole set (Sander et al. 2024, Sec. 4).
    """
    vocab_size = vocab_size or int(student.config.get_text_config().vocab_size)
    cw = _settings(watermark_config)["context_width"]
    device = next(student.parameters()).device
    pairs: list[tuple[tuple[int, ...], int]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prompt in prompts:
            if mode == "generate":
                ids = _prompt_ids(prompt, tokenizer)
                x = torch.tensor([ids], device=device)
                kwargs: dict[str, Any] = (
                    {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                    if temperature > 0 else
                    {"do_sample": False, "temperature": None, "top_k": None, "top_p": None})
                out = student.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                       max_new_tokens=max_new_tokens,
                                       pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, **kwargs)
                seq = out[0].tolist()
                if tokenizer.eos_token_id in seq[len(ids):]:
                    seq = seq[: len(ids) + seq[len(ids):].index(tokenizer.eos_token_id)]
                pairs += scored_pairs(seq, watermark_config, start=len(ids))
            elif mode == "read":
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                if len(ids) <= cw:
                    continue
                x = torch.tensor([ids], device=device)
                pred = (
                    student(input_ids=x).logits[0].argmax(-1).tolist()
                )  # pred[t] follows ids[:t+1]
                for t in range(cw, len(ids)):
                    pairs.append((tuple(ids[t - cw: t]), pred[t - 1]))
            else:
                raise ValueError(f"mode must be 'generate' or 'read', got {mode!r}")
    return score_pairs(pairs, vocab_size, watermark_config, ignore_repeated=True)


def radioactivity_test(student: Any, tokenizer: Any, prompts: Sequence[str],
                       watermark_config: Any, **kwargs: Any) -> float:
    """p-value that ``student`` was NOT trained on text with this watermark (small: it was).

    See :func:`radioactivity_score` for the options; this returns its exact binomial p.
    """
    return radioactivity_score(student, tokenizer, prompts, watermark_config, **kwargs).p_value


def _prompt_ids(prompt: str, tokenizer: Any) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def green_z_score(token_ids: Sequence[int], is_green_fn: Any, greenlist_ratio: float) -> float:
    """z-score of a token sequence, each (previous token, token) pair counted once.

    ``is_green_fn(prev, token) -> bool`` says whether ``token`` is green after ``prev``
    (``lefthash`` with context width 1). The first token has no context and is not scored.
    The hand-written core of the detector (Exercise in lesson 04).
    """
    pairs = list(dict.fromkeys(zip(token_ids[:-1], token_ids[1:], strict=True)))
    g = sum(bool(is_green_fn(prev, tok)) for prev, tok in pairs)
    return watermark_z(g, len(pairs), greenlist_ratio)


# ----------------------------------------------------------------------------------------
# Radioactivity on realistic traffic: batched generations on fresh prompts (lesson 04)


@dataclass(frozen=True)
class Generation:
    """One chat generation: the prompt's token ids (chat template applied) and the new ids.

    ``ids`` stops before the end token; ``stopped`` says whether the model ended by itself.
    """

    prompt_ids: tuple[int, ...]
    ids: tuple[int, ...]
    stopped: bool


@torch.no_grad()
def chat_generations(model: Any, tokenizer: Any, prompts: Sequence[str], *,
                     max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                     watermark_config: Any = None, batch_size: int = 64) -> list[Generation]:
    """Answers of ``model`` to user ``prompts``, batched, greedy or sampled, maybe watermarked.

    The same ``generate`` call the course's API makes (``utils.serve``): chat template with the
    generation prompt, ``temperature=0`` greedy, otherwise sampling with ``top_k=0, top_p=1``,
    and ``watermark_config`` (a ``WatermarkingConfig``) applied while choosing each token.
    Rows are left-padded, so the watermark's seeding token is each row's own last token.
    Sampling is seeded once (``seed``) for the whole call: the same prompts, batch size and seed
    give the same answers. Lesson 04 scores the delta table and the suspects with it.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of str, got one str: wrap it in a list")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} "
                         f"and {batch_size}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = [_prompt_ids(p, tokenizer) for p in prompts]
    kwargs: dict[str, Any] = (
        {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
        if temperature > 0 else
        {"do_sample": False, "temperature": None, "top_k": None, "top_p": None})
    if watermark_config is not None:
        kwargs["watermarking_config"] = watermark_config
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[Generation] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(ids), batch_size):
                batch = ids[start:start + batch_size]
                width = max(len(x) for x in batch)
                x = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(x)
                for row, seq in enumerate(batch):  # left padding
                    x[row, width - len(seq):] = torch.tensor(seq)
                    mask[row, width - len(seq):] = 1
                gen = model.generate(input_ids=x.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     eos_token_id=eos, **kwargs)
                for seq, row in zip(batch, gen[:, width:].tolist(), strict=True):
                    stopped = eos is not None and eos in row
                    if stopped:
                        row = row[: row.index(eos)]
                    out.append(Generation(tuple(seq), tuple(int(t) for t in row), stopped))
    finally:
        model.train(was_training)
    return out


def generation_pairs(generations: Iterable[Generation],
                     config: Any) -> list[tuple[tuple[int, ...], int]]:
    """The (context window, token) pairs of the generated tokens, in order, repeats kept.

    The first generated token is scored too: its window is the end of the prompt (the chat
    template's assistant tag), exactly what seeded its green list when it was generated.
    """
    pairs: list[tuple[tuple[int, ...], int]] = []
    for g in generations:
        pairs += scored_pairs([*g.prompt_ids, *g.ids], config, start=len(g.prompt_ids))
    return pairs


def radioactivity_of_generations(generations: Iterable[Generation], vocab_size: int,
                                 config: Any) -> WatermarkScore:
    """Sander et al. (2024), closed-model test: one binomial test over a suspect's answers.

    Every (context window, token) tuple counts **once** over all answers (their "tape" of
    seen tuples): a suspect repeats the same phrases across answers, and counting repeats
    would turn one lucky green tuple into many and break the p-value. After de-duplication,
    under H0 (the suspect never saw watermarked text) the green lists are independent of what
    it wrote, each tuple is green with probability gamma, and ``p = P[Binomial(T, gamma) >= g]``
    (distinct tokens after one context share a green list drawn without replacement, which
    only narrows the count's spread). Lesson 04; ``tests/test_watermark.py`` checks a known
    case and the calibration under H0.
    """
    return score_pairs(generation_pairs(generations, config), vocab_size, config,
                       ignore_repeated=True)


@dataclass(frozen=True)
class FreshRadioactivity:
    """A suspect's radioactivity test on fresh prompts: the scores and what it wrote."""

    scores: dict[str, WatermarkScore]  # "greedy", "sampled", "greedy+sampled"
    greedy: list[Generation]
    sampled: list[Generation]


def radioactivity_on_fresh_prompts(model: Any, tokenizer: Any, prompts: Sequence[str],
                                   config: Any, *, training_prompts: Iterable[str],
                                   samples: int = 2, seed: int = 1000,
                                   max_new_tokens: int = 128,
                                   vocab_size: int | None = None) -> FreshRadioactivity:
    """Sander et al. (2024), closed model, on prompts the suspect never saw (lesson 04).

    The suspect answers every prompt greedily and ``samples`` times at temperature 1 (seeds
    ``seed``, ``seed + 1``, ...; :func:`chat_generations`); each mode is one de-duplicated
    binomial test (:func:`radioactivity_of_generations`). A prompt the suspect was trained on
    would replay its training text (watermarked or not) and test memory instead of
    radioactivity, so any prompt in ``training_prompts`` is refused with a ``ValueError``.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of str, got one str: wrap it in a list")
    if not prompts:
        raise ValueError("no prompts: give the suspect fresh prompts to answer")
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    seen = set(training_prompts)
    overlap = [p for p in prompts if p in seen]
    if overlap:
        raise ValueError(f"{len(overlap)} of {len(prompts)} prompts are training prompts (e.g. "
                         f"{overlap[0][:60]!r}): test radioactivity on fresh prompts the suspect "
                         "never saw (lesson 04 uses the validation split)")
    vocab = vocab_size or int(model.config.get_text_config().vocab_size)
    greedy = chat_generations(model, tokenizer, prompts, temperature=0.0,
                              max_new_tokens=max_new_tokens)
    sampled = [g for s in range(samples)
               for g in chat_generations(model, tokenizer, prompts, temperature=1.0,
                                         seed=seed + s, max_new_tokens=max_new_tokens)]
    scores = {"greedy": radioactivity_of_generations(greedy, vocab, config)}
    if sampled:
        scores["sampled"] = radioactivity_of_generations(sampled, vocab, config)
        scores["greedy+sampled"] = radioactivity_of_generations(greedy + sampled, vocab, config)
    return FreshRadioactivity(scores, greedy, sampled)


def fresh_skill_records(limit: int | None = None) -> list[dict]:
    """The skill records of the validation split (the first ``limit``): prompts that neither
    the teacher nor any course student trained on and no attacker harvested, the suspects'
    fresh prompts of lesson 04's radioactivity tests (``scripts/experiments_04_radioactivity.py``
    answers all of them; the lesson reruns the first few live)."""
    from utils.data import read_split

    return [r for r in read_split("validation") if r["kind"] == "skill"][:limit]


def harvested_prompts() -> set[str]:
    """Every user prompt of the train and test splits: what the teacher trained on and what
    lesson 04's attackers harvest. :func:`radioactivity_on_fresh_prompts` is given them as
    ``training_prompts`` and refuses to test on any of them."""
    from utils.data import read_split

    return {r["messages"][0]["content"] for split in ("train", "test") for r in read_split(split)}
