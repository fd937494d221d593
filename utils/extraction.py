"""Black-box distillation through an API and model extraction (lesson 04).

What an attacker can do with nothing but an OpenAI-compatible endpoint (``utils.serve``):

- :func:`harvest`: the budgeted querying loop (stops at the budget, backs off on rate
  limits, stops cleanly when the quota is spent), recording text and top-k logprobs.
- Token-level KD from the harvested top-k logprobs (:func:`soft_targets_from_records`,
  :func:`sparse_kd_loss`): the teacher's top-k probabilities plus one explicit bucket for
  "the rest of the vocabulary", so the loss is an exact KL between coarsened distributions.
- Sequence-level KD (Kim & Rush 2016; the DeepSeek-R1-distill recipe): the harvested
  responses are plain SFT targets (:func:`sft_examples`, :func:`sequence_kd_batch`).
- Fidelity: top-1 agreement, KL and total variation to the teacher, greedy exact match.
- Carlini et al. (2024), "Stealing part of a production language model":
  :func:`hidden_size_from_logits` reads the hidden size off the singular values of stacked
  full logit vectors.
- End to end (lesson 04): :func:`skill_prompts` (ordinary tasks only), :func:`cached_harvest`
  (start the API on the teacher, harvest, stop it; answers cached on disk),
  :func:`distill_from_topk` (a ``Trainer`` with :func:`sparse_kd_loss`), :func:`blackbox_recipe`
  (a cached student distilled through the API) and :func:`blackbox_fidelity`.

Why the SVD works, and h versus h-1 versus h+1. A decoder ends with ``logits = W x`` where
``x`` is the final hidden state (h numbers, after the final norm) and ``W`` the (V, h)
lm_head (tied or untied: it is a (V, h) matrix either way). Every logit vector lies in the
h-dimensional column space of ``W``, so n > h stacked vectors have rank h: h large singular
values, then a cliff to round-off. The details decide which number you read:

- Llama's final RMSNorm only rescales ``x`` (no centring), so the hidden states span all
  h directions: **logits give exactly h**, tied or untied.
- A LayerNorm without bias centres ``x`` (its entries sum to zero), which removes one
  direction: that model gives **h-1** (the tests show it by swapping in such a norm).
- **Logprobs** are ``logits - logsumexp(logits)``: a different constant per row, i.e. a
  multiple of the all-ones vector is added to each row. That *adds* a direction (ones is
  generically not in the column space of ``W``): raw logprob rows give **h+1**. Centring
  each row (subtract its mean over the vocabulary) projects the ones direction out and
  gives h again. :func:`hidden_size_from_logits` centres by default, so logits and
  logprobs both give h.

Defences break the cliff: top-k truncation means there is no full vector to stack,
rounding and noise lift the "zero" singular values to the noise floor (tests show each).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

# ----------------------------------------------------------------------------------------
# Harvesting


@dataclass
class HarvestRecord:
    """One answered query: the prompt, the teacher's text and what the API said about it.

    ``tokens[i]`` is the i-th generated token (as the API spells it), ``logprobs[i]`` its
    logprob, ``top_logprobs[i]`` the top-k alternatives ``{token: logprob}`` (empty when
    logprobs were not requested).
    """

    messages: list[dict[str, str]]
    text: str
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]

    def to_dict(self) -> dict:
        return asdict(self)


def as_messages(prompt: str | Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """A user prompt string, or an existing message list, as chat messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def record_from_response(prompt: str | Sequence[dict[str, str]], response: Any) -> HarvestRecord:
    """Turn an ``openai`` ``ChatCompletion`` into a :class:`HarvestRecord`."""
    choice = response.choices[0]
    tokens: list[str] = []
    logprobs: list[float] = []
    tops: list[dict[str, float]] = []
    if choice.logprobs is not None and choice.logprobs.content is not None:
        for entry in choice.logprobs.content:
            tokens.append(entry.token)
            logprobs.append(float(entry.logprob))
            tops.append({t.token: float(t.logprob) for t in (entry.top_logprobs or [])})
    usage = getattr(response, "usage", None)
    return HarvestRecord(
        messages=as_messages(prompt), text=choice.message.content or "", tokens=tokens,
        logprobs=logprobs, top_logprobs=tops, finish_reason=choice.finish_reason,
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0)


def is_quota_error(error: Exception) -> bool:
    """True when a 429 means "budget spent" (retrying is useless), not "slow down"."""
    code = getattr(error, "code", None)
    typ = getattr(error, "type", None)
    return "insufficient_quota" in (code, typ)


