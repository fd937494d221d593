"""The hand-written Kirchenbauer detector against transformers', p-values, radioactivity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _tiny_chat import CORPUS, tiny_model, tiny_tokenizer
from transformers import WatermarkDetector, WatermarkingConfig
from transformers.generation.logits_process import WatermarkLogitsProcessor

from utils.watermark import (
    Generation,
    binomial_p_value,
    chat_generations,
    generation_pairs,
    green_z_score,
    greenlist,
    radioactivity_of_generations,
    radioactivity_score,
    radioactivity_test,
    score_pairs,
    score_text,
    score_tokens,
    watermark_z,
)

V = 128


@pytest.fixture(scope="module")
def tok():
    torch.set_num_threads(1)
    return tiny_tokenizer(V)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=0)


def hf_detector(model, wm, ignore_repeated: bool) -> WatermarkDetector:
    # WatermarkDetector compares the first token with bos_token_id (None breaks it) and
    # drops a leading BOS; our tiny tokenizer has no BOS, so use an id that never leads.
    config = copy.deepcopy(model.config)
    config.bos_token_id = 4  # "<|system|>", never generated first below
    return WatermarkDetector(config, "cpu", wm, ignore_repeated_ngrams=ignore_repeated)


SCHEMES = [("lefthash", 1), ("lefthash", 2), ("selfhash", 1), ("selfhash", 2)]


@pytest.mark.parametrize("scheme, width", SCHEMES)
def test_greenlist_matches_transformers_processor(scheme, width):
    wm = WatermarkingConfig(seeding_scheme=scheme, context_width=width, greenlist_ratio=0.3)
    proc = WatermarkLogitsProcessor(vocab_size=V, device="cpu", greenlist_ratio=0.3,
                                    seeding_scheme=scheme, context_width=width)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        window = torch.randint(0, V, (3,), generator=g)
        assert greenlist(window.tolist(), V, wm) == set(proc._get_greenlist_ids(window).tolist())


@pytest.mark.parametrize("scheme, width", SCHEMES)
@pytest.mark.parametrize("ignore_repeated", [False, True])
def test_detector_agrees_with_transformers(model, scheme, width, ignore_repeated):
    wm = WatermarkingConfig(seeding_scheme=scheme, context_width=width, bias=3.0)
    g = torch.Generator().manual_seed(width)
    # random text with repeats (a short alphabet) and watermarked text from the model
    random_ids = torch.randint(6, 30, (1, 80), generator=g)
    torch.manual_seed(0)
    x = torch.tensor([[2, 50, 60]])
    marked = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=40,
                            do_sample=True, top_k=0, watermarking_config=wm,
                            pad_token_id=0, eos_token_id=None)[:, 3:]
    det = hf_detector(model, wm, ignore_repeated)
    for ids in (random_ids, marked):
        assert ids[0, 0].item() != 4
        ref = det(ids, return_dict=True)
        mine = score_tokens(ids[0].tolist(), V, wm, ignore_repeated=ignore_repeated)
        assert mine.num_scored == ref.num_tokens_scored[0]
        assert mine.num_green == ref.num_green_tokens[0]
        assert mine.z_score == pytest.approx(float(ref.z_score[0]), abs=1e-9)
        # transformers' p is the normal approximation 1 - Phi(z); ours is the exact tail
        assert float(ref.p_value[0]) == pytest.approx(0.5 * math.erfc(mine.z_score / 2**0.5),
                                                      rel=1e-6, abs=1e-12)


def test_repeated_ngrams_counted_once():
    wm = WatermarkingConfig()
    ids = [7, 9] * 20  # two distinct (context, token) pairs, 39 scored tokens with repeats
    assert score_tokens(ids, V, wm).num_scored == 2
    assert score_tokens(ids, V, wm, ignore_repeated=False).num_scored == 39
    green = lambda prev, tok: True  # noqa: E731
    assert green_z_score(ids, green, 0.25) == pytest.approx(watermark_z(2, 2, 0.25))


def test_z_and_exact_binomial_p_value_known_cases():
    # 4 of 4 green at gamma 1/4: z = (4 - 1) / sqrt(4 * 1/4 * 3/4) = 3 / sqrt(0.75)
    assert watermark_z(4, 4, 0.25) == pytest.approx(3 / math.sqrt(0.75))
    assert binomial_p_value(10, 10, 0.5) == pytest.approx(2.0 ** -10)
    assert binomial_p_value(0, 10, 0.5) == pytest.approx(1.0)
    # P[Bin(4, 1/4) >= 2] = 1 - (3/4)^4 - 4 (1/4)(3/4)^3
    assert binomial_p_value(2, 4, 0.25) == pytest.approx(1 - 0.75**4 - 4 * 0.25 * 0.75**3)
    with pytest.raises(ValueError, match="no tokens"):
        watermark_z(0, 0, 0.25)


def test_watermarked_text_is_detected_and_clean_text_is_not(model, tok):
    wm = WatermarkingConfig(bias=4.0)
    x = torch.tensor([[2, 50, 60]])
    torch.manual_seed(1)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=50,
              do_sample=True, top_k=0, pad_token_id=0, eos_token_id=None)
    marked = model.generate(watermarking_config=wm, **kw)[0, 3:].tolist()
    clean = model.generate(**kw)[0, 3:].tolist()
    s_marked, s_clean = score_tokens(marked, V, wm), score_tokens(clean, V, wm)
    assert s_marked.p_value < 1e-6 and s_marked.z_score > 5
    assert s_clean.p_value > 1e-3
    text = tok.decode(marked)
    assert score_text(text, tok, V, wm).num_scored > 0  # round trip through text works


def _train(tok, data: torch.Tensor, seed: int, steps: int = 60):
    student = tiny_model(tok, seed=seed).train()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-3)
    for _ in range(steps):
        loss = student(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


@pytest.mark.slow
def test_radioactivity_student_of_watermarked_text(tok):
    """Sander et al. (2024): a student trained on watermarked text carries the watermark."""
    wm = WatermarkingConfig(bias=4.0)
    teacher = tiny_model(tok, seed=1)
    torch.manual_seed(0)
    x = torch.randint(6, V, (64, 1))
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=48,
              do_sample=True, top_k=0, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        marked = teacher.generate(watermarking_config=wm, **kw)
        clean = teacher.generate(**kw)
    radioactive = _train(tok, marked, seed=10)
    control = _train(tok, clean, seed=10)
    prompts = [line[:20] for line in CORPUS]
    # 64 tokens per prompt: with 32 the p-value sat near the threshold and moved with the CPU's
    # float kernels (1.5e-4 measured on an AMD EPYC); 64 gave 2e-14 there, and 0.26 for the control
    p_radio = radioactivity_test(radioactive, tok, prompts, wm, max_new_tokens=64)
    p_control = radioactivity_test(control, tok, prompts, wm, max_new_tokens=64)
    assert p_radio < 1e-5, p_radio
    assert p_control > 1e-2, p_control
    # teacher-forced reading of ordinary text shows it too
    read = radioactivity_score(radioactive, tok, CORPUS, wm, mode="read")
    assert read.p_value < 1e-3 and read.num_scored == len(set(read_pairs(tok, radioactive)))
    assert radioactivity_score(control, tok, CORPUS, wm, mode="read").p_value > 1e-2


def read_pairs(tok, student) -> list:
    pairs = []
    with torch.no_grad():
        for text in CORPUS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            pred = student(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
            pairs += [((ids[t - 1],), pred[t - 1]) for t in range(1, len(ids))]
    return pairs


# --------------------------------------------------------------------------------------
# Radioactivity on realistic traffic (issue 17): batched generations, the closed-model test


def _tuples_of_known_colour(wm, n_green: int, n_red: int) -> list[tuple[int, int]]:
    """(previous token, token) pairs with distinct contexts, chosen by their colour."""
    out, greens, reds = [], 0, 0
    for prev in range(6, V):
        gl = greenlist((prev,), V, wm)
        if greens < n_green:
            out.append((prev, min(gl)))
            greens += 1
        elif reds < n_red:
            out.append((prev, min(set(range(V)) - gl)))
            reds += 1
    assert (greens, reds) == (n_green, n_red)
    return out


def test_radioactivity_p_value_known_case_and_dedup():
    """A hand-made suspect: 6 green of 20 distinct tuples -> p = P[Bin(20, 1/4) >= 6], exactly;
    repeating answers (as a suspect does) adds no evidence once tuples are de-duplicated."""
    wm = WatermarkingConfig()
    tuples = _tuples_of_known_colour(wm, n_green=6, n_red=14)
    gens = [Generation(prompt_ids=(prev,), ids=(tok,), stopped=True) for prev, tok in tuples]
    exact = sum(math.comb(20, k) * 0.25**k * 0.75 ** (20 - k) for k in range(6, 21))
    s = radioactivity_of_generations(gens, V, wm)
    assert (s.num_scored, s.num_green) == (20, 6)
    assert s.p_value == pytest.approx(exact, rel=1e-9)
    # the six green answers given ten times each: same test after de-duplication ...
    repeated = gens + [g for g in gens[:6] for _ in range(9)]
    assert radioactivity_of_generations(repeated, V, wm) == s
    # ... while counting repeats would claim 60 green of 74 and a tiny, wrong p-value
    naive = score_pairs(generation_pairs(repeated, wm), V, wm, ignore_repeated=False)
    assert naive.num_scored == 74 and naive.num_green == 60 and naive.p_value < 1e-20
    # the first answer token is scored with the prompt's last token as its context
    two = Generation(prompt_ids=(3, tuples[0][0]), ids=(tuples[0][1], 9), stopped=False)
    assert generation_pairs([two], wm) == [((tuples[0][0],), tuples[0][1]), ((tuples[0][1],), 9)]


def test_radioactivity_p_value_is_calibrated_under_the_null():
    """Suspects that never saw the watermark: P[p < alpha] <= alpha (about), over 300 suspects."""
    wm = WatermarkingConfig()
    rng = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(300):
        ids = torch.randint(6, V, (4, 30), generator=rng).tolist()
        gens = [Generation((5,), tuple(row), False) for row in ids]
        ps.append(radioactivity_of_generations(gens, V, wm).p_value)
    assert sum(p < 0.05 for p in ps) / len(ps) <= 0.08
    assert sum(p < 0.5 for p in ps) / len(ps) >= 0.35  # not trivially conservative either


def test_chat_generations_batched_like_one_by_one(model, tok):
    """Left padding keeps each row's own last token as the watermark's seed: batched greedy
    answers with the watermark equal one-by-one answers; sampling is seeded."""
    wm = WatermarkingConfig(bias=4.0)
    prompts = ["the teacher", "a small student learns", "why", "blue and yellow are primary"]
    batched = chat_generations(model, tok, prompts, max_new_tokens=12, watermark_config=wm)
    single = [chat_generations(model, tok, [p], max_new_tokens=12, watermark_config=wm)[0]
              for p in prompts]
    assert batched == single and all(len(g.ids) <= 12 for g in batched)
    clean = chat_generations(model, tok, prompts, max_new_tokens=12)
    assert [g.prompt_ids for g in clean] == [g.prompt_ids for g in batched]
    a = chat_generations(model, tok, prompts, max_new_tokens=12, temperature=1.0, seed=3)
    b = chat_generations(model, tok, prompts, max_new_tokens=12, temperature=1.0, seed=3)
    assert a == b
    with pytest.raises(TypeError, match="list of str"):
        chat_generations(model, tok, "one prompt")
