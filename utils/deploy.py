"""On-device deployment: export a small causal LM, run it without PyTorch, measure it (lesson 06).

The pieces of lesson 06, each small enough to read:

- **Export** a transformers Llama/Qwen2 model to ONNX with the dynamo exporter
  (``torch.onnx.export(..., dynamo=True)``) in two forms: a plain ``input_ids, attention_mask
  -> logits`` graph (recompute everything each step) and a decode graph with explicit
  ``past_key_values.{i}.key/value`` inputs and ``present.{i}.key/value`` outputs (the layout
  of ONNX Runtime GenAI and Optimum), so the runtime owns the KV cache.
- **Run** greedy decoding in ONNX Runtime, with the cache (:func:`ort_generate`) and without
  (:func:`ort_generate_full`); both match ``model.generate(do_sample=False)`` token for token.
- **Quantize** the ONNX file to int8 with ``onnxruntime.quantization.quantize_dynamic``.
- **ExecuTorch** (optional ``mobile`` extra): ``torch.export`` + XNNPACK to a ``.pte`` file.
- **Measure** size, time to first token, tokens/s (1 thread and all cores) and peak resident
  memory per runtime in a fresh subprocess (:func:`benchmark_runtime`), and compare with the
  physical limit set by memory bandwidth (:func:`memory_bandwidth_gbps`,
  :func:`bandwidth_bound_tokens_per_s`).

Importing this module imports only NumPy: PyTorch, transformers, onnxruntime and executorch
are imported inside the functions that need them, so the ONNX Runtime benchmark process
measures ONNX Runtime's memory, not PyTorch's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.io import atomic_write_bytes, atomic_write_json

RUNTIMES = ("pytorch", "pytorch-int8", "onnxruntime", "executorch")
"""Runtimes :func:`benchmark_runtime` knows (an int8 ONNX file is just another onnxruntime path)."""

_ONNX_PROTO_LIMIT = 2**31 - 1  # protobuf's 2 GB limit for a single-file ONNX model


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def cache_layout(model: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers causal LM's KV cache."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(cfg.num_hidden_layers), int(kv_heads), int(head_dim)


def past_input_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for each layer, in order."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_output_names(num_layers: int) -> list[str]:
    """``present.{i}.key``, ``present.{i}.value`` for each layer, in order."""
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def _plain_module(model: Any):
    """``input_ids, attention_mask -> logits`` with no cache: the full-recompute graph."""
    import torch

    class PlainLM(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).logits

    return PlainLM(model).eval()


def _decoder_module(model: Any):
    """The decode step with flat KV tensors in and out (what the ONNX/PTE graph exposes).

    Inputs ``input_ids (B, S)``, ``attention_mask (B, P+S)``, ``position_ids (B, S)`` and, per
    layer, ``past key, value (B, H_kv, P, D)``; outputs ``logits (B, S, V)`` and the presents
    ``(B, H_kv, P+S, D)``. Inside, the flat tensors become a transformers ``DynamicCache``,
    so the model code is exactly the one ``generate`` runs.
    """
    import torch
    from transformers import DynamicCache

    num_layers = cache_layout(model)[0]

    class DecoderWithCache(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1])
                                                 for i in range(num_layers)])
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, past_key_values=cache, use_cache=True)
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return DecoderWithCache(model).eval()


def _example_inputs(model: Any, *, batch: int = 2, seq: int = 3, past: int = 5):
    """Example tensors for export. Sizes differ from each other and from 0/1 on purpose:
    torch.export specialises a dimension that is 0 or 1, or equal to another one."""
    import torch

    num_layers, kv_heads, head_dim = cache_layout(model)
    dtype = next(model.parameters()).dtype
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, kv_heads, past, head_dim, generator=gen).to(dtype)
          for _ in range(2 * num_layers)]
    return ids, mask, pos, kv


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporter's progress lines and warnings (stderr is lesson output)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                             "onnxscript", "torch.utils._pytree", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model: Any, path: str | os.PathLike, *, with_cache: bool = True,
                opset_version: int | None = None) -> Path:
    """Export a transformers causal LM to ONNX with the dynamo exporter (lesson 06).

    ``with_cache=False``: ``input_ids (B, S), attention_mask (B, S) -> logits (B, S, V)``.
    ``with_cache=True``: the decode graph of :func:`_decoder_module`, with inputs
    ``input_ids, attention_mask, position_ids, past_key_values.{i}.key/value`` and outputs
    ``logits, present.{i}.key/value``. Batch, sequence and past length are dynamic; the first
    step passes past tensors of length 0. The file is written atomically (one ``.onnx`` file,
    weights inside; models over 2 GB would need ONNX external data and are refused).
    """
    import torch

    model = model.eval()
    ids, mask, pos, kv = _example_inputs(model)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence")
    if with_cache:
        num_layers = cache_layout(model)[0]
        past = torch.export.Dim("past_sequence")
        module = _decoder_module(model)
        args: tuple = (ids, mask, pos, kv)
        dynamic_shapes: dict = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: torch.export.Dim.DYNAMIC},
            "position_ids": {0: batch, 1: seq},
            "past": [{0: batch, 2: past} for _ in range(2 * num_layers)],
        }
        input_names = ["input_ids", "attention_mask", "position_ids",
                       *past_input_names(num_layers)]
        output_names = ["logits", *present_output_names(num_layers)]
    else:
        module = _plain_module(model)
        mask = torch.ones_like(ids)
        args = (ids, mask)
        dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        input_names, output_names = ["input_ids", "attention_mask"], ["logits"]

    with _quiet_export(), torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=input_names, output_names=output_names,
                                    opset_version=opset_version, verbose=False)
    proto = program.model_proto
    for node in proto.graph.node:  # debug info (stack traces per node): half of a tiny model's file
        del node.metadata_props[:]
        node.doc_string = ""
    if with_cache:
        # The exporter names the mask's length after an internal symbol (e.g. "s53").
        dims = next(i for i in proto.graph.input if i.name == "attention_mask")
        dims.type.tensor_type.shape.dim[1].dim_param = "total_sequence"
    data = proto.SerializeToString()
    if len(data) > _ONNX_PROTO_LIMIT:
        raise ValueError(f"the exported model is {len(data) / 2**30:.1f} GB, over protobuf's 2 GB "
                         "limit for one file; save it with ONNX external data instead")
    return atomic_write_bytes(path, data)


ORT_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
"""ONNX Runtime graph optimisation levels :func:`load_onnx_session` accepts (``all``: default)."""


def load_onnx_session(path: str | os.PathLike, threads: int | None = 1, *,
                      optimization: str = "all"):
    """An ``onnxruntime.InferenceSession`` on CPU with ``threads`` intra-op threads.

    ``threads=None`` uses every core (``os.cpu_count()``). ``optimization`` is the graph
    optimisation level (:data:`ORT_OPTIMIZATION_LEVELS`; ``"all"`` is ONNX Runtime's default,
    which fuses e.g. ``DynamicQuantizeLinear + MatMulInteger`` into one operator). A missing
    or corrupt file raises ``FileNotFoundError`` / ``ValueError`` naming the path and the fix.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}: export it first with "
                                f"utils.deploy.export_onnx(model, {str(path)!r})")
    if optimization not in ORT_OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {ORT_OPTIMIZATION_LEVELS}, "
                         f"got {optimization!r}")
    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = {"disable": level.ORT_DISABLE_ALL,
                                     "basic": level.ORT_ENABLE_BASIC,
                                     "extended": level.ORT_ENABLE_EXTENDED,
                                     "all": level.ORT_ENABLE_ALL}[optimization]
    opts.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: keep notebook stderr clean
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ValueError(f"{path} is not a readable ONNX model ({type(exc).__name__}: "
                         f"{str(exc).strip()[:200]}). It is probably truncated or corrupt: "
                         "delete it and export again with utils.deploy.export_onnx(...)") from None