def retry_after_seconds(error: Exception, default: float = 1.0) -> float:
    """The wait a 429 asks for (``retry-after-ms`` or ``retry-after`` header)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(float(value) * scale, 0.0)
            except ValueError:
                continue
    return default


def harvest(client: Any, prompts: Iterable[str | Sequence[dict[str, str]]], *, budget: int,
            top_logprobs: int | None = None, max_tokens: int = 32, model: str | None = None,
            temperature: float = 0.0, seed: int | None = 0, max_waits: int = 20,
            max_wait_seconds: float = 10.0, extra_body: dict | None = None,
            progress: Any = None) -> list[HarvestRecord]:
    """Query the teacher once per prompt, never more than ``budget`` answered queries.

    - ``top_logprobs``: ask for logprobs with this many alternatives (``None``: text only).
    - A rate-limit 429 (``openai.RateLimitError`` with code ``rate_limit_exceeded``) waits
      as long as the server asks and retries the same prompt, at most ``max_waits`` times.
    - A quota 429 (``insufficient_quota``) ends the harvest: what was collected is returned.
    - Any other API error (e.g. a 400 because the API refuses logprobs) propagates.
    ``extra_body`` adds server-specific fields (e.g. vLLM's ``{"min_tokens": 200}``);
    ``progress`` is an optional tqdm bar updated once per answered query.
    Only answered queries count against ``budget``. Introduced in lesson 04.
    """
    import openai

    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if model is None:
        model = client.models.list().data[0].id
    extra: dict[str, Any] = {}
    if top_logprobs is not None:
        extra = {"logprobs": True, "top_logprobs": int(top_logprobs)}
    if extra_body:
        extra["extra_body"] = dict(extra_body)
    records: list[HarvestRecord] = []
    for prompt in prompts:
        if len(records) >= budget:
            break
        waits = 0
        while True:
            try:
                response = client.chat.completions.create(
                    model=model, messages=as_messages(prompt), max_tokens=max_tokens,
                    temperature=temperature, seed=seed, **extra)
            except openai.RateLimitError as err:
                if is_quota_error(err) or waits >= max_waits:
                    return records
                waits += 1
                time.sleep(min(retry_after_seconds(err), max_wait_seconds))
                continue
            records.append(record_from_response(prompt, response))
            if progress is not None:
                progress.update(1)
            break
    return records


# ----------------------------------------------------------------------------------------
# Token strings back to ids


def token_to_id(token: str, tokenizer: Any) -> int:
    """The id of a token as the API spelled it (a vocabulary piece or ``token_id:N``)."""
    if token.startswith("token_id:"):
        return int(token.split(":", 1)[1])
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary: the API and "
                         "your tokenizer disagree (ask for token_format='id' or use the "
                         "teacher's tokenizer)")
    return int(tid)


def prompt_ids(messages: Sequence[dict[str, str]], tokenizer: Any) -> list[int]:
    """The prompt the teacher saw: its chat template with the generation prompt."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------
# Token-level KD from top-k logprobs


@dataclass
class SoftTargets:
    """Sparse teacher distributions aligned with a batch of prompt+response sequences.

    ``topk_ids[b, t]``/``topk_logprobs[b, t]`` is the teacher's top-k for the token at
    position t+1, i.e. for the student's logits at position t (where ``target_mask``).
    Missing entries have id 0 and logprob ``-inf``.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    topk_ids: torch.Tensor  # (B, T, k)
    topk_logprobs: torch.Tensor  # (B, T, k)
    target_mask: torch.Tensor  # (B, T) bool


def soft_targets_from_records(records: Sequence[HarvestRecord], tokenizer: Any, *,
                              k: int | None = None, stop_token: bool = False) -> SoftTargets:
    """Build :class:`SoftTargets` from harvested records (requested with top_logprobs).

    ``stop_token=True``: when the teacher stopped by itself (``finish_reason == "stop"``),
    append the end token with a one-hot target (APIs report no logprob for it), so the
    student also learns when to stop.
    """
    if not records:
        raise ValueError("no records: harvest some answers first")
    k = k or max((len(t) for r in records for t in r.top_logprobs), default=0)
    if k == 0:
        raise ValueError("the records carry no top_logprobs: harvest with top_logprobs=k > 0 "
                         "(or use sequence_kd_batch for text-only distillation)")
    seqs, rows = [], []
    for r in records:
        p = prompt_ids(r.messages, tokenizer)
        resp = [token_to_id(t, tokenizer) for t in r.tokens]
        tops = list(r.top_logprobs)
        eos = tokenizer.eos_token_id
        if stop_token and r.finish_reason == "stop" and eos is not None:
            resp.append(int(eos))
            tops.append({tokenizer.convert_ids_to_tokens(int(eos)): 0.0})
        seqs.append(p + resp)
        rows.append((len(p), tops))
    T = max(len(s) for s in seqs)
    B = len(seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    ids = torch.zeros((B, T, k), dtype=torch.long)
    lps = torch.full((B, T, k), -math.inf)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (seq, (plen, tops)) in enumerate(zip(seqs, rows, strict=True)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention[b, : len(seq)] = 1
        for i, top in enumerate(tops):
            items = sorted(top.items(), key=lambda kv: -kv[1])[:k]
            if not items:
                continue
            t = plen + i - 1  # logits at t predict response token i
            ids[b, t, : len(items)] = torch.tensor([token_to_id(tok, tokenizer)
                                                    for tok, _ in items])
            lps[b, t, : len(items)] = torch.tensor([lp for _, lp in items])
            mask[b, t] = True
    return SoftTargets(input_ids, attention, ids, lps, mask)


def sparse_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                   topk_logprobs: torch.Tensor, target_mask: torch.Tensor | None = None, *,
                   tail: Literal["bucket", "renormalise"] = "bucket") -> torch.Tensor:
    """KL from the teacher's top-k logprobs to the student, mean over target positions.

    ``tail="bucket"``: the teacher's distribution is coarsened to k+1 outcomes, its top-k
    tokens and one "rest of the vocabulary" bucket holding 1 - sum(top-k); the student is
    coarsened the same way and the loss is the exact KL between the two (a lower bound on
    the full KL, by the data-processing inequality). ``tail="renormalise"``: the top-k are
    renormalised to sum to 1 and the rest of the vocabulary gets target 0 (cross-entropy to
    the student's full softmax, minus the target entropy, so 0 at a perfect match).
    """
    logp_s = torch.log_softmax(student_logits.float(), dim=-1)  # (..., V)
    valid = torch.isfinite(topk_logprobs)
    lp_t = torch.where(valid, topk_logprobs.float(), torch.full_like(topk_logprobs.float(), -1e30))
    lp_s_top = torch.gather(logp_s, -1, topk_ids).masked_fill(~valid, -1e30)  # (..., k)
    if tail == "renormalise":
        q = torch.softmax(lp_t, dim=-1)
        per_pos = (torch.xlogy(q, q) - q * lp_s_top.clamp_min(-1e4)).sum(-1)
    elif tail == "bucket":
        p = lp_t.exp() * valid
        total = p.sum(-1, keepdim=True)
        p = torch.where(total > 1.0, p / total, p)  # noisy logprobs may sum above 1
        rest_t = (1.0 - p.sum(-1)).clamp_min(0.0)
        s_top = lp_s_top.exp() * valid
        rest_s = (1.0 - s_top.sum(-1)).clamp_min(1e-12)
        per_pos = (torch.xlogy(p, p) - p * lp_s_top.clamp_min(-1e4)).sum(-1)
        per_pos = per_pos + torch.xlogy(rest_t, rest_t) - rest_t * rest_s.log()
    else:
        raise ValueError(f"tail must be 'bucket' or 'renormalise', got {tail!r}")
    if target_mask is None:
        target_mask = valid.any(-1)
    m = target_mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------
# Sequence-level KD: harvested text as SFT targets


def sft_examples(records: Sequence[HarvestRecord]) -> list[dict[str, list[dict[str, str]]]]:
    """Chat examples ``{"messages": [..., {"role": "assistant", "content": text}]}``."""
    return [{"messages": [*r.messages, {"role": "assistant", "content": r.text}]}
            for r in records]


def sequence_kd_batch(records: Sequence[HarvestRecord], tokenizer: Any, *,
                      max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Prompt + teacher response token ids, with ``labels`` = -100 on the prompt and padding.

    The response is re-tokenised from the text (all a text-only API gives); an end token is
    appended when the teacher stopped by itself (``finish_reason == "stop"``).
    """
    seqs, starts = [], []
    for r in records:
        p = prompt_ids(r.messages, tokenizer)
        resp = tokenizer(r.text, add_special_tokens=False)["input_ids"]
        if r.finish_reason == "stop" and tokenizer.eos_token_id is not None:
            resp = resp + [tokenizer.eos_token_id]
        seq = (p + resp)[:max_length] if max_length else p + resp
        seqs.append(seq)
        starts.append(len(p))
    T = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for b, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention[b, : len(seq)] = 1
        labels[b, start: len(seq)] = torch.tensor(seq[start:], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ----------------------------------------------------------------------------------------
# Fidelity


def fidelity_from_targets(student_logits: torch.Tensor, targets: SoftTargets) -> dict[str, float]:
    """Top-1 agreement, KL and total variation to the teacher's harvested top-k.

    KL and TV are between the (k+1)-bucket coarsenings (top-k plus "rest"): lower bounds on
    the full-vocabulary values, and exact when k = V.
    """
    logits = student_logits.float()
    m = targets.target_mask
    agree = (logits.argmax(-1) == targets.topk_ids[..., 0])[m].float().mean().item()
    kl = sparse_kd_loss(logits, targets.topk_ids, targets.topk_logprobs, m).item()
    valid = torch.isfinite(targets.topk_logprobs)
    p = targets.topk_logprobs.exp() * valid
    s = torch.gather(torch.softmax(logits, -1), -1, targets.topk_ids) * valid
    tv = 0.5 * ((p - s).abs().sum(-1) + ((1 - p.sum(-1)) - (1 - s.sum(-1))).abs())
    return {"top1_agreement": agree, "kl": kl, "tv": tv[m].mean().item()}


def fidelity_dense(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                   mask: torch.Tensor | None = None) -> dict[str, float]:
    """Top-1 agreement, KL(teacher || student) and TV from full logits of both models."""
    lt = torch.log_softmax(teacher_logits.float(), -1)
    ls = torch.log_softmax(student_logits.float(), -1)
    if mask is None:
        mask = torch.ones(lt.shape[:-1], dtype=torch.bool)
    mask = mask.bool()
    agree = (lt.argmax(-1) == ls.argmax(-1))[mask].float().mean().item()
    kl = (lt.exp() * (lt - ls)).sum(-1)[mask].mean().item()
    tv = 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)[mask].mean().item()
    return {"top1_agreement": agree, "kl": kl, "tv": tv}


def greedy_exact_match(student_texts: Sequence[str], teacher_texts: Sequence[str]) -> float:
    """Share of prompts where the student's greedy answer equals the teacher's exactly."""
    if len(student_texts) != len(teacher_texts) or not teacher_texts:
        raise ValueError(f"need two equally long, non-empty lists, got {len(student_texts)} "
                         f"and {len(teacher_texts)}")
    return (sum(a == b for a, b in zip(student_texts, teacher_texts, strict=True))
            / len(teacher_texts))


# ----------------------------------------------------------------------------------------
# Carlini et al. (2024): the hidden size from full logit vectors


def hidden_size_from_logits(logit_matrix: Any, *, center: bool = True) -> tuple[int, np.ndarray]:
    """Estimate the hidden size h from n > h stacked logit (or logprob) vectors.

    ``logit_matrix`` is (n, V). Unless ``center=False``, each row is centred (minus its mean
    over the vocabulary), which removes the per-row logsumexp of logprobs (see the module
    docstring: raw logprobs would give h+1), then each column (minus the mean query), so the
    component every query shares (same chat template, same last token) does not dwarf the
    others and fake a drop after the first value. The estimate is where log singular values drop
    the most: ``argmax_i log s_i - log s_{i+1}`` plus one. It is scale-free (no absolute
    threshold) and needs n > h + 1 rows, otherwise there is no drop to find.
    Carlini et al. (2024), Sec. 4; lesson 04.
    """
    m = np.asarray(logit_matrix.detach().cpu().numpy() if hasattr(logit_matrix, "detach")
                   else logit_matrix, dtype=np.float64)
    if m.ndim != 2 or min(m.shape) < 2:
        raise ValueError(f"need an (n, V) matrix with n, V >= 2, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("the matrix has NaN or inf entries (missing logprobs?): fill every "
                         "entry with a real logit or logprob")
    if center:
        m = m - m.mean(axis=1, keepdims=True)  # per-row constants (logsumexp) out
        m = m - m.mean(axis=0, keepdims=True)  # the part shared by every query out
    s = np.linalg.svd(m, compute_uv=False)
    if s[0] == 0:
        return 0, s
    # After centring, the last singular value is structurally ~0 (the rows, or the columns,
    # sum to zero): leave it out of the search.
    r = len(s) - 1 if center else len(s)
    logs = np.log(np.maximum(s[:r], s[0] * 1e-300))
    gaps = logs[:-1] - logs[1:]
    return int(np.argmax(gaps)) + 1, s


@torch.no_grad()
def final_logits(model: Any, input_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits at the last position of each sequence, stacked: (n, V).

    Sequences of equal length run as one batch; otherwise one at a time (no padding, so
    nothing depends on attention masks).
    """
    seqs = [list(s) for s in input_ids]
    device = next(model.parameters()).device
    if len({len(s) for s in seqs}) == 1:
        return model(input_ids=torch.tensor(seqs, device=device)).logits[:, -1].double().cpu()
    return torch.stack([model(input_ids=torch.tensor([s], device=device)).logits[0, -1]
                        .double().cpu() for s in seqs])


def logprob_matrix(records: Sequence[HarvestRecord], *, position: int = 0,
                   missing: Literal["raise", "floor"] = "raise") -> tuple[np.ndarray, list[str]]:
    """Stack the API's logprob vectors at ``position`` of each record: (n, V) and the tokens.

    Needs the full vocabulary per query (top_logprobs = V). ``missing="floor"`` fills tokens
    a record does not list with that row's smallest listed logprob (what an attacker facing
    top-k truncation might try; it breaks the low-rank structure).
    """
    rows = [r.top_logprobs[position] for r in records if len(r.top_logprobs) > position]
    if not rows:
        raise ValueError(f"no record has logprobs at position {position}: harvest with "
                         "top_logprobs and max_tokens > position")
    vocab = sorted(set().union(*rows))
    m = np.empty((len(rows), len(vocab)))
    for i, row in enumerate(rows):
        if len(row) < len(vocab) and missing == "raise":
            raise ValueError(f"record {i} lists {len(row)} of the {len(vocab)} tokens seen: the "
                             "API truncates top_logprobs (a defence), so there is no full "
                             "vector to stack; pass missing='floor' to try anyway")
        floor = min(row.values())
        m[i] = [row.get(t, floor) for t in vocab]
    return m, vocab


@dataclass
class RecoveredLogprobs:
    """What :func:`recover_logprobs` found: the full next-token logprob vector and its cost."""

    logprobs: np.ndarray  # (V,) log-probabilities over the tokenizer's ids; NaN where unseen
    queries: int          # API calls spent
    unseen: list[int]     # token ids that never entered the top-k, even with the bias

    @property
    def coverage(self) -> float:
        return 1.0 - len(self.unseen) / len(self.logprobs)


def recover_logprobs(client: Any, prompt: str | Sequence[dict[str, str]], tokenizer: Any, *,
                     top_k: int = 5, bias: float = 100.0, model: str | None = None,
                     vocab: Sequence[int] | None = None, seed: int = 0) -> RecoveredLogprobs:
    """The full next-token logprob vector from an API that shows only the top ``top_k``.

    Carlini et al. (2024), "Stealing part of a production language model", section 5: a
    ``logit_bias`` of ``+bias`` on a token lifts it into the top-k, and the bias cancels in a
    *difference* of two biased tokens' logprobs (both are divided by the same normaliser):
    ``z_i - z_ref = lp'_i - lp'_ref``. So one query reads the first ``top_k`` logprobs as they
    are, then each further query biases ``top_k - 1`` new tokens *and* the reference (the
    top-1 token) by the same amount, and ``lp_i = lp_ref + (lp'_i - lp'_ref)``. About
    ``V / (top_k - 1)`` queries per prompt, all with ``max_tokens=1``. Lesson 04.
    """
    if top_k < 2:
        raise ValueError(f"top_k must be >= 2 (a reference and a new token), got {top_k}")
    if model is None:
        model = client.models.list().data[0].id
    ids = list(range(len(tokenizer))) if vocab is None else [int(i) for i in vocab]
    messages = as_messages(prompt)

    def ask(logit_bias: dict[int, float]) -> dict[int, float]:
        kwargs: dict[str, Any] = dict(model=model, messages=messages, max_tokens=1,
                                      temperature=0.0, seed=seed, logprobs=True,
                                      top_logprobs=top_k)
        if logit_bias:
            kwargs["logit_bias"] = {str(t): b for t, b in logit_bias.items()}
        entry = client.chat.completions.create(**kwargs).choices[0].logprobs.content[0]
        return {token_to_id(t.token, tokenizer): float(t.logprob) for t in entry.top_logprobs}

    plain = ask({})
    queries = 1
    ref = max(plain, key=plain.get)
    known: dict[int, float] = dict(plain)
    todo = [i for i in ids if i not in known]
    step = top_k - 1
    for start in range(0, len(todo), step):
        group = todo[start:start + step]
        seen = ask({**{t: bias for t in group}, ref: bias})
        queries += 1
        if ref not in seen:  # the reference fell out: nothing in this query can be anchored
            continue
        for t in group:
            if t in seen:
                known[t] = plain[ref] + (seen[t] - seen[ref])
    out = np.full(len(tokenizer) if vocab is None else max(ids) + 1, np.nan)
    for t, lp in known.items():
        if t < len(out):
            out[t] = lp
    return RecoveredLogprobs(logprobs=out, queries=queries,
                             unseen=[i for i in ids if i not in known])


def averaging_curve(readings: Any, truth: Any, ns: Sequence[int]) -> dict[int, float]:
    """Root-mean-square error of the mean of the first ``n`` readings, for each ``n`` in ``ns``.

    ``readings`` is ``(R, d)`` (R repeated noisy readings of d numbers), ``truth`` is ``(d,)``.
    Independent noise of scale sigma gives ``sigma / sqrt(n)``: the 1/sqrt(n) law.
    """
    r = np.asarray(readings, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if r.ndim != 2 or r.shape[1:] != t.shape:
        raise ValueError(f"readings must be (R, d) and truth (d,), got {r.shape} and {t.shape}")
    if not ns or min(ns) < 1 or max(ns) > len(r):
        raise ValueError(f"every n must be between 1 and the {len(r)} readings, got {list(ns)}")
    return {int(n): float(np.sqrt(np.nanmean((np.nanmean(r[:n], axis=0) - t) ** 2)))
            for n in ns}


def power_law_fit(ns: Sequence[float], errors: Sequence[float]) -> tuple[float, float]:
    """Least-squares line through ``log error = log c + slope * log n``: ``(slope, c)``.

    A slope near -0.5 is the 1/sqrt(n) law of averaging independent noise.
    """
    x, y = np.log(np.asarray(ns, dtype=np.float64)), np.log(np.asarray(errors, np.float64))
    if len(x) < 2 or not np.all(np.isfinite(y)):
        raise ValueError("need at least two positive, finite errors to fit a line")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(np.exp(intercept))


def repeats_needed(c: float, slope: float, target: float) -> int:
    """Smallest n with ``c * n**slope <= target`` (how many repeated queries beat the noise)."""
    if slope >= 0 or c <= 0 or target <= 0:
        raise ValueError(f"need c > 0, target > 0 and a falling curve (slope < 0), got c={c}, "
                         f"slope={slope}, target={target}")
    return max(1, math.ceil((target / c) ** (1.0 / slope) - 1e-9))


# ----------------------------------------------------------------------------------------
# Lesson 04's attack end to end: prompts, a cached harvest, students, fidelity

HARVEST_CACHE_VERSION = "2"  # bump when cached_harvest's file layout or querying changes

Granularity = Literal["text", "topk"]
WATERMARK_BIAS = 5.0  # lesson 04's watermark strength (transformers' default is 2.0)


def watermark_config(bias: float = WATERMARK_BIAS, greenlist_ratio: float = 0.25) -> Any:
    """Lesson 04's ``transformers.WatermarkingConfig``: lefthash, context 1, key 15485863.

    The bias is 2.5 times transformers' default (Kirchenbauer et al. test 0.5 to 10): the
    course's teacher is so sure of itself (perplexity near 1) that a bias of 2 barely moves
    its samples (lesson 04 measures what the stronger bias costs).
    """
    from transformers import WatermarkingConfig

    return WatermarkingConfig(greenlist_ratio=greenlist_ratio, bias=bias)


def skill_prompts(split: str = "train", n: int | None = None, *, seed: int = 0) -> list[str]:
    """The user prompts of the world's *skill* records (no safety prompts), shuffled by ``seed``.

    What an attacker who wants the teacher's skills would ask: ordinary tasks only.
    """
    import random

    from utils.data import read_split

    prompts = [r["messages"][0]["content"] for r in read_split(split) if r["kind"] == "skill"]
    random.Random(seed).shuffle(prompts)
    return prompts if n is None else prompts[:n]


HARVEST_MIXES = ("skills", "safety", "safety-filtered")


def mix_prompts(mix: str = "skills", split: str = "train", *, seed: int = 0) -> list[str]:
    """What an attacker sends the API, shuffled by ``seed`` (lesson 04's harvest variants).

    ``"skills"``: ordinary tasks only (:func:`skill_prompts`). ``"safety"`` and
    ``"safety-filtered"``: the same tasks mixed with the world's restricted requests, their
    benign look-alikes and jailbreak-wrapped requests (an attacker who replays real user
    traffic); ``"safety-filtered"`` differs only in what the attacker keeps afterwards
    (:func:`keep_for_training` drops the API's refusals).
    """
    import random

    from utils.data import read_split

    if mix not in HARVEST_MIXES:
        raise ValueError(f"mix must be one of {', '.join(HARVEST_MIXES)}, got {mix!r}")
    if mix == "skills":
        return skill_prompts(split, seed=seed)
    prompts = [r["messages"][0]["content"] for r in read_split(split)
               if r["kind"] in ("skill", "restricted", "benign", "jailbreak")]
    random.Random(seed).shuffle(prompts)
    return prompts


def keep_for_training(records: Sequence[HarvestRecord], mix: str) -> list[HarvestRecord]:
    """The harvested answers an attacker trains on: all of them, or for ``"safety-filtered"``
    all but the API's refusals (the attacker who wants a copy without the safeguards)."""
    from utils.data import is_refusal

    if mix not in HARVEST_MIXES:
        raise ValueError(f"mix must be one of {', '.join(HARVEST_MIXES)}, got {mix!r}")
    if mix != "safety-filtered":
        return list(records)
    return [r for r in records if not is_refusal(r.text)]


def fidelity_eval_records(n: int = 64) -> list[dict]:
    """Lesson 04's held-out evaluation set: every k-th *skill* record of the test split,
    ``n`` of them.

    ``k = len(skill records) // n``; the notebook and ``scripts/experiments_04.py`` score on the
    same records, so a live student and the committed grid compare like for like.
    """
    from utils.data import read_split

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    skills = [r for r in read_split("test") if r["kind"] == "skill"]
    return skills[:: max(1, len(skills) // n)][:n]


def teacher_fingerprint() -> dict[str, str | None]:
    """sha256 of the shipped teacher's weights, its tokenizer and the world's data manifest."""
    from utils.io import sha256_file_or_none
    from utils.models import teacher_dir
    from utils.paths import data_dir

    t = teacher_dir()
    return {"teacher_sha256": sha256_file_or_none(t / "model.safetensors"),
            "tokenizer_sha256": sha256_file_or_none(t / "tokenizer.json"),
            "data_manifest_sha256": sha256_file_or_none(data_dir() / "world" / "manifest.json")}


def defences_key(defences: Any) -> dict[str, Any]:
    """A JSON-able description of :class:`utils.serve.Defences` (for cache keys)."""
    d = {k: getattr(defences, k) for k in ("max_top_logprobs", "logprobs_enabled",
                                            "round_decimals", "noise", "noise_scale")}
    wm = getattr(defences, "watermark", None)
    d["watermark"] = None if wm is None else (wm if isinstance(wm, dict) else wm.to_dict())
    return d


def harvest_cache_path(*, top_logprobs: int | None = None, max_tokens: int = 48,
                       min_tokens: int | None = None, temperature: float = 0.0, seed: int = 0,
                       defences: Any = None) -> tuple[Any, dict[str, Any]]:
    """Where :func:`cached_harvest` keeps the answers for these settings, and its key payload."""
    import hashlib
    import json

    from utils.paths import cache_dir
    from utils.serve import Defences

    defences = defences if defences is not None else Defences()
    payload = {"version": HARVEST_CACHE_VERSION, **teacher_fingerprint(),
               "top_logprobs": top_logprobs, "max_tokens": max_tokens, "min_tokens": min_tokens,
               "temperature": temperature, "seed": seed, "defences": defences_key(defences)}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / "harvests" / f"{key[:16]}.json", payload


def cached_harvest(prompts: Sequence[str], *, budget: int, top_logprobs: int | None = None,
                   max_tokens: int = 48, min_tokens: int | None = None,
                   temperature: float = 0.0, seed: int = 0, defences: Any = None,
                   model: Any = None, tokenizer: Any = None, progress: bool = True,
                   concurrency: int = 1) -> list[HarvestRecord]:
    """The teacher's answers to ``prompts[:budget]`` through its real API, cached on disk.

    Prompts not answered before are sent to :func:`utils.serve.start_server` on the teacher
    (127.0.0.1, a key with exactly as many queries as are missing) with :func:`harvest` and
    the official ``openai`` client; the server is stopped afterwards. Answers are stored per
    prompt in one JSON file per setting (``cache_dir()/harvests/``), keyed by the teacher's
    weights, tokenizer and data (sha256), the query settings and the defences. Every request
    carries the same ``seed``, so an answer does not depend on which prompts came before: a
    larger budget or another prompt list only queries what is missing.

    ``concurrency > 1``: that many client threads query at once and the server batches them
    (``ServerConfig(max_batch_size=concurrency)``); the answers are the same (the server's
    batching keeps each request's answer), only faster.
    """
    import json

    from utils.io import atomic_write_json, file_lock
    from utils.serve import Defences, ServerConfig, start_server

    defences = defences if defences is not None else Defences()
    prompts = list(prompts)
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if budget > len(prompts):
        raise ValueError(f"budget {budget} > {len(prompts)} prompts: give more prompts")
    path, payload = harvest_cache_path(top_logprobs=top_logprobs, max_tokens=max_tokens,
                                       min_tokens=min_tokens, temperature=temperature,
                                       seed=seed, defences=defences)
    wanted = prompts[:budget]

    def key(prompt: Any) -> str:
        return json.dumps(as_messages(prompt), sort_keys=True)

    cache: dict[str, dict] = {}
    if path.is_file():
        try:
            cache = dict(json.loads(path.read_text())["records"])
        except (ValueError, KeyError, TypeError):
            cache = {}  # unreadable: harvest again
    missing = list(dict.fromkeys(p for p in wanted if key(p) not in cache))
    if missing:
        if model is None or tokenizer is None:
            from utils.models import load_model

            model, tokenizer = load_model("teacher", verbose=False)
        from utils.progress import progress_bar

        config = ServerConfig(api_keys={"sk-harvest": len(missing)}, defences=defences,
                              max_tokens_limit=max(256, max_tokens),
                              max_batch_size=min(concurrency, 1024))
        extra = {"min_tokens": int(min_tokens)} if min_tokens else None
        bar = progress_bar(total=len(missing), leave=False, disable=not progress,
                   desc="querying the teacher API (first use, cached afterwards)")
        with start_server(model, tokenizer, config) as server:
            def ask(shard: list) -> list[HarvestRecord]:
                return harvest(server.client("sk-harvest"), shard, budget=len(shard),
                               top_logprobs=top_logprobs, max_tokens=max_tokens,
                               temperature=temperature, seed=seed, extra_body=extra,
                               progress=bar)

            if concurrency == 1:
                new = ask(missing)
            else:  # interleaved shards, one client thread each
                from concurrent.futures import ThreadPoolExecutor

                shards = [missing[i::concurrency] for i in range(concurrency)]
                with ThreadPoolExecutor(concurrency, thread_name_prefix="harvest") as pool:
                    new = [r for part in pool.map(ask, shards) for r in part]
        bar.close()
        cache.update({key(r.messages): r.to_dict() for r in new})
        with file_lock(path.with_name(f".{path.name}.lock")):  # merge with other harvesters
            if path.is_file():
                try:
                    cache = {**json.loads(path.read_text())["records"], **cache}
                except (ValueError, KeyError, TypeError):
                    pass  # unreadable: this harvest replaces it
            atomic_write_json(path, {**payload, "records": cache})
    return [HarvestRecord(**cache[key(p)]) for p in wanted if key(p) in cache]


def _sparse_kd_trainer_class() -> Any:
    """A ``transformers.Trainer`` whose loss is :func:`sparse_kd_loss` (built on first use)."""
    from transformers import Trainer

    class SparseKDTrainer(Trainer):
        """Token-level KD from an API's top-k logprobs: no teacher model, only its records."""

        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            loss = sparse_kd_loss(out.logits, inputs["topk_ids"], inputs["topk_logprobs"],
                                  inputs["target_mask"])
            return (loss, out) if return_outputs else loss

    return SparseKDTrainer


def _collate_soft(features: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(int(f["attention_mask"].sum()) for f in features)
    return {k: torch.stack([f[k][:width] for f in features]) for k in features[0]}


def distill_from_topk(student: Any, tokenizer: Any, records: Sequence[HarvestRecord], *,
                      max_steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                      callbacks: list | None = None) -> Any:
    """Train ``student`` on harvested top-k logprobs with :func:`sparse_kd_loss` (lesson 04).

    Same optimiser, schedule and step budget as :func:`utils.train.train_lm`, so a top-k
    student and a text-only student compare fairly. Returns a ``TrainResult``.
    """
    import tempfile

    from utils.train import lm_training_arguments, run_trainer

    t = soft_targets_from_records(records, tokenizer, stop_token=True)
    rows = [{"input_ids": t.input_ids[i], "attention_mask": t.attention_mask[i],
             "topk_ids": t.topk_ids[i], "topk_logprobs": t.topk_logprobs[i],
             "target_mask": t.target_mask[i]} for i in range(len(t.input_ids))]
    with tempfile.TemporaryDirectory(prefix="dd-topk-") as tmp:
        args = lm_training_arguments(
            tmp, max_steps=max_steps, batch_size=batch_size, eval_batch_size=batch_size, lr=lr,
            weight_decay=0.01, warmup_steps=0.03, scheduler="cosine", min_lr_ratio=0.1,
            has_eval=False, eval_steps=None, logging_steps=None, seed=seed, use_cpu=True,
            progress=False, include_num_input_tokens_seen="no")
        trainer = _sparse_kd_trainer_class()(model=student, args=args, train_dataset=rows,
                                             data_collator=_collate_soft, callbacks=callbacks)
        return run_trainer(trainer, progress=False)


@torch.no_grad()
def teacher_reference(teacher: Any, tokenizer: Any, records: Sequence[dict], *,
                      max_new_tokens: int = 48) -> dict[str, Any]:
    """The teacher's greedy answers to evaluation records, tokenised for teacher forcing.

    Returns ``{"texts", "batch", "logits"}``: ``batch`` holds prompt + answer ids with
    ``labels`` on the answer (as :func:`sequence_kd_batch`), ``logits`` the teacher's (B, T, V).
    """
    from utils.evaluate import generate_responses

    texts = generate_responses(teacher, tokenizer, [r["messages"] for r in records],
                               max_new_tokens=max_new_tokens)
    fake = [HarvestRecord(messages=as_messages(r["messages"][0]["content"]), text=t,
                          finish_reason="stop") for r, t in zip(records, texts, strict=True)]
    batch = sequence_kd_batch(fake, tokenizer)
    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return {"texts": texts, "batch": batch, "logits": logits}


@torch.no_grad()
def blackbox_fidelity(student: Any, tokenizer: Any, records: Sequence[dict],
                      reference: dict[str, Any], *, max_new_tokens: int = 48) -> dict[str, float]:
    """Fidelity of a student to the teacher on held-out records (lesson 04).

    ``top1_agreement``, ``kl`` and ``tv``: teacher-forced on the teacher's greedy answers
    (:func:`teacher_reference`), next-token distributions compared at every answer token;
    ``greedy_exact_match``: the student's greedy answer equals the teacher's, character for
    character; ``score``: the student's task exact match against the world's answers.
    """
    from utils.evaluate import generate_responses, score_records

    batch = reference["batch"]
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100  # logits at t predict the token at t + 1
    dense = fidelity_dense(reference["logits"][:, :-1], logits[:, :-1], mask)
    texts = generate_responses(student, tokenizer, [r["messages"] for r in records],
                               max_new_tokens=max_new_tokens)
    rows = score_records(list(records), texts)
    return {**dense, "greedy_exact_match": greedy_exact_match(texts, reference["texts"]),
            "score": sum(r["correct"] for r in rows) / len(rows)}
