"""The hand-written quantization against the libraries (lesson 05).

torch.ao ``quantize_dynamic``, torchao ``Int8WeightOnlyConfig`` (directly and through
transformers' ``TorchAoConfig``) and GGUF files written with the ``gguf`` package and read
back by transformers (``gguf_file=``) and by ``gguf.GGUFReader``. Tolerances are measured on
this tiny random model (the numbers are in the comments) with a margin of about 3x.
"""

from __future__ import annotations

import json

import pytest
import torch

from utils.models import ModelConfig, build_model
from utils.quantize import (
    fake_quantize_model,
    gguf_tensor_types,
    kl_to_reference,
    linear_weight_bytes,
    load_gguf_model,
    load_with_torchao_config,
    quant_params,
    quantizable_linears,
    quantize,
    quantize_dynamic_int8,
    quantize_groupwise,
    read_gguf_tensors,
    top1_flip_rate,
    torchao_int8_weight_only,
    write_gguf,
)
from utils.quiet import silence_library_noise

silence_library_noise()
torch.set_num_threads(2)

VOCAB = 96


@pytest.fixture(scope="module")
def tiny():
    """2-layer Llama, hidden 64, 4 query / 2 KV heads, MLP 176 (not a multiple of 32)."""
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    return build_model(config, seed=0).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ref(tiny, ids):
    return _logits(tiny, ids)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------ torch.ao quantize_dynamic

def test_quantize_dynamic_weights_equal_the_hand_written_int8(tiny, ids, ref):
    qd = quantize_dynamic_int8(tiny)
    assert isinstance(qd.lm_head, torch.nn.Linear)  # skipped, like include_lm_head=False
    for name, lin in quantizable_linears(tiny).items():
        qweight = qd.get_submodule(name).weight()  # per-tensor symmetric qint8
        scale, zp = quant_params(lin.weight, bits=8, symmetric=True)
        assert qweight.q_scale() == pytest.approx(float(scale), rel=1e-6)
        assert torch.equal(qweight.int_repr().to(torch.int32),
                           quantize(lin.weight, scale, zp, 8, symmetric=True)), name
    # logits: quantize_dynamic also rounds the *activations* to int8 at every Linear, so it
    # is further from the float model than weight-only int8. Measured: max |diff| 0.016
    # against the float model, 0.013 against the hand-written per-tensor int8 weights
    # (logits of size ~0.3); KL to the float model 6.6e-6.
    hand = fake_quantize_model(tiny, bits=8, group_size=None, symmetric=True)
    hand_pt = _per_tensor_int8(tiny)
    out = _logits(qd, ids)
    assert (out - _logits(hand_pt, ids)).abs().max() < 0.04
    assert kl_to_reference(ref, out) < 3e-5
    assert kl_to_reference(ref, _logits(hand, ids)) < kl_to_reference(ref, out)
    # int8 codes + one scale and zero point (float64 and int64) per tensor
    lins = quantizable_linears(tiny).values()
    assert linear_weight_bytes(qd) == sum(lin.weight.numel() + 16 for lin in lins)


def _per_tensor_int8(model):
    q = fake_quantize_model(model, bits=8, group_size=None, symmetric=True)
    with torch.no_grad():
        for name, lin in quantizable_linears(q).items():
            w = model.get_submodule(name).weight
            scale, zp = quant_params(w, 8, symmetric=True)
            lin.weight.copy_((quantize(w, scale, zp, 8, symmetric=True) - zp).float() * scale)
    return q


# ------------------------------------------------------------------ torchao int8 weight-only