def onnx_op_counts(path: str | os.PathLike) -> Counter:
    """How many nodes of each op type the ONNX graph at ``path`` has (to see what int8 changed)."""
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike, *,
                       per_channel: bool = True) -> Path:
    """Dynamic int8 quantization of an ONNX file (``onnxruntime.quantization.quantize_dynamic``).

    What it quantizes: every ``MatMul`` whose second input is a constant weight (the q, k, v,
    o, gate, up and down projections) becomes ``DynamicQuantizeLinear`` (activations, scale
    computed at run time) + ``MatMulInteger`` with int8 weights; the embedding ``Gather``
    reads an int8 table + ``DequantizeLinear``. A tied embedding/``lm_head`` matrix is stored
    once in int8 and dequantized to fp32 for the ``lm_head`` MatMul (it reaches the MatMul
    through a ``Transpose``, so it is not quantized as a MatMul weight). Attention's
    activation-by-activation matmuls, norms and softmax stay fp32 (see :func:`onnx_op_counts`).
    Weights shrink 4x, the file about 3x. ``per_channel=True`` gives each output channel its
    own scale (a little more accurate for a few bytes more). Written atomically.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX model at {src}: export it first with export_onnx")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp.onnx", dir=dst.parent)
    os.close(fd)
    try:
        with _quiet_export():  # quantize_dynamic logs "consider pre-processing" on the root logger
            quantize_dynamic(str(src), tmp, weight_type=QuantType.QInt8, per_channel=per_channel)
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dst


def quantize_onnx_4bit(src: str | os.PathLike, dst: str | os.PathLike, *, block_size: int = 32,
                       accuracy_level: int = 4) -> Path:
    """Weight-only 4-bit quantization of an ONNX file to ``MatMulNBits`` (lesson 06).

    ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` (round to
    nearest, symmetric, one fp32 scale per ``block_size`` weights along the input dimension,
    lesson 05's group-wise 4-bit) turns every ``MatMul`` with a constant weight into the
    contrib operator ``MatMulNBits``, which has a CPU kernel in ONNX Runtime.
    ``accuracy_level=4`` lets that kernel quantize the activations to int8 on the fly and use
    integer dot products (AVX-VNNI / AVX512-VNNI where the CPU has them); ``0`` keeps fp32
    activations. The tied ``lm_head`` stays fp32, as in :func:`quantize_onnx_int8`. Written
    atomically.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX model at {src}: export it first with export_onnx")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                          accuracy_level=accuracy_level, bits=4)
    with _quiet_export():  # the quantizer logs every node it rewrites
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
        quantizer.process()
    data = quantizer.model.model.SerializeToString()
    return atomic_write_bytes(dst, data)


# --------------------------------------------------------------------------------------------
# Greedy decoding in ONNX Runtime
# --------------------------------------------------------------------------------------------

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64}


def _as_ids(input_ids: Any) -> np.ndarray:
    """(B, T) int64 array from a list, NumPy array or torch tensor."""
    if hasattr(input_ids, "detach"):
        input_ids = input_ids.detach().cpu().numpy()
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, tokens) with at least one token, "
                         f"got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    return ids.astype(np.int64)


def _eos_set(eos_token_id: int | Sequence[int] | None) -> np.ndarray | None:
    if eos_token_id is None:
        return None
    return np.atleast_1d(np.asarray(eos_token_id, dtype=np.int64))


def _pick(logits_last: np.ndarray, finished: np.ndarray, eos: np.ndarray | None,
          pad: int | None) -> np.ndarray:
    """Greedy next tokens; rows already finished get the pad token, as ``generate`` does."""
    nxt = logits_last.argmax(-1).astype(np.int64)  # (B,)
    if eos is not None:
        nxt = np.where(finished, pad, nxt)
    return nxt


def empty_past(session: Any, batch: int) -> dict[str, np.ndarray]:
    """Length-0 past key/value arrays for the first (prefill) step of a decode graph."""
    past = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = inp.shape
            past[inp.name] = np.zeros((batch, kv_heads, 0, head_dim),
                                      dtype=_ORT_FLOAT.get(inp.type, np.float32))
    return past


def ort_generate(session: Any, input_ids: Any, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, *,
                 attention_mask: Any = None, pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding with the KV cache in ONNX Runtime (lesson 06); returns ``(B, T + n)``.

    Step 0 (prefill) feeds the whole prompt with empty past tensors; every later step feeds
    only the new token, ``position_ids`` = its absolute position, an ``attention_mask`` that
    covers past + new tokens, and the previous step's ``present.*`` as ``past_key_values.*``.
    Each step therefore costs one token's work instead of the whole sequence's. Left-padded
    prompts work with ``attention_mask`` (positions count real tokens only, as in
    ``generate``). Stops when every row has produced ``eos_token_id``; finished rows are
    padded with ``pad_token_id`` (default: the eos token), exactly like ``generate``.
    """
    ids = _as_ids(input_ids)
    batch = ids.shape[0]
    names = [o.name for o in session.get_outputs()]
    presents = [n for n in names if n.startswith("present.")]
    if not presents:
        raise ValueError("this session has no present.* outputs: it is a plain graph; use "
                         "ort_generate_full, or export with export_onnx(..., with_cache=True)")
    mask = (np.ones_like(ids) if attention_mask is None else _as_ids(attention_mask))
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids {ids.shape}")
    position_ids = np.maximum(mask.cumsum(-1) - 1, 0)
    position_ids = np.where(mask == 0, 1, position_ids)  # as generate does for padding
    past = empty_past(session, batch)
    eos = _eos_set(eos_token_id)
    pad = int(eos[0]) if pad_token_id is None and eos is not None else pad_token_id
    finished = np.zeros(batch, dtype=bool)
    feed_ids, new_tokens = ids, []
    for _ in range(max_new_tokens):
        outputs = session.run(None, {"input_ids": feed_ids, "attention_mask": mask,
                                     "position_ids": position_ids, **past})
        logits = outputs[0]  # (B, S, V)
        nxt = _pick(logits[:, -1], finished, eos, pad)  # (B,)
        new_tokens.append(nxt)
        if eos is not None:
            finished |= np.isin(nxt, eos)
            if finished.all():
                break
        past = {p.replace("present.", "past_key_values."): outputs[names.index(p)]
                for p in presents}
        feed_ids = nxt[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        position_ids = mask.sum(-1, keepdims=True) - 1  # (B, 1): the new token's position
    if not new_tokens:
        return ids
    return np.concatenate([ids, np.stack(new_tokens, axis=1)], axis=1)


def ort_generate_full(session: Any, input_ids: Any, max_new_tokens: int,
                      eos_token_id: int | Sequence[int] | None = None, *,
                      pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding that recomputes the whole sequence every step (no cache), for comparison.

    Step t costs O(T + t) tokens of work, so n tokens cost O(n^2) in total: that is what the
    KV cache saves. Works with the plain graph and with a decode graph (fed an empty past).
    Prompts in a batch must have the same length (no padding).
    """
    ids = _as_ids(input_ids)
    batch = ids.shape[0]
    input_names = {i.name for i in session.get_inputs()}
    eos = _eos_set(eos_token_id)
    pad = int(eos[0]) if pad_token_id is None and eos is not None else pad_token_id
    finished = np.zeros(batch, dtype=bool)
    seq = ids
    for _ in range(max_new_tokens):
        feed = {"input_ids": seq, "attention_mask": np.ones_like(seq)}
        if "position_ids" in input_names:
            feed["position_ids"] = np.broadcast_to(np.arange(seq.shape[1]), seq.shape).copy()
            feed.update(empty_past(session, batch))
        logits = session.run(["logits"], feed)[0]  # (B, S, V)
        nxt = _pick(logits[:, -1], finished, eos, pad)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        if eos is not None:
            finished |= np.isin(nxt, eos)
            if finished.all():
                break
    return seq


def ort_generate_stream(session: Any, input_ids: Any, max_new_tokens: int,
                        eos_token_id: int | Sequence[int] | None = None) -> Iterator[int]:
    """Yield greedy tokens one at a time from a decode graph (batch 1), for a chat box (lesson 06).

    The same steps as :func:`ort_generate` (prefill, then one token per call with the cache),
    but each token is handed out as soon as it exists, so a UI can print it before the next
    one is computed. Stops after ``eos_token_id`` (which is yielded) or ``max_new_tokens``.
    """
    ids = _as_ids(input_ids)
    if ids.shape[0] != 1:
        raise ValueError(
            f"ort_generate_stream streams one prompt (batch 1), got batch {ids.shape[0]}"
        )
    names = [o.name for o in session.get_outputs()]
    presents = [n for n in names if n.startswith("present.")]
    if not presents:
        raise ValueError("this session has no present.* outputs: export it with "
                         "export_onnx(..., with_cache=True)")
    eos = _eos_set(eos_token_id)
    past, feed = empty_past(session, 1), ids
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]  # (1, T)
    total = ids.shape[1]
    for _ in range(max_new_tokens):
        outputs = session.run(None, {"input_ids": feed, "attention_mask":
                                     np.ones((1, total), dtype=np.int64),
                                     "position_ids": pos, **past})
        nxt = int(outputs[0][0, -1].argmax())
        yield nxt
        if eos is not None and nxt in eos:
            return
        past = {p.replace("present.", "past_key_values."): outputs[names.index(p)]
                for p in presents}
        feed = np.array([[nxt]], dtype=np.int64)
        pos = np.array([[total]], dtype=np.int64)
        total += 1


def ort_logits(session: Any, input_ids: Any) -> np.ndarray:
    """Logits ``(B, T, V)`` of a prompt from either graph (no padding)."""
    ids = _as_ids(input_ids)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "position_ids" in {i.name for i in session.get_inputs()}:
        feed["position_ids"] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        feed.update(empty_past(session, ids.shape[0]))
    return session.run(["logits"], feed)[0]


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------

def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def max_abs_logit_diff(logits_a: Any, logits_b: Any) -> float:
    """Largest absolute difference between two logit arrays of the same shape."""
    a, b = _np(logits_a).astype(np.float64), _np(logits_b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b)))


def greedy_agreement(tokens_a: Any, tokens_b: Any) -> float:
    """Share of positions where two token sequences agree (1.0 = identical).

    Accepts ``(T,)`` or ``(B, T)``. When one run stopped earlier (eos), the positions only the
    longer one has count as disagreements. Compare generated tokens (free-running: one flip
    changes everything after it) or argmaxes of logits on the same input (teacher-forced).
    """
    a, b = np.atleast_2d(_np(tokens_a)), np.atleast_2d(_np(tokens_b))
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} vs {b.shape[0]}")
    length = max(a.shape[1], b.shape[1])
    if length == 0:
        raise ValueError("both token sequences are empty")
    n = min(a.shape[1], b.shape[1])
    return float((a[:, :n] == b[:, :n]).sum() / (a.shape[0] * length))


def reference_outputs(model: Any, input_ids: Any, max_new_tokens: int) -> dict[str, np.ndarray]:
    """PyTorch fp32 prompt logits ``(B, T, V)`` and greedy tokens ``(B, n)`` to compare against."""
    import torch

    ids = torch.as_tensor(_as_ids(input_ids))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        logits, past = out.logits, out.past_key_values
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(max_new_tokens - 1):  # plain argmax, no eos: what every runtime does
            out = model(input_ids=tokens[-1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return {"logits": logits.float().numpy(), "tokens": torch.cat(tokens, 1).numpy()}


def reference_generations(model: Any, prompts: Sequence[Any], max_new_tokens: int,
                          eos_token_id: int | Sequence[int] | None = None) -> list[dict]:
    """PyTorch fp32 references for :func:`parity_report`, one dict per prompt (lesson 06).

    Each holds ``input_ids (1, T)``, the prompt's ``logits (1, T, V)`` and ``tokens``: the
    greedy continuation of ``model.generate(do_sample=False)`` (stops after eos, like a chat).
    """
    import torch

    refs = []
    for prompt in prompts:
        ids = torch.as_tensor(_as_ids(prompt))
        if ids.shape[0] != 1:
            raise ValueError(f"each prompt is one sequence (batch 1), got batch {ids.shape[0]}")
        pad = eos_token_id if isinstance(eos_token_id, int) else 0
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().numpy()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                 pad_token_id=pad).numpy()
        refs.append({"input_ids": ids.numpy(), "logits": logits,
                     "tokens": out[:, ids.shape[1]:]})
    return refs


def parity_report(references: Sequence[dict], logits_fn: Any, generate_fn: Any,
                  max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None
                  ) -> dict[str, float]:
    """Compare one runtime with the PyTorch references of :func:`reference_generations`.

    ``logits_fn(ids) -> (1, T, V)`` and ``generate_fn(ids, max_new_tokens, eos_token_id) ->
    (1, T + n)`` run the runtime on a ``(1, T)`` int64 prompt. Returns ``max_abs_logit_diff``
    (largest over every prompt), ``greedy_agreement`` (generated tokens equal to the
    reference's, pooled over prompts; a run that stops early or late counts the extra
    positions as misses) and ``exact_share`` (prompts whose whole continuation is identical).
    """
    if not references:
        raise ValueError("no references: build them with reference_generations(model, prompts, n)")
    diff, agree, total, exact = 0.0, 0.0, 0, 0
    for ref in references:
        ids = ref["input_ids"]
        diff = max(diff, max_abs_logit_diff(logits_fn(ids), ref["logits"]))
        got = np.asarray(generate_fn(ids, max_new_tokens, eos_token_id))[:, ids.shape[1]:]
        want = ref["tokens"]
        length = max(got.shape[1], want.shape[1])
        agree += greedy_agreement(got, want) * length
        total += length
        exact += int(got.shape == want.shape and np.array_equal(got, want))
    return {"max_abs_logit_diff": diff, "greedy_agreement": agree / total,
            "exact_share": exact / len(references)}


# --------------------------------------------------------------------------------------------
# ExecuTorch (optional `mobile` extra)
# --------------------------------------------------------------------------------------------

def executorch_available() -> bool:
    """True when the optional ``executorch`` package (``pip install .[mobile]``) imports."""
    try:
        with _stderr_to_devnull():  # loading its C++ runtime logs cpuinfo probes on fd 2
            import executorch.runtime  # noqa: F401
    except ImportError:
        return False
    return True


def _require_executorch() -> None:
    if not executorch_available():
        raise ImportError("ExecuTorch is not installed: it is the optional `mobile` extra. "
                          "Install it with `.venv/bin/pip install executorch==1.5.1` "
                          "(it keeps torch 2.13.0).")


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Silence chatter written to stderr: straight to file descriptor 2 (C++ libraries) and
    through ``sys.stderr`` (ExecuTorch's pybindings route its runtime log there in Jupyter)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def export_executorch(model: Any, path: str | os.PathLike, *, max_seq_len: int = 128) -> Path:
    """Export the decode graph to an ExecuTorch ``.pte`` file, delegated to XNNPACK (lesson 06).

    Same inputs and outputs as the ONNX decode graph (flat past/present tensors), batch 1,
    past + new tokens up to ``max_seq_len``. ``torch.export`` -> ``to_edge_transform_and_lower``
    with the XNNPACK partitioner -> ``to_executorch``; written atomically.
    """
    _require_executorch()
    import torch

    with _stderr_to_devnull():  # importing the XNNPACK backend probes the CPU, logging on fd 2
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    model = model.eval()
    num_layers = cache_layout(model)[0]
    ids, mask, pos, kv = _example_inputs(model, batch=1)
    seq = torch.export.Dim("sequence", min=1, max=max_seq_len)
    past = torch.export.Dim("past_sequence", min=0, max=max_seq_len)
    dynamic_shapes = {"input_ids": {1: seq}, "attention_mask": {1: torch.export.Dim.DYNAMIC},
                      "position_ids": {1: seq}, "past": [{2: past} for _ in range(2 * num_layers)]}
    # _stderr_to_devnull: XNNPACK's cpuinfo writes probing chatter straight to fd 2
    with _quiet_export(), torch.no_grad(), _stderr_to_devnull():
        exported = torch.export.export(_decoder_module(model), (ids, mask, pos, kv),
                                       dynamic_shapes=dynamic_shapes, strict=False)
        program = to_edge_transform_and_lower(exported,
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
    return atomic_write_bytes(path, program.buffer)


EXECUTORCH_CACHE_VERSION = "1"  # bump when export_executorch's graph changes


_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
                "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias")


def _model_fingerprint(model: Any) -> str:
    """sha256 of a model's architecture fields and every tensor's name, dtype, shape and bytes.

    Only fields that change the computation count: the full config also holds run-time
    settings that ``generate`` and the exporters change (``use_cache``, attention backend),
    which must not change the key.
    """
    import hashlib

    import torch

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    arch = {k: getattr(cfg, k, None) for k in _ARCH_FIELDS}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_executorch(model: Any, *, max_seq_len: int = 128,
                      cache: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The model's ``.pte`` from the course cache, exported on first use (lesson 06).

    Lowering to XNNPACK takes tens of seconds, so the program is kept in
    ``cache_dir()/deploy/executorch-<key>/model.pte``, keyed by the model's weights and
    config, ``max_seq_len``, the torch and executorch versions and
    :data:`EXECUTORCH_CACHE_VERSION`, with a manifest holding its sha256: a corrupt or
    truncated file is exported again. Returns ``(path, built)``; ``built`` is True when this
    call ran the export.
    """
    import hashlib
    from importlib.metadata import version

    import torch

    from utils.paths import cache_dir

    _require_executorch()
    key = hashlib.sha256("|".join([_model_fingerprint(model), str(max_seq_len),
                                   torch.__version__, version("executorch"),
                                   EXECUTORCH_CACHE_VERSION]).encode()).hexdigest()[:16]
    folder = Path(cache or cache_dir()) / "deploy" / f"executorch-{key}"
    path, manifest = folder / "model.pte", folder / "manifest.json"
    if path.is_file() and manifest.is_file():
        try:
            want = json.loads(manifest.read_text())["sha256"]
        except (ValueError, KeyError):
            want = None
        if want == hashlib.sha256(path.read_bytes()).hexdigest():
            return path, False
    export_executorch(model, path, max_seq_len=max_seq_len)
    atomic_write_json(manifest, {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                 "max_seq_len": max_seq_len, "torch": torch.__version__,
                                 "executorch": version("executorch"),
                                 "version": EXECUTORCH_CACHE_VERSION})
    return path, True


class ExecuTorchLM:
    """A loaded ``.pte`` decode graph with the same greedy loop as :func:`ort_generate`."""

    def __init__(self, path: str | os.PathLike) -> None:
        _require_executorch()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ExecuTorch program at {path}: export it first with "
                                    f"utils.deploy.export_executorch(model, {str(path)!r})")
        with _stderr_to_devnull():  # the runtime and XNNPACK's cpuinfo log to fd 2
            from executorch.runtime import Runtime

            runtime = Runtime.get()
            try:
                self._program = runtime.load_program(str(path))
                self._method = self._program.load_method("forward")
            except Exception as exc:  # executorch raises RuntimeError/ValueError variants
                raise ValueError(f"{path} is not a readable ExecuTorch program ({exc}). It is "
                                 "probably truncated or corrupt: delete it and export again "
                                 "with utils.deploy.export_executorch(...)") from None
        meta = self._method.metadata
        self.num_inputs = meta.num_inputs()
        self.past_shapes = [tuple(meta.input_tensor_meta(i).sizes())
                            for i in range(3, self.num_inputs)]
        self.max_seq_len = int(self.past_shapes[0][2])  # the upper bound set at export

    @staticmethod
    def _set_threads(threads: int | None) -> None:
        """Size ExecuTorch's process-wide XNNPACK thread pool (``None``: every core).

        Only in a fresh process, before any program runs: the pool is shared with PyTorch,
        and resizing it after PyTorch or XNNPACK used it hangs or crashes (measured with
        torch 2.13 and executorch 1.5.1). :func:`benchmark_runtime` calls it in its own
        process, one process per thread count.
        """
        from executorch.extension.pybindings import portable_lib

        with _stderr_to_devnull():  # it logs "Resetting threadpool" on fd 2
            portable_lib._unsafe_reset_threadpool(int(threads or os.cpu_count() or 1))

    def step(self, input_ids, attention_mask, position_ids, past):
        """One call of the decode graph: torch tensors in, ``(logits, presents)`` out."""
        out = self._method.execute([input_ids, attention_mask, position_ids, *past])
        return out[0], list(out[1:])

    def _empty_past(self):
        import torch

        return [torch.zeros(1, s[1], 0, s[3]) for s in self.past_shapes]

    def logits(self, input_ids: Any) -> np.ndarray:
        """Logits ``(1, T, V)`` of a prompt."""
        import torch

        ids = torch.as_tensor(_as_ids(input_ids))
        n = ids.shape[1]
        logits, _ = self.step(ids, torch.ones_like(ids), torch.arange(n)[None], self._empty_past())
        return logits.numpy()

    def generate(self, input_ids: Any, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None) -> np.ndarray:
        """Greedy decoding with the cache (batch 1); returns ``(1, T + n)``."""
        import torch

        ids = _as_ids(input_ids)
        if ids.shape[0] != 1:
            raise ValueError(f"the ExecuTorch program is exported for batch 1, got {ids.shape[0]}")
        if ids.shape[1] + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"the program's max_seq_len {self.max_seq_len}: export again with "
                             "export_executorch(..., max_seq_len=...) or generate fewer tokens")
        eos = _eos_set(eos_token_id)
        feed, past, n, new = torch.as_tensor(ids), self._empty_past(), ids.shape[1], []
        pos = torch.arange(n)[None]
        for _ in range(max_new_tokens):
            logits, past = self.step(feed, torch.ones(1, n, dtype=torch.long), pos, past)
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            if eos is not None and nxt in eos:
                break
            feed, pos, n = torch.tensor([[nxt]]), torch.tensor([[n]]), n + 1
        return np.concatenate([ids, np.asarray([new], dtype=np.int64)], axis=1) if new else ids


# --------------------------------------------------------------------------------------------
# The physical limit: memory bandwidth
# --------------------------------------------------------------------------------------------

def memory_bandwidth_gbps(size_mb: float = 256, repeats: int = 5, threads: int = 1) -> float:
    """Measured memory bandwidth in GB/s (1 GB = 1e9 bytes): best of ``repeats`` array copies.

    A copy of ``size_mb`` MB reads it once and writes it once, so it moves ``2 * size`` bytes
    (the STREAM "copy" convention). ``size_mb`` must be far larger than the CPU's last-level
    cache (tens of MB), or this measures the cache instead. ``threads > 1`` copies disjoint
    chunks in parallel (NumPy releases the GIL), which is what several cores can pull.
    """
    if size_mb <= 0 or repeats < 1 or threads < 1:
        raise ValueError("size_mb must be > 0, repeats >= 1 and threads >= 1")
    n = int(size_mb * 1e6) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page once so page faults are not timed
    bounds = np.linspace(0, n, threads + 1).astype(int)
    chunks = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    best = float("inf")
    if threads == 1:
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - t0)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(lambda c: np.copyto(c[0], c[1]), chunks))
                best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def weight_bytes(num_params: int, bits: float) -> float:
    """Bytes to store ``num_params`` weights at ``bits`` bits each (8 bits per byte)."""
    return num_params * bits / 8


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int, *,
                   batch: int = 1, bytes_per_value: int = 4) -> int:
    """Bytes of a KV cache: a key and a value vector per layer, KV head and token."""
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch * bytes_per_value


def bandwidth_bound_tokens_per_s(bandwidth_gbps: float, bytes_per_token: float) -> float:
    """Upper bound on decode speed: tokens/s <= bandwidth / bytes read per token (lesson 06).

    Why decode is memory-bound: at batch 1 each new token multiplies one vector by every
    weight matrix, so every weight is read from memory once per token and used for just 2
    FLOPs (a multiply and an add). At 4 bytes per fp32 weight that is 0.5 FLOP per byte, far
    below what a CPU core can compute per byte it loads (tens of FLOPs), so the arithmetic
    waits on memory: time per token >= (weight bytes + KV cache bytes) / bandwidth. That is
    why int8 and 4-bit weights speed decoding up (fewer bytes per token), while prefill,
    which reuses each weight for every prompt token, is compute-bound. A model small enough
    to sit in the CPU cache (a few MB) is not limited by DRAM bandwidth at all: there the
    per-operator overhead dominates and this bound is far above what you measure.
    ``bandwidth_gbps`` is in GB/s with 1 GB = 1e9 bytes.
    """
    if bandwidth_gbps <= 0 or bytes_per_token <= 0:
        raise ValueError("bandwidth_gbps and bytes_per_token must be positive")
    return bandwidth_gbps * 1e9 / bytes_per_token


# --------------------------------------------------------------------------------------------
# Benchmark, one fresh process per runtime
# --------------------------------------------------------------------------------------------

def file_bytes(path: str | os.PathLike) -> int:
    """Size on disk of a model file, or of every file in a model folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    On Linux, ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` would not do, because the
    kernel carries the parent's peak over ``fork``/``exec`` (a child of a notebook holding
    PyTorch would report the notebook's memory). Elsewhere ``ru_maxrss`` (bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB -> MiB
    import resource  # Unix only; imported here so that importing this module works anywhere

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class _TorchRunner:
    def __init__(self, path: Path, int8: bool) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from utils.quiet import silence_library_noise

        silence_library_noise()
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        if int8:  # lesson 05's quantize_dynamic_int8: every Linear but the tied lm_head
            from utils.quantize import quantize_dynamic_int8

            self.model = quantize_dynamic_int8(self.model)
            self.bytes = _state_dict_bytes(self.model.state_dict())
        else:
            self.bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))

    def set_threads(self, threads: int) -> None:
        self.torch.set_num_threads(threads)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.as_tensor(ids)).logits.float().numpy()

    def generate(self, ids: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=torch.as_tensor(ids), use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            tokens, past = [nxt], out.past_key_values
            for _ in range(n - 1):
                out = self.model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
            t2 = time.perf_counter()
        return torch.cat(tokens, 1).numpy(), t1 - t0, t2 - t1


def _state_dict_bytes(state: Any, _seen: set | None = None) -> int:
    """Bytes of every tensor in a (possibly quantized) state dict, int8 weights at 1 byte."""
    import torch

    total = 0
    seen = set() if _seen is None else _seen  # tied weights (embedding = lm_head) count once
    for value in state.values() if isinstance(state, dict) else state:
        if isinstance(value, (tuple, list)):
            total += _state_dict_bytes(value, seen)
        elif isinstance(value, torch.Tensor):
            if not value.is_quantized:
                if value.data_ptr() in seen:
                    continue
                seen.add(value.data_ptr())
            if value.is_quantized:
                total += value.int_repr().numel() * value.element_size()
                if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                    total += value.q_per_channel_scales().numel() * 4 * 2
                else:
                    total += 8
            else:
                total += value.numel() * value.element_size()
    return total


class _OrtRunner:
    def __init__(self, path: Path, optimization: str = "all") -> None:
        self.path, self.optimization = path, optimization
        self.bytes = file_bytes(path)
        self.sessions: dict[int, Any] = {}
        self.session = self._session(1)

    def _session(self, threads: int):
        if threads not in self.sessions:
            self.sessions[threads] = load_onnx_session(self.path, threads=threads,
                                                       optimization=self.optimization)
        return self.sessions[threads]

    def set_threads(self, threads: int) -> None:
        self.session = self._session(threads)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return ort_logits(self.session, ids)

    def generate(self, ids: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
        # The loop of ort_generate, timed: the first token needs the prefill, the rest decode.
        times: list[float] = []
        session = self.session

        class Timed:
            def get_inputs(self):
                return session.get_inputs()

            def get_outputs(self):
                return session.get_outputs()

            def run(self, names, feed):
                out = session.run(names, feed)
                times.append(time.perf_counter())
                return out

        t0 = time.perf_counter()
        out = ort_generate(Timed(), ids, n)
        return out[:, ids.shape[1]:], times[0] - t0, times[-1] - times[0]


class _ExecuTorchRunner:
    """One thread count per process: the pool is sized once, before the program loads
    (resizing it after XNNPACK ran crashes, measured with executorch 1.5.1)."""

    def __init__(self, path: Path, threads: int) -> None:
        ExecuTorchLM._set_threads(threads)
        self.threads = threads
        self.lm = ExecuTorchLM(path)
        self.bytes = file_bytes(path)

    def set_threads(self, threads: int) -> None:
        if threads != self.threads:
            raise RuntimeError("an ExecuTorch benchmark process runs one thread count")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.lm.logits(ids)

    def generate(self, ids: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
        times: list[float] = []
        step = self.lm.step

        def timed(*args):
            out = step(*args)
            times.append(time.perf_counter())
            return out

        self.lm.step = timed
        try:
            t0 = time.perf_counter()
            out = self.lm.generate(ids, n)
        finally:
            self.lm.step = step
        return out[:, ids.shape[1]:], times[0] - t0, times[-1] - times[0]


def _bench_worker(spec_path: str) -> None:
    """Body of the benchmark subprocess: load one runtime, time it, write JSON + arrays."""
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out_dir"])
    ids = np.load(out_dir / "input_ids.npy")
    path, runtime, thread_counts = Path(spec["path"]), spec["runtime"], spec["threads"]
    if runtime in ("pytorch", "pytorch-int8"):
        runner: Any = _TorchRunner(path, int8=runtime == "pytorch-int8")
    elif runtime == "onnxruntime":
        runner = _OrtRunner(path, spec.get("optimization", "all"))
    else:
        runner = _ExecuTorchRunner(path, thread_counts[0])
    result: dict[str, Any] = {"bytes": int(runner.bytes)}
    n, repeats = int(spec["max_new_tokens"]), int(spec["repeats"])
    for threads in thread_counts:
        runner.set_threads(threads)
        runner.generate(ids, n)  # warm-up: first calls allocate memory and pick kernels
        ttft, speed, loads = [], [], []
        for _ in range(repeats):
            tokens, prefill_s, decode_s = runner.generate(ids, n)
            ttft.append(prefill_s * 1e3)
            speed.append((n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan"))
            loads.append(list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
        # Best of the repeats: the least disturbed run (timeit's advice on a shared machine).
        result[f"time_to_first_token_ms_{threads}"] = float(np.min(ttft))
        result[f"tokens_per_s_{threads}"] = float(np.max(speed))
        result[f"tokens_per_s_runs_{threads}"] = [float(v) for v in speed]
        result[f"loadavg_{threads}"] = loads
    np.save(out_dir / "logits.npy", runner.logits(ids))
    np.save(out_dir / "tokens.npy", np.asarray(tokens, dtype=np.int64))
    result["peak_rss_mb"] = _peak_rss_mb()
    atomic_write_json(out_dir / "result.json", result)


def _run_bench_child(name: str, runtime: str, path: Path, ids: np.ndarray, threads: list[int],
                     max_new_tokens: int, repeats: int, timeout_s: float,
                     optimization: str = "all") -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Run ``python -m utils.deploy --bench`` once; its JSON result, logits and tokens."""
    from utils.paths import repo_root

    with tempfile.TemporaryDirectory(prefix="dd_bench_") as tmp:
        out_dir = Path(tmp)
        np.save(out_dir / "input_ids.npy", ids)
        spec = {"runtime": runtime, "path": str(path.resolve()), "out_dir": str(out_dir),
                "max_new_tokens": int(max_new_tokens), "repeats": int(repeats),
                "threads": threads, "optimization": optimization}
        atomic_write_json(out_dir / "spec.json", spec)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(repo_root()), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        proc = subprocess.run([sys.executable, "-m", "utils.deploy", "--bench",
                               str(out_dir / "spec.json")], capture_output=True, text=True,
                              env=env, cwd=str(repo_root()), timeout=timeout_s)
        if proc.returncode != 0 or not (out_dir / "result.json").is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"benchmark of {name} ({runtime}) failed with exit code "
                               f"{proc.returncode}:\n{tail}")
        result = json.loads((out_dir / "result.json").read_text())
        return result, np.load(out_dir / "logits.npy"), np.load(out_dir / "tokens.npy")


def benchmark_runtime(name: str, runtime: str, path: str | os.PathLike, input_ids: Any, *,
                      max_new_tokens: int = 32, reference: dict[str, Any] | None = None,
                      repeats: int = 3, timeout_s: float = 600,
                      optimization: str = "all") -> dict[str, Any]:
    """Measure one runtime in a fresh Python process, so its memory is its own (lesson 06).

    ``runtime``: ``"pytorch"`` or ``"pytorch-int8"`` (``path``: a ``save_pretrained`` folder;
    int8 = lesson 05's ``utils.quantize.quantize_dynamic_int8`` on load), ``"onnxruntime"`` (an ONNX
    decode graph, fp32 or int8) or ``"executorch"`` (a ``.pte`` from
    :func:`export_executorch`). The child generates ``max_new_tokens`` greedy tokens (no eos,
    so every runtime does the same work), batch 1, with 1 thread and with every core, and
    reports the best of ``repeats`` runs after a warm-up. ``reference`` (from
    :func:`reference_outputs`) adds parity with PyTorch fp32.

    Returns ``name, runtime, bytes`` (file size; in-memory weights for pytorch-int8, which
    has no file), ``time_to_first_token_ms`` (prefill + first token, 1 thread),
    ``tokens_per_s_1thread``, ``tokens_per_s_all`` (decode steps after the first token),
    ``peak_rss_mb`` (the child's peak resident memory: interpreter + runtime + model),
    ``tokens_per_s_runs_1thread`` / ``tokens_per_s_runs_all`` (every timed run, for a median)
    with ``loadavg_1thread`` / ``loadavg_all`` (``os.getloadavg()`` after each run),
    ``max_abs_logit_diff`` (prompt logits) and ``greedy_agreement`` (generated tokens), and
    ``top1_agreement`` (argmax of the prompt logits; teacher-forced, so one flip does not
    derail the rest). ExecuTorch runs one process per thread count (its pool is sized once);
    its Python runtime loads PyTorch, so its peak memory is not what the C++ runtime on a
    phone would use. ``optimization``: ONNX Runtime's graph optimisation level. Timings on a
    shared machine are noisy: compare within one run.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if optimization not in ORT_OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {ORT_OPTIMIZATION_LEVELS}, "
                         f"got {optimization!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path} for runtime {runtime!r}")
    ids = _as_ids(input_ids)
    if ids.shape[0] != 1:
        raise ValueError(f"benchmark_runtime measures batch 1; got batch {ids.shape[0]}")
    every = os.cpu_count() or 1
    # ExecuTorch sizes its thread pool once per process, so it gets one process per count.
    groups = [[1], [every]] if runtime == "executorch" else [[1, every]]
    child: dict[str, Any] = {}
    for threads in groups:
        part, logits, tokens = _run_bench_child(name, runtime, path, ids, threads,
                                                max_new_tokens, repeats, timeout_s,
                                                optimization)
        peak = max(child.get("peak_rss_mb", 0.0), part["peak_rss_mb"])
        child = {**part, **child, "peak_rss_mb": peak}  # the first child's arrays are kept
        if threads == groups[0]:
            first_logits, first_tokens = logits, tokens
    logits, tokens = first_logits, first_tokens
    result: dict[str, Any] = {
        "name": name,
        "runtime": runtime,
        "bytes": child["bytes"],
        "time_to_first_token_ms": child["time_to_first_token_ms_1"],
        "time_to_first_token_ms_all": child[f"time_to_first_token_ms_{every}"],
        "tokens_per_s_1thread": child["tokens_per_s_1"],
        "tokens_per_s_all": child[f"tokens_per_s_{every}"],
        # every timed run (the best of them is above) and os.getloadavg() after each run
        "tokens_per_s_runs_1thread": child["tokens_per_s_runs_1"],
        "tokens_per_s_runs_all": child[f"tokens_per_s_runs_{every}"],
        "loadavg_1thread": child["loadavg_1"],
        "loadavg_all": child[f"loadavg_{every}"],
        "peak_rss_mb": child["peak_rss_mb"],
        "max_abs_logit_diff": None,
        "greedy_agreement": None,
        "top1_agreement": None,
    }
    if reference is not None:
        ref_logits = np.asarray(reference["logits"])
        result["max_abs_logit_diff"] = max_abs_logit_diff(logits, ref_logits)
        result["greedy_agreement"] = greedy_agreement(tokens, reference["tokens"])
        result["top1_agreement"] = greedy_agreement(logits.argmax(-1), ref_logits.argmax(-1))
    return result


# --------------------------------------------------------------------------------------------
# Where quantization buys speed: the scaling grid (scripts/bench_scaling.py, lesson 06)
# --------------------------------------------------------------------------------------------

SCALING_VOCAB = 768  # the course tokenizer's vocabulary (the teacher's)
SCALING_HEAD_DIM = 64


def scaled_model_config(hidden_size: int, num_layers: int):
    """The course's Llama shape scaled to ``hidden_size`` x ``num_layers`` (lesson 06's grid).

    Head size 64 (``hidden_size / 64`` heads, no grouped-query attention), Llama's MLP width
    of about 8/3 x hidden, the course tokenizer's 768-token vocabulary, tied embeddings: about
    ``12 * hidden_size**2 * num_layers`` parameters. A ``utils.models.ModelConfig``.
    """
    from utils.models import ModelConfig

    if hidden_size % SCALING_HEAD_DIM or num_layers < 1:
        raise ValueError(f"hidden_size must be a multiple of {SCALING_HEAD_DIM} and num_layers "
                         f">= 1, got {hidden_size} x {num_layers}")
    return ModelConfig(vocab_size=SCALING_VOCAB, hidden_size=hidden_size, num_layers=num_layers,
                       num_heads=hidden_size // SCALING_HEAD_DIM, max_position_embeddings=256,
                       architecture="llama", tie_word_embeddings=True)


SCALING_ROW_KEYS = ("size", "num_parameters", "runtime", "precision", "threads", "bytes",
                    "tokens_per_s", "tokens_per_s_runs", "bandwidth_gbps",
                    "bandwidth_bound_tokens_per_s", "share_of_bound", "loadavg")
"""Fields of every row of ``results/06_scaling.json``'s ``rows``."""


def validate_scaling(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a scaling result, after checking its schema and that every number is sane.

    Every row has :data:`SCALING_ROW_KEYS`; speeds, bytes, bandwidths and bounds are positive
    and finite; ``tokens_per_s`` is the median of ``tokens_per_s_runs``; ``share_of_bound`` is
    ``tokens_per_s / bandwidth_bound_tokens_per_s``; each (size, runtime, precision, threads)
    appears once. Anything else raises ``ValueError`` naming the row and the field, and the fix
    (run ``scripts/bench_scaling.py`` again).
    """
    fix = "regenerate it with `.venv/bin/python scripts/bench_scaling.py`"
    rows = result.get("rows") if isinstance(result, dict) else None
    if not rows:
        raise ValueError(f"the scaling result has no rows: {fix}")
    seen = set()
    for i, row in enumerate(rows):
        missing = [k for k in SCALING_ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"scaling row {i} lacks {missing}: {fix}")
        for key in ("num_parameters", "bytes", "tokens_per_s", "bandwidth_gbps",
                    "bandwidth_bound_tokens_per_s", "share_of_bound", "threads"):
            value = row[key]
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"scaling row {i} ({row['size']}, {row['runtime']} "
                                 f"{row['precision']}): {key} = {value!r} is not a positive "
                                 f"finite number: {fix}")
        runs = np.asarray(row["tokens_per_s_runs"], dtype=float)
        if runs.size == 0 or not np.all(np.isfinite(runs)) or np.any(runs <= 0):
            raise ValueError(f"scaling row {i}: tokens_per_s_runs must be positive: {fix}")
        if not math.isclose(row["tokens_per_s"], float(np.median(runs)), rel_tol=1e-9):
            raise ValueError(f"scaling row {i}: tokens_per_s is not the median of its runs: {fix}")
        share = row["tokens_per_s"] / row["bandwidth_bound_tokens_per_s"]
        if not math.isclose(row["share_of_bound"], share, rel_tol=1e-6):
            raise ValueError(f"scaling row {i}: share_of_bound != tokens_per_s / bound: {fix}")
        key = (row["size"], row["runtime"], row["precision"], row["threads"])
        if key in seen:
            raise ValueError(f"scaling row {i} repeats {key}: {fix}")
        seen.add(key)
    return rows


def scaling_speedups(rows: Sequence[dict[str, Any]], runtime: str, *, threads: int,
                     base: str = "fp32", other: str = "int8") -> list[tuple[int, float]]:
    """``(num_parameters, tokens/s of other / tokens/s of base)`` per size, smallest first,
    for one runtime and thread count: like with like (same runtime, precisions compared)."""
    speed = {(r["num_parameters"], r["precision"]): r["tokens_per_s"] for r in rows
             if r["runtime"] == runtime and r["threads"] == threads}
    sizes = sorted({n for n, p in speed if p == base} & {n for n, p in speed if p == other})
    return [(n, speed[(n, other)] / speed[(n, base)]) for n in sizes]


def speed_crossover(rows: Sequence[dict[str, Any]], runtime: str, *, threads: int,
                    base: str = "fp32", other: str = "int8") -> int | None:
    """Smallest measured size (parameters) from which ``other`` decodes faster than ``base``
    at this size and every larger one, inside one runtime; ``None`` if it never does."""
    ratios = scaling_speedups(rows, runtime, threads=threads, base=base, other=other)
    crossing = None
    for n, ratio in reversed(ratios):
        if ratio <= 1.0:
            break
        crossing = n
    return crossing


if __name__ == "__main__":  # the benchmark subprocess: python -m utils.deploy --bench spec.json
    if len(sys.argv) == 3 and sys.argv[1] == "--bench":
        _bench_worker(sys.argv[2])
    else:
        sys.exit("usage: python -m utils.deploy --bench SPEC.json (used by benchmark_runtime)")
