"""Checks for lesson 02 (a teacher language model): exercises 2.1-2.3.

- 2.1 :func:`check_mask_labels`: labels for supervised fine-tuning, loss on assistant tokens
  only (InstructGPT-style SFT, Ouyang et al. 2022).
- 2.2 :func:`check_perplexity_from_logits`: exp of the mean next-token cross-entropy, with the
  shift by one and ``ignore_index`` (-100) honoured.
- 2.3 :func:`check_greedy_decode`: a greedy decoding loop by hand that must match
  ``model.generate(do_sample=False)`` token for token, stopping at the end token.

Each check computes its own expected values (it does not trust the course's references) and
recognises the classic mistakes to say *what* is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from utils.checks import CheckFailed, CheckResult, expect, expect_close, run_check

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------ 2.1 mask_labels


def _expected_labels(input_ids: torch.Tensor, mask: torch.Tensor,
                     ignore_index: int) -> torch.Tensor:
    return torch.where(mask.bool(), input_ids, torch.full_like(input_ids, ignore_index))


def _as_long_tensor(x: Any, what: str) -> torch.Tensor:
    expect(x is not None, f"{what}: your function returned None. Did you forget `return`?")
    try:
        t = torch.as_tensor(x)
    except Exception as exc:  # noqa: BLE001 - explained to the learner
        raise CheckFailed(f"{what}: could not read your result as a tensor ({exc})") from None
    return t


def _mask_labels_cases(fn: Callable[..., Any]) -> None:
    # Two chats, right-padded: [prompt ... | answer ... end | pad pad]
    input_ids = torch.tensor([[5, 11, 12, 13, 7, 21, 22, 4, 0, 0],
                              [5, 14, 15, 7, 23, 24, 25, 26, 4, 0]])  # (B=2, T=10)
    mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]])  # 1 on assistant tokens, 0 on pads
    expected = _expected_labels(input_ids, mask, IGNORE_INDEX)
    before = input_ids.clone()

    labels = _as_long_tensor(fn(input_ids, mask), "mask_labels(input_ids, assistant_mask)")
    expect(torch.equal(input_ids, before),
           "your function changed input_ids in place: the model still needs the inputs. "
           "Build a new tensor (e.g. torch.where, or input_ids.clone() first).")
    expect(tuple(labels.shape) == tuple(input_ids.shape),
           f"labels should have the shape of input_ids {tuple(input_ids.shape)}, got "
           f"{tuple(labels.shape)}. Do not shift or drop positions here.")
    expect(not labels.is_floating_point(),
           f"labels should be integer token ids (torch.long), got dtype {labels.dtype}")
    labels = labels.long()
    if torch.equal(labels, expected):
        pass
    elif torch.equal(labels, _expected_labels(input_ids, 1 - mask, IGNORE_INDEX)):
        raise CheckFailed("you kept the prompt and masked the answer: the wrong way round. "
                             "Keep input_ids where assistant_mask is 1, use -100 where it is 0.")
    elif torch.equal(labels, input_ids):
        raise CheckFailed("nothing was masked: labels equal input_ids. The prompt and the "
                             "padding must get -100 so they carry no loss.")
    elif torch.equal(labels, _expected_labels(input_ids, mask, 0)):
        raise CheckFailed("masked positions must be -100 (ignore_index), not 0: 0 is a real "
                             "token id and cross-entropy would train on it.")
    elif (torch.equal(labels[:, :-1], expected[:, 1:])
          or torch.equal(labels[:, 1:], expected[:, :-1])):
        raise CheckFailed("your labels are shifted by one position. Do not shift here: the "
                             "model shifts inside its loss (logits at t are scored against "
                             "labels at t+1).")
    elif torch.equal(labels[mask.bool()], input_ids[mask.bool()]):
        raise CheckFailed("the assistant tokens are right but some prompt or padding "
                             "positions are not -100.")
    else:
        raise CheckFailed("labels differ from input_ids-where-assistant-else--100. Expected "
                             f"{expected[0].tolist()} for the first chat, got "
                             f"{labels[0].tolist()}.")

    bool_labels = _as_long_tensor(fn(input_ids, mask.bool()), "with a bool mask")
    expect(torch.equal(bool_labels.long(), expected),
           "with a bool assistant_mask the result differs: treat the mask as true/false "
           "(e.g. mask.bool()), whatever its dtype.")

    custom = _as_long_tensor(fn(input_ids, mask, ignore_index=-1), "with ignore_index=-1")
    expect(torch.equal(custom.long(), _expected_labels(input_ids, mask, -1)),
           "with ignore_index=-1 the masked positions should be -1: use the ignore_index "
           "argument instead of a hard-coded -100.")

    one = _as_long_tensor(fn(input_ids[1], mask[1]), "on a single (T,) sequence")
    expect(torch.equal(one.long(), expected[1]),
           "on a single unbatched sequence (shape (T,)) the result is wrong: avoid indexing "
           "that assumes a batch dimension.")


def check_mask_labels(fn: Callable[..., Any]) -> CheckResult:
    """Exercise 2.1: ``mask_labels(input_ids, assistant_mask, ignore_index=-100)``."""
    return run_check("2.1", "mask_labels", fn, _mask_labels_cases,
                     success="all checks passed: only the assistant's tokens carry loss.")


# --------------------------------------------------------------------- 2.2 perplexity_from_logits


def _reference_ppl(logits: torch.Tensor, labels: torch.Tensor) -> float:
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).double()
    nll = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    return math.exp(nll.item())


def _as_float(x: Any, what: str) -> float:
    expect(x is not None, f"{what}: your function returned None. Did you forget `return`?")
    if isinstance(x, torch.Tensor):
        expect(x.numel() == 1, f"{what}: return one number (a float or a 0-d tensor), got a "
                               f"tensor of shape {tuple(x.shape)}. Average over the tokens.")
        x = x.item()
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise CheckFailed(f"{what}: return a number, got {type(x).__name__}") from None
    expect(math.isfinite(v), f"{what}: your perplexity is {v}. Did positions labelled -100 "
                             "get into the loss, or did you take exp of a sum?")
    return v


def _ppl_diagnosis(got: float, logits: torch.Tensor, labels: torch.Tensor) -> str:
    """Name the classic mistake that produces ``got``, if one does."""
    V = logits.size(-1)
    valid = labels[:, 1:] != IGNORE_INDEX
    logp = logits.double().log_softmax(-1)
    nll_tok = -logp[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    mean_nll = nll_tok[valid].mean().item()
    guesses: dict[str, float] = {}
    # no shift: logits at t scored against the label at t
    ns_valid = labels != IGNORE_INDEX
    ns = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    guesses["no_shift"] = math.exp(ns[ns_valid].mean().item())
    # shifted the wrong way: logits[:, 1:] against labels[:, :-1]
    ws_valid = labels[:, :-1] != IGNORE_INDEX
    ws = -logp[:, 1:].gather(-1, labels[:, :-1].clamp(min=0)[..., None])[..., 0]
    guesses["wrong_shift"] = math.exp(ws[ws_valid].mean().item())
    guesses["sum"] = math.exp(min(nll_tok[valid].sum().item(), 700.0))
    guesses["no_exp"] = mean_nll
    guesses["base2"] = 2**mean_nll
    # -100 positions counted as token 0 (clamped) instead of being ignored
    guesses["padding"] = math.exp(nll_tok.mean().item())
    # mean per sequence, then mean over sequences
    per_seq = torch.stack([nll_tok[b][valid[b]].mean() for b in range(labels.size(0))])
    guesses["per_sequence"] = math.exp(per_seq.mean().item())
    # softmax over the wrong axis (positions instead of vocabulary)
    lp_wrong = logits.double().log_softmax(1)
    wa = -lp_wrong[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    guesses["wrong_axis"] = math.exp(wa[valid].mean().item())
    hints = {
        "no_shift": "you scored the logits at position t against the label at t. The logits at "
                    "t predict token t+1: drop the last logit position and the first label.",
        "wrong_shift": "your shift goes the wrong way: use logits[:, :-1] with labels[:, 1:].",
        "sum": "you took exp of the *summed* negative log-likelihood; perplexity is exp of the "
               "*mean* over the labelled tokens.",
        "no_exp": "you returned the mean negative log-likelihood (the loss); perplexity is its "
                  "exponential, exp(loss).",
        "base2": "you used base 2 (2 ** loss); the cross-entropy is in nats, so use exp(loss).",
        "padding": "positions labelled -100 (prompt and padding) were counted: ignore them "
                   "(F.cross_entropy(..., ignore_index=-100) does).",
        "per_sequence": "you averaged per sequence and then over sequences; average over all "
                        "labelled tokens at once (every token weighs the same).",
        "wrong_axis": "the softmax runs over the wrong axis: normalise over the vocabulary, "
                      "the last axis (dim=-1) of logits (B, T, V).",
    }
    for key, value in guesses.items():
        if math.isfinite(value) and abs(value - got) <= 1e-4 * max(1.0, abs(value)):
            return hints[key]
    return (f"expected {_reference_ppl(logits, labels):.6g}, got {got:.6g}. Shift by one, "
            f"ignore -100, mean over labelled tokens, then exp (vocabulary size here: {V}).")


def _perplexity_cases(fn: Callable[..., Any]) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 13
    logits = torch.randn(B, T, V, generator=g) * 2  # (B, T, V)
    ids = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    # prompts of different lengths and right padding: -100 outside the answers
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    labels[1, :5] = IGNORE_INDEX
    labels[1, 8:] = IGNORE_INDEX
    labels[2, :2] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    logits_before, labels_before = logits.clone(), labels.clone()

    # 1. random logits, uneven prompt lengths and padding
    got = _as_float(fn(logits, labels), "perplexity_from_logits(logits, labels)")
    expect(torch.equal(logits, logits_before) and torch.equal(labels, labels_before),
           "your function changed logits or labels in place; work on copies.")
    expected = _reference_ppl(logits, labels)
    if abs(got - expected) > 1e-4 * expected:
        raise CheckFailed(_ppl_diagnosis(got, logits, labels))

    # 2. all-zero logits: every token has probability 1/V, so perplexity is exactly V
    flat = _as_float(fn(torch.zeros(B, T, V), labels), "perplexity of all-zero logits")
    expect(abs(flat - V) < 1e-3 * V,
           f"with all-zero logits every token has probability 1/{V}, so the perplexity must be "
           f"{V}; got {flat:.6g}. " + ("Did you forget the exp?" if abs(flat - math.log(V)) < 1e-3
                                      else "Check the exp and the mean."))

    # 3. a model that is sure of every next token: perplexity 1
    sure = torch.full((B, T, V), -30.0)
    nxt = labels[:, 1:].clamp(min=0)
    sure[:, :-1].scatter_(-1, nxt[..., None], 30.0)
    one = _as_float(fn(sure, labels), "perplexity of a model that is always right")
    expect_close(one, 1.0, "a model that puts all its probability on the next token: perplexity",
                 atol=1e-3)

    # 4. the label at position 0 is never predicted: changing it must not matter
    other = labels.clone()
    other[:, 0] = (ids[:, 0] + 1) % V
    same = _as_float(fn(logits, other), "with a different first label")
    expect(abs(same - got) < 1e-6 * got,
           "changing the label at position 0 changed your perplexity, but nothing predicts "
           "position 0 (logits at t predict t+1). Use labels[:, 1:].")


def check_perplexity_from_logits(fn: Callable[..., Any]) -> CheckResult:
    """Exercise 2.2: ``perplexity_from_logits(logits, labels) -> float``."""
    return run_check("2.2", "perplexity_from_logits", fn, _perplexity_cases,
                     success="all checks passed: exp of the mean next-token NLL, -100 ignored.")


# ---------------------------------------------------------------------------- 2.3 greedy_decode


def _tiny_lm():
    """A small random Llama whose greedy output varies (large init), built in milliseconds."""
    from utils.models import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5, generator=g)
    return model


def _generate(model, prompt: torch.Tensor, max_new_tokens: int, eos: int | None) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=eos if eos is not None else 0)


def _decode_result(out: Any, what: str) -> torch.Tensor:
    expect(out is not None, f"{what}: your function returned None. Did you forget `return`?")
    t = torch.as_tensor(out)
    if t.dim() == 1:
        t = t[None]
    expect(not t.is_floating_point(), f"{what}: return token ids (integers), got {t.dtype}")
    return t.long()


def _greedy_cases(fn: Callable[..., Any]) -> None:
    model = _tiny_lm()
    prompt = torch.tensor([[3, 17, 8, 25, 11]])  # (1, T=5)
    T, n = prompt.size(1), 10
    free = _generate(model, prompt, n, None)[0, T:].tolist()  # the greedy continuation
    unused = next(t for t in range(model.config.vocab_size) if t not in free)
    # an end token that greedy decoding meets at step k (its first occurrence)
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    eos = free[k]

    # 1. no end token met: n new tokens after the prompt
    before = prompt.clone()
    expected = _generate(model, prompt, n, unused)
    got = _decode_result(fn(model, prompt, n, unused), "greedy_decode(model, prompt, 10, eos)")
    expect(torch.equal(prompt, before), "your function changed input_ids in place.")
    if got.shape == expected.shape and torch.equal(got, expected):
        pass
    elif got.size(1) == n and torch.equal(got, expected[:, T:]):
        raise CheckFailed("you returned only the new tokens; return the prompt followed by "
                             "them, as model.generate does (shape (1, T + n)).")
    elif got.size(1) == T + n + 1 and torch.equal(got[:, :T + n], expected):
        raise CheckFailed(f"off by one: asked for {n} new tokens you produced {n + 1}.")
    elif got.size(1) == T + n - 1 and torch.equal(got, expected[:, :-1]):
        raise CheckFailed(f"off by one: asked for {n} new tokens you produced {n - 1}.")
    elif got.size(1) > T and got[0, T].item() != expected[0, T].item():
        with torch.no_grad():
            logits = model(prompt).logits  # (1, T, V)
        first = got[0, T].item()
        if first == logits[0, 0].argmax().item():
            hint = ("use the logits of the LAST position, logits[:, -1, :]: they predict the "
                    "next token.")
        elif first == logits[0].argmax(0)[-1].item():
            hint = "argmax over the vocabulary (the last axis, dim=-1), not over positions."
        else:
            hint = "take the argmax of the last position's logits, logits[:, -1, :].argmax(-1)."
        raise CheckFailed(f"the first new token is {first}, greedy decoding gives "
                             f"{expected[0, T].item()}: {hint}")
    else:
        raise CheckFailed(
            f"your tokens differ from model.generate(do_sample=False): expected "
            f"{expected[0, T:].tolist()}, got {got[0, T:].tolist()}. Feed the whole sequence so "
            "far (or the newest token with past_key_values) at each step and append the argmax.")

    # 2. the end token is met at step k: stop right after appending it
    expected = _generate(model, prompt, n, eos)
    expect(expected.size(1) == T + k + 1, "internal: the end token was not met where expected")
    got = _decode_result(fn(model, prompt, n, eos), f"greedy_decode(..., eos_token_id={eos})")
    if not torch.equal(got, expected):
        if got.size(1) > expected.size(1) and torch.equal(got[:, :expected.size(1)], expected):
            raise CheckFailed(f"you did not stop at the end token ({eos}): stop as soon as "
                                 "you append it, as generate does.")
        if torch.equal(got, expected[:, :-1]):
            raise CheckFailed("you stopped at the end token but dropped it; keep it in the "
                                 "output (generate does), then stop.")
        raise CheckFailed(f"with eos_token_id={eos} expected {expected[0, T:].tolist()}, "
                             f"got {got[0, T:].tolist()}.")

    # 3. a different prompt, to rule out anything hard-wired
    prompt2 = torch.tensor([[30, 2, 9]])
    expected = _generate(model, prompt2, 6, unused)
    got = _decode_result(fn(model, prompt2, 6, unused), "on a second prompt")
    expect(torch.equal(got, expected), f"on the prompt {prompt2[0].tolist()} expected "
                                       f"{expected[0].tolist()}, got {got[0].tolist()}.")


def check_greedy_decode(fn: Callable[..., Any]) -> CheckResult:
    """Exercise 2.3: ``greedy_decode(model, input_ids, max_new_tokens, eos_token_id)``."""
    return run_check("2.3", "greedy_decode", fn, _greedy_cases,
                     success="all checks passed: your loop matches model.generate token for token.")


# ------------------------------------------------------------- 2.4 open experiment: the schedule
# Train a small model for a fixed, short budget and reach a validation perplexity: the learner
# chooses the learning-rate schedule. The check builds the model (seeded), trains it with
# utils.train.train_lm on the world's training chats and measures perplexity on the lesson's 64
# validation chats (section 4), the same numbers every time on one thread.
SCHEDULE_SHAPE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}  # small: seconds per run
SCHEDULE_STEPS = 40  # optimizer steps (the budget)
SCHEDULE_BATCH = 16  # chats per step
SCHEDULE_N_VAL = 64  # validation chats (the lesson's section 4)
# The bar on validation perplexity. Measured on the course machine, 2026-12-06 (seeded, one
# thread; tests/test_checks_lm.py re-measures both ends), cosine with 10% warm-up unless said:
# lr 5e-5 (Trainer's default, linear) 692, 3e-4 457, 1e-3 200, 3e-3 (the lesson's LR) 63,
# 5e-3 41, 1e-2 37 (20% warm-up 38, linear 38, constant 45), 2e-2 45, 3e-2 66, 1e-1 85.
SCHEDULE_PPL_BAR = 45.0
_SCHEDULE_DATA: dict[int, tuple[Any, Any, Any]] = {}  # id(tokenizer) -> (tokenizer, train, val)


def _schedule_data(tokenizer: Any) -> tuple[Any, Any]:
    entry = _SCHEDULE_DATA.get(id(tokenizer))
    if entry is not None and entry[0] is tokenizer:
        return entry[1], entry[2]
    from utils.data import load_world
    from utils.train import PadCollator, prepare_dataset

    world = load_world()
    train = prepare_dataset(world["train"].select(range(SCHEDULE_STEPS * SCHEDULE_BATCH * 2)),
                            tokenizer)
    val = prepare_dataset(world["validation"].select(range(SCHEDULE_N_VAL)), tokenizer)
    batch = PadCollator(tokenizer.pad_token_id)([val[i] for i in range(len(val))])
    _SCHEDULE_DATA[id(tokenizer)] = (tokenizer, train, batch)
    return train, batch


def schedule_experiment(tokenizer: Any, *, lr: float, warmup_steps: float,
                        scheduler: str = "cosine", seed: int = 0) -> dict[str, Any]:
    """Exercise 2.4's experiment: validation perplexity after :data:`SCHEDULE_STEPS` steps.

    Builds a ``SCHEDULE_SHAPE`` model with ``seed``, trains it with ``utils.train.train_lm``
    (``lr``, ``warmup_steps`` as a fraction of the steps when below 1, ``scheduler`` one of
    transformers' names: ``"cosine"``, ``"linear"``, ``"constant"``...) and returns the
    validation perplexity, the last training losses and the seconds it took. A few seconds.
    Call it to try schedules before you commit to one.
    """
    from utils.device import torch_threads
    from utils.models import ModelConfig, build_model
    from utils.train import train_lm

    train, batch = _schedule_data(tokenizer)
    config = ModelConfig(vocab_size=len(tokenizer), max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SCHEDULE_SHAPE)
    with torch_threads(1):  # the same numbers in the notebook and in the tests
        model = build_model(config, seed=seed)
        run = train_lm(model, tokenizer, train, max_steps=SCHEDULE_STEPS,
                       batch_size=SCHEDULE_BATCH, lr=lr, warmup_steps=warmup_steps,
                       scheduler=scheduler, seed=seed, logging_steps=5, progress=False)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"])
    loss = float(out.loss)
    return {"perplexity": math.exp(loss) if math.isfinite(loss) else math.inf,
            "train_seconds": run.train_seconds,
            "last_losses": [round(loss_, 3) for _, loss_ in run.train_losses][-3:]}


def check_schedule_choice(fn: Callable[[], Any], tokenizer: Any,
                          exercise: str = "2.4") -> CheckResult:
    """Exercise 2.4: ``fn()`` returns ``{"lr": ..., "warmup_steps": ..., "scheduler": ...}``;
    the small model trained for :data:`SCHEDULE_STEPS` steps must reach a validation perplexity
    of at most :data:`SCHEDULE_PPL_BAR`."""
    from utils.checks.experiment import Outcome, Setting, run_experiment

    settings = (
        Setting("lr", low=0.0, open_low=True, high=1.0, meaning="peak learning rate"),
        Setting("warmup_steps", low=0.0, high=SCHEDULE_STEPS,
                meaning="warm-up: a fraction of the steps below 1, else a number of steps"),
        Setting("scheduler", kind="choice",
                choices=("cosine", "linear", "constant", "constant_with_warmup"),
                meaning="the decay after the warm-up"),
    )

    def measure(choice: dict[str, Any]) -> Outcome:
        r = schedule_experiment(tokenizer, **choice)
        said = ", ".join(f"{k} = {v!r}" for k, v in choice.items())
        what = (f"{said}: after {SCHEDULE_STEPS} steps of {SCHEDULE_BATCH} chats the model's "
                f"validation perplexity is {r['perplexity']:.2f} (bar {SCHEDULE_PPL_BAR:g}; a "
                f"uniform guess is {len(tokenizer)}), trained in {r['train_seconds']:.1f} s")
        if r["perplexity"] <= SCHEDULE_PPL_BAR:
            return Outcome(True, what + " (met).")
        return Outcome(False, what + " (missed).",
                       "Watch the training loss of a few tries (schedule_experiment returns the "
                       "last ones): does it fall too slowly, or jump around? Vary the peak "
                       "learning rate by factors of 3 before you touch anything else.")

    return run_experiment(exercise, "choose_schedule", fn, settings, measure)