def test_torchao_int8_weight_only_agrees_with_the_hand_written_int8(tiny, ids, ref):
    ao = torchao_int8_weight_only(tiny)
    assert not hasattr(ao.lm_head.weight, "qdata")
    for name, lin in quantizable_linears(tiny).items():
        w = lin.weight.detach()
        qdata = ao.get_submodule(name).weight.qdata.to(torch.int32)
        qt = quantize_groupwise(w, bits=8, group_size=None, symmetric=True)  # per row
        ao_scale = ao.get_submodule(name).weight.scale.reshape(-1)
        assert torch.equal(qt.scales.reshape(-1), ao_scale), name  # max|w| / 127.5, per row
        # the codes are identical (both compute round(w * (1 / scale)))
        assert torch.equal(qt.codes() - 128, qdata), name
    hand = fake_quantize_model(tiny, bits=8, group_size=None, symmetric=True)
    diff = (_logits(ao, ids) - _logits(hand, ids)).abs().max()
    assert diff < 1e-5  # measured 2.4e-7 (same codes and scales; float32 matmul order)
    assert kl_to_reference(ref, _logits(ao, ids)) < 2e-6  # measured 5.6e-7
    # int8 codes + per row a float32 scale and an int8 zero point (always 0: symmetric)
    lins = quantizable_linears(tiny).values()
    assert linear_weight_bytes(ao) == sum(lin.weight.numel() + 5 * lin.out_features
                                          for lin in lins)


