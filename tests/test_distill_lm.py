"""Lesson 03 library: token-level KD losses, DistillationTrainer, distill_lm (tiny models, fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from utils.distill import (
    IGNORE_INDEX,
    check_compatible,
    forward_kl_loss,
    generalized_jsd_loss,
    lm_distillation_loss,
    masked_mean,
    reverse_kl_loss,
    shift_for_next_token,
    token_divergence,
)
from utils.distill_trainer import distill_lm

LOSSES = {
    "forward_kl": forward_kl_loss,
    "reverse_kl": reverse_kl_loss,
    "jsd": lambda s, t, m, T: generalized_jsd_loss(s, t, m, 0.3, T),
}


def _logits(seed=0, B=2, T=5, V=7, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale,
            torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale)


MASK = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)  # prompt, answer, pad


# ------------------------------------------------------------------ losses: invariants

@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_zero_when_student_equals_teacher(name, T):
    s, _ = _logits()
    assert abs(float(LOSSES[name](s, s.clone(), MASK, T))) < 1e-12


def test_forward_and_reverse_differ_on_a_hand_case():
    # teacher p = (0.5, 0.5), student q = (0.9, 0.1): values worked out by hand
    p = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64).log()
    q = torch.tensor([[[0.9, 0.1]]], dtype=torch.float64).log()
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p || q) = 0.5108
    rev = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(q || p) = 0.3681
    assert float(forward_kl_loss(q, p)) == pytest.approx(fwd, rel=1e-9)
    assert float(reverse_kl_loss(q, p)) == pytest.approx(rev, rel=1e-9)
    assert fwd == pytest.approx(0.5108, abs=1e-4) and rev == pytest.approx(0.3681, abs=1e-4)
    # the two directions swap when student and teacher swap
    assert float(reverse_kl_loss(p, q)) == pytest.approx(fwd, rel=1e-9)


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss (reduction 'batchmean'), re-typed for the test."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, t, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(mix, s, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_follows_trl_definition(beta):
    s, t = _logits(1)
    labels = torch.where(MASK, torch.zeros_like(MASK, dtype=torch.long), -100)
    ours = generalized_jsd_loss(s, t, MASK, beta=beta, temperature=1.0)
    assert float(ours) == pytest.approx(float(_trl_generalized_jsd(s, t, labels, beta)), rel=1e-9)


def test_jsd_limits_and_symmetry():
    s, t = _logits(2)
    fwd, rev = forward_kl_loss(s, t, MASK, 2.0), reverse_kl_loss(s, t, MASK, 2.0)
    assert float(generalized_jsd_loss(s, t, MASK, 0.0, 2.0)) == pytest.approx(float(fwd), rel=1e-12)
    assert float(generalized_jsd_loss(s, t, MASK, 1.0, 2.0)) == pytest.approx(float(rev), rel=1e-12)
    eps = 1e-5  # the formula itself vanishes at the ends; divided by its weight it tends to the KLs
    assert (float(generalized_jsd_loss(s, t, MASK, eps, 2.0)) / eps
            == pytest.approx(float(fwd), rel=1e-3))
    assert (float(generalized_jsd_loss(s, t, MASK, 1 - eps, 2.0)) / eps
            == pytest.approx(float(rev), rel=1e-3))
    half = generalized_jsd_loss(s, t, MASK, 0.5, 1.0)
    assert float(half) == pytest.approx(float(generalized_jsd_loss(t, s, MASK, 0.5, 1.0)),
                                        rel=1e-12)
    assert 0 < float(half) <= math.log(2)
    assert float(fwd) != pytest.approx(float(rev), rel=1e-3)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s, t, MASK, 1.5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_t2_factor_keeps_the_gradient_scale(name):
    s, t = _logits(3, scale=0.3)

    def grad_norm(T, scaled=True):
        x = s.clone().requires_grad_(True)
        loss = LOSSES[name](x, t, MASK, T)
        (loss if scaled else loss / T**2).backward()
        return float(x.grad.norm())

    # With T^2 the gradient keeps its size as T doubles; without it, it shrinks about 4x.
    assert grad_norm(8.0) / grad_norm(4.0) == pytest.approx(1.0, abs=0.1)
    assert grad_norm(4.0, scaled=False) / grad_norm(8.0, scaled=False) > 3.5


@pytest.mark.parametrize("name", list(LOSSES))
def test_masks_are_honoured(name):
    s, t = _logits(4)
    fn = LOSSES[name]
    base = float(fn(s, t, MASK, 2.0))
    s2, t2 = s.clone(), t.clone()
    s2[~MASK] = 100.0 * torch.randn_like(s2[~MASK])
    t2[~MASK] = float("nan")  # a NaN at a padded position must not leak
    assert float(fn(s2, t2, MASK, 2.0)) == pytest.approx(base, rel=1e-12)
    x = s.clone().requires_grad_(True)
    fn(x, t, MASK, 2.0).backward()
    assert float(x.grad[~MASK].abs().max()) == 0.0 and float(x.grad[MASK].abs().max()) > 0
    empty = torch.zeros_like(MASK)
    y = s.clone().requires_grad_(True)
    zero = fn(y, t, empty, 2.0)
    zero.backward()
    assert float(zero.detach()) == 0.0 and float(y.grad.abs().max()) == 0.0
    assert float(fn(s, t, MASK.double(), 2.0)) == pytest.approx(base, rel=1e-12)  # float mask


def test_reduction_is_a_token_level_mean():
    s, t = _logits(5)
    per_token = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    # 3 answer tokens in row 0, 1 in row 1: one mean over the 4 tokens, not a mean of row means
    expected = float(per_token[MASK].mean())
    assert float(forward_kl_loss(s, t, MASK)) == pytest.approx(expected, rel=1e-12)
    assert float(masked_mean(per_token, MASK)) == pytest.approx(expected, rel=1e-12)
    row_means = float((per_token[0, 1:4].mean() + per_token[1, 2]) / 2)
    assert abs(row_means - expected) > 1e-3


def test_bad_shapes_get_clear_errors():
    s, t = _logits(6)
    with pytest.raises(ValueError, match="vocabularies differ"):
        forward_kl_loss(s, t[..., :5], MASK)
    with pytest.raises(ValueError, match="mask must be"):
        forward_kl_loss(s, t, MASK[:, :4])
    with pytest.raises(ValueError, match="loss_type"):
        token_divergence(s, t, MASK, loss_type="kl")
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl_loss(s, t, MASK, 0.0)


# ------------------------------------------------------------------ tiny chat models

@pytest.fixture(scope="module")
def tok():
    from _tiny_chat import tiny_tokenizer

    from utils.tokenizer import CHAT_TEMPLATE

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # marks the assistant's turn for tokenize_chat
    return tokenizer


def _model(tok, hidden=32, layers=1, seed=0, vocab=None):
    from utils.models import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=vocab or len(tok), hidden_size=hidden, num_layers=layers,
                      num_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    return build_model(cfg, seed=seed)


def _teacher(tok):
    teacher = _model(tok, hidden=48, layers=2, seed=1)
    with torch.no_grad():  # large tied embeddings: peaked, far-from-uniform distributions
        emb = teacher.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    return teacher.eval()


@pytest.fixture(scope="module")
def chat_ds():
    from datasets import Dataset

    rows = [{"messages": [{"role": "user", "content": f"what is {a} , {b} ?"},
                          {"role": "assistant", "content": f"{a} {b} the end"}]}
            for a in range(8) for b in range(4)]
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def batch(tok, chat_ds):
    from utils.train import PadCollator, prepare_dataset

    data = prepare_dataset(chat_ds.select(range(6)), tok)
    return PadCollator(tok.pad_token_id)([data[i] for i in range(len(data))])


def test_alpha_zero_is_the_models_own_shifted_cross_entropy(tok, batch):
    model = _model(tok).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
    ours = lm_distillation_loss(out.logits, torch.randn_like(out.logits), batch["labels"], 2.0, 0.0)
    assert float(ours) == pytest.approx(float(out.loss), rel=1e-5)  # transformers' shift = ours
    logits, targets, mask = shift_for_next_token(out.logits, batch["labels"])
    assert logits.shape[1] == targets.shape[1] == batch["labels"].shape[1] - 1
    assert bool((mask == (batch["labels"][:, 1:] != IGNORE_INDEX)).all())
    # the prompt carries no label: the first labelled position comes after <|assistant|>
    first = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0, 0])
    assert tok.convert_ids_to_tokens(int(batch["input_ids"][0, first - 1])) == "<|assistant|>"


def test_vocab_and_tokenizer_mismatch_errors(tok):
    from _tiny_chat import tiny_tokenizer
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    teacher, student = _model(tok), _model(tok, vocab=len(tok) + 32)
    with pytest.raises(ValueError,
                       match=rf"{len(tok)} output logits.*{len(tok) + 32}.*vocab_size="):
        check_compatible(teacher, student)
    other = tiny_tokenizer(vocab_size=100)
    other.name_or_path = "other-tokenizer"
    with pytest.raises(ValueError,
                       match=rf"tokenizers differ.*{len(tok)} tokens.*other-tokenizer.*100"):
        check_compatible(teacher, _model(tok), tok, other)
    # same size, two ids swapped: logit i would mean different tokens
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (40, 41)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      pad_token="<|pad|>", eos_token="<|end|>", unk_token="<|unk|>")
    assert len(swapped) == len(tok)
    with pytest.raises(ValueError, match="different ids"):
        check_compatible(teacher, _model(tok), tok, swapped)
    check_compatible(teacher, _model(tok, hidden=16), tok, tok)  # same vocab: fine


def _trainer(tok, chat_ds, teacher, student, **kw):
    from transformers import TrainingArguments

    from utils.distill_trainer import DistillationTrainer
    from utils.train import PadCollator, prepare_dataset

    args = TrainingArguments(output_dir=kw.pop("output_dir"), max_steps=kw.pop("max_steps", 3),
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                             remove_unused_columns=False, logging_steps=1)
    return DistillationTrainer(model=student, args=args, teacher_model=teacher,
                               train_dataset=prepare_dataset(chat_ds, tok),
                               data_collator=PadCollator(tok.pad_token_id),
                               processing_class=tok, **kw)


def test_trainer_arguments_are_checked(tok, chat_ds, tmp_path):
    with pytest.raises(TypeError, match="teacher_model"):
        _trainer(tok, chat_ds, None, _model(tok), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="loss_type"):
        _trainer(tok, chat_ds, _teacher(tok), _model(tok), output_dir=str(tmp_path), loss_type="kl")
    with pytest.raises(ValueError, match="alpha"):
        _trainer(tok, chat_ds, _teacher(tok), _model(tok), output_dir=str(tmp_path), alpha=2)
    with pytest.raises(ValueError, match="vocabularies differ"):
        _trainer(tok, chat_ds, _teacher(tok), _model(tok, vocab=len(tok) + 1),
                 output_dir=str(tmp_path))


@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd"])
def test_teacher_is_frozen_and_only_the_student_learns(tok, chat_ds, tmp_path, loss_type):
    teacher, student = _teacher(tok), _model(tok)
    teacher.train()  # the trainer must put it in eval mode itself
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _trainer(tok, chat_ds, teacher, student, output_dir=str(tmp_path), max_steps=3,
                       loss_type=loss_type, temperature=2.0, alpha=0.5)
    trainer.train()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), f"teacher weight {k} changed"
    assert any(not torch.equal(v, s_before[k]) for k, v in student.state_dict().items())
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised.isdisjoint({id(p) for p in teacher.parameters()})
    assert len(trainer.step_log) == 3 and all(not s["on_policy"] for s in trainer.step_log)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("kd_loss" in h and "ce_loss" in h for h in logged)


def test_on_policy_batches_mask_only_generated_tokens(tok, chat_ds, batch, tmp_path):
    teacher, student = _teacher(tok), _model(tok)
    trainer = _trainer(tok, chat_ds, teacher, student, output_dir=str(tmp_path), max_steps=2,
                       lmbda=1.0, max_new_tokens=5, loss_type="reverse_kl", alpha=0.5)
    seen = []
    generate = student.generate

    def spy(*args, **kwargs):  # generation: student in eval mode, no gradient
        seen.append((student.training, torch.is_grad_enabled()))
        return generate(*args, **kwargs)

    student.generate = spy
    student.train()
    new = trainer.on_policy_batch(student, {k: v.clone() for k, v in batch.items()})
    assert seen == [(False, False)] and student.training  # back in train mode afterwards
    for i, n_prompt in enumerate(new["prompt_lengths"].tolist()):
        first = int((batch["labels"][i] != IGNORE_INDEX).nonzero()[0, 0])
        assert n_prompt == first  # the prompt: everything before the answer
        assert torch.equal(new["input_ids"][i, :n_prompt], batch["input_ids"][i, :n_prompt])
        length = int(new["attention_mask"][i].sum())
        assert 1 <= length - n_prompt <= 5
        labels = new["labels"][i]
        assert bool((labels[:n_prompt] == IGNORE_INDEX).all())  # prompt: no loss
        assert torch.equal(labels[n_prompt:length], new["input_ids"][i, n_prompt:length])
        assert bool((labels[length:] == IGNORE_INDEX).all())  # padding: no loss
        assert bool((new["attention_mask"][i, length:] == 0).all())
        eos = (new["input_ids"][i, n_prompt:length] == tok.eos_token_id).nonzero()
        assert len(eos) == 0 or int(eos[0, 0]) == length - n_prompt - 1  # cut after the end token
    trainer.train()
    assert len(trainer.step_log) == 2 and all(s["on_policy"] for s in trainer.step_log)
    assert trainer.last_on_policy is not None
    assert all(abs(s["loss"] - s["kd_loss"]) < 1e-6 for s in trainer.step_log)  # KD only
    assert all("on_policy_share" in h for h in trainer.state.log_history if "loss" in h)


def test_lmbda_sets_the_share_of_on_policy_batches(tok, chat_ds, tmp_path):
    trainer = _trainer(tok, chat_ds, _teacher(tok), _model(tok), output_dir=str(tmp_path),
                       lmbda=0.5, max_new_tokens=3, seed=3)
    flips = [trainer._coin.random() < 0.5 for _ in range(200)]
    assert 70 < sum(flips) < 130


def test_distill_lm_mirrors_train_lm(tok, chat_ds):
    teacher, student = _teacher(tok), _model(tok)
    res = distill_lm(student, teacher, tok, chat_ds, chat_ds.select(range(8)), max_steps=12,
                     batch_size=8, lr=1e-2, seed=0, loss_type="forward_kl", alpha=1.0,
                     logging_steps=1, eval_steps=6, progress=False)
    assert res.steps == 12 and res.train_seconds > 0 and res.tokens_seen > 0
    assert len(res.eval_losses) == 2 and len(res.train_losses) == 12
    assert not student.training
    losses = [s["kd_loss"] for s in res.step_log]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])  # the student moves toward the teacher
