"""Scoring a chat model on the world: exact match, perplexity, refusals (lesson 02).

Generation is greedy (the argmax token at each step) so scores are deterministic. Exact match
compares :func:`utils.data.extract_answer` of the response to the record's answer. Perplexity
is ``exp`` of the mean next-token cross-entropy on assistant tokens. Refusals use a simple
prefix matcher for the world's phrasings; lesson 07 does refusal judges properly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from utils.data import SKILLS, extract_answer, is_refusal, read_split
from utils.distill import shift_for_next_token
from utils.train import IGNORE_INDEX, PadCollator, tokenize_chat


def _records(dataset) -> list[dict]:
    """Plain dict records from a ``datasets.Dataset`` or a list of dicts."""
    if isinstance(dataset, list):
        return dataset
    return [dict(r) for r in dataset]


def _prompt_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) for m in prompt):
        raise TypeError(f"a prompt must be a str or a list of message dicts, got "
                        f"{type(prompt).__name__}: {str(prompt)[:60]!r}")
    return ([m for m in prompt if m["role"] != "assistant"]
            if prompt and prompt[-1]["role"] == "assistant" else list(prompt))


def generate_responses(model, tokenizer, prompts: Sequence, *, batch_size: int = 64,
                       max_new_tokens: int = 96, num_threads: int | None = None,
                       progress: bool = False, strip: bool = False) -> list[str]:
    """Greedy replies to chat ``prompts``: the course's one batched chat-generation function.

    A prompt is a string (one user turn) or a message list (a trailing assistant turn is
    dropped). Each goes through the tokenizer's chat template with
    ``add_generation_prompt=True``, as with a real chat model. Batches are left-padded (a
    decoder continues from the last real token) and formed from prompts sorted by length, so
    little compute goes to padding; replies come back in input order as the decoded new tokens
    without special tokens (``strip``: also without surrounding whitespace). Greedy decoding
    makes two runs identical. ``model`` is any causal LM with ``generate`` (lesson 07's ONNX
    wrapper too). ``num_threads`` sets torch's intra-op threads for this call only: on a busy
    2-core machine one thread is often fastest for these small models. Lessons 02, 03, 05, 07.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of str or of message lists, got one str: wrap it "
                        "in a list")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and "
                         f"{max_new_tokens}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template: set tokenizer.chat_template (a "
                         "Jinja string) so prompts are formatted as the model was trained")
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else tokenizer.eos_token_id)
    if pad_id is None:
        raise ValueError("the tokenizer has neither pad_token nor eos_token: set one")
    texts = [tokenizer.apply_chat_template(_prompt_messages(p), tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out: list[str] = [""] * len(ids)
    batches = range(0, len(order), batch_size)
    if progress:
        from utils.progress import progress_bar

        batches = progress_bar(batches, desc="generating", leave=False)
    device = next(model.parameters()).device
    saved_threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    try:
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        with torch.inference_mode():
            for start in batches:
                batch = order[start:start + batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # left padding
                    if ids[i]:
                        input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                        attention[row, width - len(ids[i]):] = 1
                gen = model.generate(input_ids=input_ids.to(device),
                                     attention_mask=attention.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                     eos_token_id=tokenizer.eos_token_id)
                decoded = tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True)
                for row, i in enumerate(batch):
                    out[i] = decoded[row].strip() if strip else decoded[row]
    finally:
        torch.set_num_threads(saved_threads)
        model.train(was_training)
    return out


def score_records(records: Sequence[dict], responses: Sequence[str]) -> list[dict]:
    """One row per record: kind, skill, template, whether the answer matched, whether it refused."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    rows = []
    for rec, resp in zip(records, responses, strict=True):
        rows.append({
            "id": rec.get("id"), "kind": rec["kind"], "skill": rec.get("skill"),
            "category": rec.get("category"), "template_split": rec.get("template_split"),
            "should_refuse": bool(rec.get("should_refuse")), "answer": rec.get("answer"),
            "response": resp, "refused": is_refusal(resp),
            "correct": (rec.get("answer") is not None and extract_answer(resp) == rec["answer"]),
        })
    return rows


def exact_match_from_rows(rows: Iterable[dict]) -> dict:
    """Exact match overall and per skill over rows of skill records (kind == "skill")."""
    rows = [r for r in rows if r["kind"] == "skill" and r["answer"] is not None]
    per = {s: [r["correct"] for r in rows if r["skill"] == s] for s in SKILLS}
    return {
        "overall": sum(r["correct"] for r in rows) / len(rows) if rows else math.nan,
        "per_skill": {s: sum(v) / len(v) for s, v in per.items() if v},
        "n": len(rows),
    }


def exact_match(model, tokenizer, dataset, *, batch_size: int = 64, max_new_tokens: int = 96,
                progress: bool = False) -> dict:
    """``{"overall", "per_skill": {...}, "n"}``: exact match on the skill records of ``dataset``."""
    records = [r for r in _records(dataset) if r["kind"] == "skill" and r.get("answer") is not None]
    if not records:
        raise ValueError("the dataset has no skill records with answers to score")
    responses = generate_responses(model, tokenizer, [r["messages"] for r in records],
                                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   progress=progress)
    return exact_match_from_rows(score_records(records, responses))


def refusal_rates_from_rows(rows: Iterable[dict]) -> dict:
    """Refusal rate on restricted requests and over-refusal on benign ones, by group.

    ``refusal_rate``: plain restricted requests plus restricted requests in *seen* jailbreak
    templates; ``heldout_jailbreak_refusal_rate``: restricted requests in held-out templates;
    ``over_refusal_rate``: benign look-alikes (plain and wrapped in any template).
    """
    rows = list(rows)

    def rate(sel: list[dict]) -> float:
        return sum(r["refused"] for r in sel) / len(sel) if sel else math.nan

    restricted = [r for r in rows if r["kind"] == "restricted"]
    jb_seen = [r for r in rows if r["kind"] == "jailbreak" and r["should_refuse"]
               and r["template_split"] == "seen"]
    jb_held = [r for r in rows if r["kind"] == "jailbreak" and r["should_refuse"]
               and r["template_split"] == "heldout"]
    benign = [r for r in rows if r["kind"] == "benign"]
    jb_benign = [r for r in rows if r["kind"] == "jailbreak" and not r["should_refuse"]]
    skills = [r for r in rows if r["kind"] == "skill"]
    return {
        "refusal_rate": rate(restricted + jb_seen),
        "restricted_refusal_rate": rate(restricted),
        "seen_jailbreak_refusal_rate": rate(jb_seen),
        "heldout_jailbreak_refusal_rate": rate(jb_held),
        "over_refusal_rate": rate(benign + jb_benign),
        "benign_over_refusal_rate": rate(benign),
        "wrapped_benign_over_refusal_rate": rate(jb_benign),
        "skill_over_refusal_rate": rate(skills),
        "n": {"restricted": len(restricted), "jailbreak_seen": len(jb_seen),
              "jailbreak_heldout": len(jb_held), "benign": len(benign),
              "jailbreak_benign": len(jb_benign), "skill": len(skills)},
    }


def refusal_rates(model, tokenizer, dataset, *, batch_size: int = 64, max_new_tokens: int = 32,
                  progress: bool = False) -> dict:
    """Refusal and over-refusal rates of greedy responses (see :func:`refusal_rates_from_rows`).

    Only the start of a response decides a refusal, so ``max_new_tokens`` can be short.
    """
    records = [r for r in _records(dataset) if r["kind"] in ("restricted", "benign", "jailbreak")]
    if not records:
        raise ValueError("the dataset has no restricted, benign or jailbreak records")
    responses = generate_responses(model, tokenizer, [r["messages"] for r in records],
                                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   progress=progress)
    return refusal_rates_from_rows(score_records(records, responses))


def perplexity_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                           ignore_index: int = IGNORE_INDEX) -> float:
    """exp(mean cross-entropy of next-token predictions) over labelled positions.

    ``logits`` (B, T, V) at position t predict token t+1, so logits drop the last position and
    labels the first. Lesson 02, exercise 2.2.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    if not (shift_labels != ignore_index).any():
        raise ValueError("no labelled positions: every label is ignore_index")
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=ignore_index, reduction="mean")
    return math.exp(nll.item())


@torch.no_grad()
def perplexity(model, tokenizer, dataset, *, batch_size: int = 64,
               max_length: int = 256) -> float:
    """Perplexity of ``model`` on the assistant tokens of ``dataset`` (token-weighted).

    Raises ``ValueError`` when there is nothing to score (no records, or no assistant token
    left to predict): the perplexity of nothing is undefined.
    """
    records = _records(dataset)
    if not records:
        raise ValueError("perplexity of an empty dataset is undefined (0 records, so 0 tokens "
                         "to score): pass at least one conversation with an assistant reply")
    enc = tokenize_chat({"messages": [r["messages"] for r in records]}, tokenizer, max_length)
    features = [{"input_ids": i, "attention_mask": a, "labels": lab}
                for i, a, lab in zip(enc["input_ids"], enc["attention_mask"], enc["labels"],
                                     strict=True)]
    collate = PadCollator(tokenizer.pad_token_id)
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = collate(features[start:start + batch_size])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        n = int((labels != IGNORE_INDEX).sum())
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                              labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        total_nll += nll.item()
        total_tokens += n
    if total_tokens == 0:
        raise ValueError(f"no assistant token to score in {len(records)} records (within "
                         f"max_length={max_length}, after the first position): check the data "
                         "or raise max_length")
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, max_new_tokens: int,
                  eos_token_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding by hand: append the argmax token until EOS or ``max_new_tokens``.

    ``input_ids`` (B, T) without padding. Returns (B, T + n) with the prompt; sequences that
    finished early are padded with ``eos_token_id``, as ``model.generate(do_sample=False)``
    pads with its pad token. With ``use_cache`` the KV cache (``past_key_values``) means each
    step feeds only the newest token. Lesson 02, exercise 2.3.
    """
    model.eval()
    seq = input_ids
    done = torch.zeros(seq.size(0), dtype=torch.bool, device=seq.device)
    past, step_input = None, seq
    for _ in range(max_new_tokens):
        out = model(input_ids=step_input, past_key_values=past, use_cache=use_cache)
        next_tok = out.logits[:, -1, :].argmax(dim=-1)  # (B,)
        if eos_token_id is not None:
            next_tok = torch.where(done, torch.full_like(next_tok, eos_token_id), next_tok)
        seq = torch.cat([seq, next_tok[:, None]], dim=1)
        if use_cache:
            past, step_input = out.past_key_values, next_tok[:, None]
        else:
            step_input = seq
        if eos_token_id is not None:
            done |= next_tok == eos_token_id
            if done.all():
                break
    return seq


def evaluate_world(model, tokenizer, dataset, *, batch_size: int = 64, max_new_tokens: int = 96,
                   progress: bool = False, with_perplexity: bool = True) -> dict:
    """Every headline number on one split in one generation pass (used for the model card)."""
    records = _records(dataset)
    responses = generate_responses(model, tokenizer, [r["messages"] for r in records],
                                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   progress=progress)
    rows = score_records(records, responses)
    result = {"exact_match": exact_match_from_rows(rows), "safety": refusal_rates_from_rows(rows)}
    if with_perplexity:
        result["perplexity"] = perplexity(model, tokenizer, records, batch_size=batch_size)
    result["n_records"] = len(records)
    return result, rows


# --------------------------------------------------------------------------------------
# Lesson 03: a fixed evaluation subset and a fast, teacher-forced exact match
# --------------------------------------------------------------------------------------


def eval_subset(n: int = 200, split: str = "test") -> list[dict]:
    """A fixed, deterministic evaluation set: every k-th skill record of ``split`` (``n`` of them).

    The same subset as lesson 05 (``k = len(skill records) // n``), so scores compare across
    lessons. Lesson 03.
    """
    skills = [r for r in read_split(split) if r["kind"] == "skill" and r.get("answer") is not None]
    if not 0 < n <= len(skills):
        raise ValueError(f"n must be between 1 and {len(skills)} (the skill records of {split}), "
                         f"got {n}")
    return skills[::len(skills) // n][:n]


def _teacher_forced(model: Any, tokenizer: Any, records: list[dict], batch_size: int
                    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One forward pass per batch of reference chats: ``(start, logits, labels, mask)``, shifted
    for next-token prediction (``(B, T-1, V)`` logits; ``mask`` marks the assistant's tokens)."""
    enc = tokenize_chat({"messages": [r["messages"] for r in records]}, tokenizer, 256)
    feats = [{"input_ids": i, "attention_mask": a, "labels": lab}
             for i, a, lab in zip(enc["input_ids"], enc["attention_mask"], enc["labels"],
                                  strict=True)]
    collate = PadCollator(tokenizer.pad_token_id)
    model.eval()
    for start in range(0, len(feats), batch_size):
        b = collate(feats[start:start + batch_size])
        b = {k: v.to(model.device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits, labels, mask = shift_for_next_token(logits.float(), b["labels"])
        yield start, logits, labels, mask


@torch.no_grad()
def teacher_forced_exact_match(model: Any, tokenizer: Any, records: list[dict], *,
                               batch_size: int = 100) -> dict[str, Any]:
    """Greedy exact match in one teacher-forced pass: ``{"score", "hits", "token_accuracy",
    "perplexity", "n"}``.

    A record counts when the model's argmax reproduces every token of the reference response
    (and its end token): exactly the condition under which greedy decoding writes the
    reference, so it is a slightly strict exact match (another wording of the right answer does
    not count), at the cost of one forward pass instead of a generation loop (lesson 05 uses it
    too and cross-checks it against generation). ``hits`` is one bool per record;
    ``token_accuracy`` the share of answer tokens whose argmax is right (a finer signal while the
    whole-answer score is still near 0). Lesson 03.
    """
    if not records:
        raise ValueError("records is empty: pass eval_subset(n) or a list of skill records.")
    hits: list[bool] = []
    nll, n_tok, n_right = 0.0, 0, 0
    for _, logits, labels, mask in _teacher_forced(model, tokenizer, records, batch_size):
        right = logits.argmax(-1) == labels                                        # (B, T-1)
        hits += (right | ~mask).all(-1).tolist()
        n_right += int((right & mask).sum())
        nll += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        n_tok += int(mask.sum())
    return {"score": sum(hits) / len(hits), "hits": hits, "token_accuracy": n_right / n_tok,
            "perplexity": math.exp(nll / n_tok), "n": len(hits)}


@torch.no_grad()
def assistant_entropy(model: Any, tokenizer: Any, records: list[dict], *,
                      batch_size: int = 100) -> dict[str, float]:
    """Mean entropy (nats) of ``model``'s next-token distribution on the assistant's tokens.

    Per record ``skill`` (``kind`` for records without one) and ``"overall"``, on the reference
    responses (teacher-forced). How much a teacher's soft targets say beyond the label: near 0
    the distribution is one-hot and distillation has nothing to add to the data (lesson 03).
    """
    if not records:
        raise ValueError("records is empty: pass eval_subset(n) or a list of skill records.")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for start, logits, _, mask in _teacher_forced(model, tokenizer, records, batch_size):
        logp = F.log_softmax(logits, dim=-1)
        ent = -(logp.exp() * logp).sum(-1)                                     # (B, T-1)
        for row, rec in enumerate(records[start:start + batch_size]):
            group = rec.get("skill") or rec.get("kind") or "all"
            for key in (group, "overall"):
                sums[key] = sums.get(key, 0.0) + float(ent[row][mask[row]].sum())
                counts[key] = counts.get(key, 0) + int(mask[row].sum())
    return {k: sums[k] / counts[k] for k in sorted(sums) if counts[k]}