def test_torchao_config_in_from_pretrained_matches_quantize_(tiny, ids, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = load_with_torchao_config(tmp_path)
    direct = torchao_int8_weight_only(tiny)
    assert not hasattr(loaded.lm_head.weight, "qdata")  # transformers skips the output embedding
    for name in quantizable_linears(tiny):
        assert torch.equal(loaded.get_submodule(name).weight.qdata,
                           direct.get_submodule(name).weight.qdata), name
    assert (_logits(loaded, ids) - _logits(direct, ids)).abs().max() < 1e-5  # measured 0


# ------------------------------------------------------------------ GGUF

@pytest.fixture(scope="module")
def gguf_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    types = {q: write_gguf(tiny, folder / f"tiny-{q}.gguf", q) for q in ("F32", "Q8_0", "Q4_0")}
    return folder, types


def test_gguf_files_have_the_types_and_sizes_expected(gguf_dir, tiny):
    folder, types = gguf_dir
    sizes = {q: (folder / f"tiny-{q}.gguf").stat().st_size for q in types}
    assert sizes["Q4_0"] < sizes["Q8_0"] < sizes["F32"] / 2.5
    on_disk = gguf_tensor_types(folder / "tiny-Q4_0.gguf")
    assert on_disk == types["Q4_0"]
    assert on_disk["blk.0.attn_q.weight"] == "Q4_0" and on_disk["token_embd.weight"] == "Q4_0"
    # rows of 176 (the MLP width) are not a multiple of 32: llama.cpp falls back to F16 there
    assert on_disk["blk.0.ffn_down.weight"] == "F16"
    assert on_disk["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in on_disk  # tied: llama.cpp stores the embedding once


def test_gguf_f32_round_trip_is_exact(gguf_dir, tiny, ids, ref):
    folder, _ = gguf_dir
    model = load_gguf_model(folder, "tiny-F32.gguf")
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    # the Q/K row permutation written by write_gguf is undone by transformers' loader
    assert (_logits(model, ids) - ref).abs().max() < 1e-5  # measured 0.0


# measured KL to the float model: Q8_0 1.2e-6, Q4_0 2.8e-4 (embedding quantized too)
@pytest.mark.parametrize("qtype,max_kl", [("Q8_0", 5e-6), ("Q4_0", 1e-3)])
def test_gguf_quantized_round_trip(gguf_dir, tiny, ids, ref, qtype, max_kl):
    folder, _ = gguf_dir
    model = load_gguf_model(folder, f"tiny-{qtype}.gguf")
    out = _logits(model, ids)
    kl = kl_to_reference(ref, out)
    assert 0 < kl < max_kl
    # the weights transformers loaded are exactly what gguf's own reader dequantizes
    tensors = read_gguf_tensors(folder / f"tiny-{qtype}.gguf")
    state = model.state_dict()
    for key, value in tensors.items():
        assert torch.equal(state[key], value), key
    # and GGUFReader + our un-permutation gives back the original layout
    original = tiny.state_dict()
    q_err = (tensors["model.layers.0.self_attn.q_proj.weight"]
             - original["model.layers.0.self_attn.q_proj.weight"]).abs().max()
    levels = 127 if qtype == "Q8_0" else 7
    step = original["model.layers.0.self_attn.q_proj.weight"].abs().max() / levels
    assert q_err <= step


def test_gguf_q4_0_is_comparable_to_our_group_wise_int4(gguf_dir, tiny, ids, ref):
    folder, _ = gguf_dir
    ggml = _logits(load_gguf_model(folder, "tiny-Q4_0.gguf"), ids)
    ours = _logits(fake_quantize_model(tiny, bits=4, group_size=32, symmetric=True,
                                       include_lm_head=True), ids)
    kl_g, kl_o = kl_to_reference(ref, ggml), kl_to_reference(ref, ours)
    # Q4_0 also quantizes the embedding; both are 4-bit symmetric in groups of 32.
    # Measured: KL 2.8e-4 (Q4_0) and 2.6e-4 (ours, lm_head included): a ratio of 1.07
    assert 0.5 < kl_g / kl_o < 2, (kl_g, kl_o)
    assert top1_flip_rate(ref, ggml) < 0.5


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["the cat sat on the mat.", "a dog ran in the park!", "the lazy dog sleeps"] * 10
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def test_gguf_with_a_byte_level_bpe_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    fast = _byte_level_tokenizer()
    config = ModelConfig(vocab_size=len(fast), hidden_size=64, num_layers=1, num_heads=2,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)
    model = build_model(config, seed=1).eval()
    write_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer=fast)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["the cat ran over the lazy dog.", "Hello wörld 123 <|endoftext|> mat"]:
        assert tok(text)["input_ids"] == fast(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == text
    loaded = load_gguf_model(tmp_path, "m.gguf")
    assert loaded.config.vocab_size == len(fast)
    assert loaded.config.eos_token_id == fast.eos_token_id
    # a model whose vocabulary is padded past the tokenizer's (a round 320 here)
    padded = build_model(ModelConfig(vocab_size=320, hidden_size=64, num_layers=1,
                                     num_heads=2), seed=1).eval()
    write_gguf(padded, tmp_path / "p.gguf", "Q8_0", tokenizer=fast)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="p.gguf")
    assert tok("the lazy dog")["input_ids"] == fast("the lazy dog")["input_ids"]
    assert load_gguf_model(tmp_path, "p.gguf").config.vocab_size == 320
    small = build_model(ModelConfig(vocab_size=200, hidden_size=32, num_layers=1,
                                    num_heads=2), seed=1)
    with pytest.raises(ValueError, match="more than the model's vocab_size 200"):
        write_gguf(small, tmp_path / "s.gguf", "Q8_0", tokenizer=fast)


def test_gguf_clear_errors(tiny, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(ValueError, match="qtype 'Q3_K' is not supported"):
        write_gguf(tiny, tmp_path / "x.gguf", "Q3_K")
    word = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="byte-level BPE.*tokenizer=None"):
        write_gguf(tiny, tmp_path / "x.gguf", "Q8_0",
                   tokenizer=PreTrainedTokenizerFast(tokenizer_object=word))
    qwen = build_model(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                                   architecture="qwen2"), seed=0)
    with pytest.raises(ValueError, match="llama architecture"):
        write_gguf(qwen, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_library_sizes_are_reported_consistently(tiny, gguf_dir):
    folder, _ = gguf_dir
    fp32 = linear_weight_bytes(tiny)
    sizes = {"torchao": linear_weight_bytes(torchao_int8_weight_only(tiny)),
             "dynamic": linear_weight_bytes(quantize_dynamic_int8(tiny))}
    for name, size in sizes.items():
        assert fp32 / 4.01 < size < fp32 / 3.7, (name, size, fp32)  # per-row scales on 64 inputs
    assert json.dumps(sizes)  # plain ints, ready for save_results
