"""Lesson 06's scaling grid: the scaled model's export and parity, 4-bit ONNX, the checks of
``results/06_scaling.json`` (schema, sanity, crossovers) and the script's summary and docs."""

from __future__ import annotations

import copy
import importlib.util
import math
import time
import types

import numpy as np
import pytest
import torch
from _committed import load_committed

from utils.deploy import (
    SCALING_ROW_KEYS,
    SCALING_VOCAB,
    export_onnx,
    load_onnx_session,
    onnx_op_counts,
    ort_generate,
    ort_logits,
    quantize_onnx_4bit,
    quantize_onnx_int8,
    scaled_model_config,
    scaling_speedups,
    speed_crossover,
    validate_scaling,
)
from utils.models import build_model, count_parameters
from utils.paths import repo_root

SCRIPT = repo_root() / "scripts" / "bench_scaling.py"
_SPEC = importlib.util.spec_from_file_location("bench_scaling", SCRIPT)
bench_scaling = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_scaling)
FIX = "run `.venv/bin/python scripts/bench_scaling.py` (about 30 minutes)"


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """The grid's architecture at a tiny size: 128 wide, 2 layers; fp32, int8, 4-bit files."""
    torch.set_num_threads(2)
    model = build_model(scaled_model_config(128, 2), seed=0).eval()
    d = tmp_path_factory.mktemp("scaled")
    fp32 = export_onnx(model, d / "fp32.onnx")
    return {"model": model, "fp32": fp32, "int8": quantize_onnx_int8(fp32, d / "int8.onnx"),
            "int4": quantize_onnx_4bit(fp32, d / "int4.onnx", block_size=32)}


def test_scaled_config_is_the_course_llama_at_any_width():
    cfg = scaled_model_config(256, 3)
    assert (cfg.architecture, cfg.vocab_size, cfg.num_heads) == ("llama", SCALING_VOCAB, 4)
    model = build_model(cfg, seed=0)
    n = count_parameters(model)
    # 12 h^2 per layer (4 h^2 attention + 3 h * 8h/3 MLP) plus the tied embedding
    assert n == pytest.approx(12 * 256**2 * 3 + SCALING_VOCAB * 256, rel=0.02)
    for bad in ((100, 2), (128, 0)):
        with pytest.raises(ValueError, match="multiple of 64"):
            scaled_model_config(*bad)


def test_scaled_export_matches_pytorch_and_quantized_graphs_run(scaled):
    ids = np.random.default_rng(0).integers(5, SCALING_VOCAB, size=(1, 9))
    with torch.no_grad():
        ref = scaled["model"](input_ids=torch.as_tensor(ids)).logits.numpy()
    got = {k: ort_logits(load_onnx_session(scaled[k]), ids) for k in ("fp32", "int8", "int4")}
    assert np.abs(got["fp32"] - ref).max() < 1e-4
    for k in ("int8", "int4"):  # quantized: close, not equal; the same shape
        diff = np.abs(got[k] - ref).max()
        assert got[k].shape == ref.shape and 0 < diff < 0.5 * np.abs(ref).max() + 0.1, (k, diff)
    # the cached decode loop runs on every file
    for k in ("fp32", "int8", "int4"):
        out = ort_generate(load_onnx_session(scaled[k]), ids, 5)
        assert out.shape == (1, 14) and (out[:, :9] == ids).all()


def test_4bit_rewrites_every_weight_matmul_and_is_smallest(scaled):
    ops = onnx_op_counts(scaled["int4"])
    assert ops["MatMulNBits"] == 7 * 2  # q, k, v, o, gate, up, down in both layers
    sizes = {k: scaled[k].stat().st_size for k in ("fp32", "int8", "int4")}
    # both well under fp32; at this tiny size 4-bit is not below int8: MatMulNBits leaves the
    # tied fp32 embedding (768 x 128) alone, while quantize_dynamic stores it in int8
    assert max(sizes["int4"], sizes["int8"]) < sizes["fp32"] / 2.5, sizes


def test_4bit_rejects_bad_input(scaled, tmp_path):
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        quantize_onnx_4bit(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    with pytest.raises(ValueError, match="power of two"):
        quantize_onnx_4bit(scaled["fp32"], tmp_path / "out.onnx", block_size=24)


def _row(size, params, runtime, precision, threads, speed, bound=1000.0):
    runs = [speed * 0.9, speed, speed * 1.1]
    return {"size": size, "num_parameters": params, "runtime": runtime, "precision": precision,
            "threads": threads, "bytes": params * 4, "tokens_per_s": speed,
            "tokens_per_s_runs": runs, "bandwidth_gbps": 20.0,
            "bandwidth_bound_tokens_per_s": bound, "share_of_bound": speed / bound,
            "loadavg": [[0.5, 0.5, 0.5]] * 3}


def _grid(ratios=(0.8, 1.2, 1.6)):
    rows = []
    for i, ratio in enumerate(ratios):
        params = 10 ** (6 + i)
        rows += [_row(f"s{i}", params, "onnxruntime", "fp32", 1, 100.0),
                 _row(f"s{i}", params, "onnxruntime", "int8", 1, 100.0 * ratio)]
    return {"rows": rows}


def test_validate_scaling_accepts_good_and_names_each_fault():
    rows = validate_scaling(_grid())
    assert len(rows) == 6 and set(SCALING_ROW_KEYS) <= set(rows[0])
    faults = {
        "lacks": lambda r: r.pop("loadavg"),
        "positive finite": lambda r: r.update(tokens_per_s=float("nan")),
        "median": lambda r: r.update(tokens_per_s=r["tokens_per_s"] * 1.5,
                                     share_of_bound=r["tokens_per_s"] * 1.5 / 1000.0),
        "share_of_bound": lambda r: r.update(share_of_bound=r["share_of_bound"] * 2),
        "tokens_per_s_runs": lambda r: r.update(tokens_per_s_runs=[]),
    }
    for message, mutate in faults.items():
        bad = copy.deepcopy(_grid())
        mutate(bad["rows"][1])
        with pytest.raises(ValueError, match=message):
            validate_scaling(bad)
    dup = _grid()
    dup["rows"].append(copy.deepcopy(dup["rows"][0]))
    with pytest.raises(ValueError, match="repeats"):
        validate_scaling(dup)
    with pytest.raises(ValueError, match="no rows"):
        validate_scaling({"rows": []})


def test_crossover_is_where_int8_stays_faster():
    assert speed_crossover(_grid()["rows"], "onnxruntime", threads=1) == 10**7
    # faster, slower, faster: only the last size counts (it must stay faster from there on)
    assert speed_crossover(_grid((1.2, 0.9, 1.3))["rows"], "onnxruntime", threads=1) == 10**8
    assert speed_crossover(_grid((0.8, 0.9, 1.0))["rows"], "onnxruntime", threads=1) is None
    assert speed_crossover(_grid()["rows"], "pytorch", threads=1) is None  # nothing measured
    ratios = scaling_speedups(_grid()["rows"], "onnxruntime", threads=1)
    assert [n for n, _ in ratios] == [10**6, 10**7, 10**8]
    assert [round(x, 6) for _, x in ratios] == [0.8, 1.2, 1.6]


def test_script_summary_and_docs_section(tmp_path):
    raw, info = [], {}
    for i, name in enumerate(("2M", "7M")):
        info[name] = {"params": 2_000_000 * (i + 1), "layout": [8, 2, 64], "export_s": 1.0,
                      "parity": {p: {"max_abs_logit_diff": 0.0, "top1_agreement": 1.0}
                                 for p in ("fp32", "int8", "int4")}}
        for runtime, precision in bench_scaling.VARIANTS:
            for round_ in range(2):
                raw.append({"size": name, "runtime": runtime, "precision": precision,
                            "round": round_, "bytes": 4_000_000, "peak_rss_mb": 50.0,
                            "tokens_per_s_runs_1thread": [100.0 + round_, 110.0],
                            "tokens_per_s_runs_all": [150.0, 160.0 + round_],
                            "loadavg_1thread": [[0.2, 0.3, 0.4]] * 2,
                            "loadavg_all": [[0.2, 0.3, 0.4]] * 2,
                            "loadavg_before": [0.1, 0.2, 0.3], "cpu_busy_before": 0.1})
    args = types.SimpleNamespace(prompt_tokens=16, new_tokens=33, rounds=2, repeats=2,
                                 optimization="all", max_load=1.0)
    result = bench_scaling.summarise(raw, info, [{"1": 20.0, "all": 30.0}], args, 0.0, 1.0, [])
    rows = validate_scaling(result)
    assert len(rows) == 2 * len(bench_scaling.VARIANTS) * 2
    one = next(r for r in rows if r["threads"] == 1)
    assert one["tokens_per_s"] == pytest.approx(np.median([100, 110, 101, 110]))
    # bound = bandwidth / (weights + KV cache at the average context)
    kv = 2 * 8 * 2 * 64 * (16 + 33 // 2) * 4
    assert one["bandwidth_bound_tokens_per_s"] == pytest.approx(20e9 / (4_000_000 + kv))
    doc = tmp_path / "BENCHMARKS.md"
    section = bench_scaling.markdown_table(result)
    bench_scaling.write_docs(doc, section)
    bench_scaling.write_docs(doc, section)  # replaced between the markers, not appended
    text = doc.read_text()
    assert text.count("<!-- BEGIN bench_scaling -->") == 1 and "| 7M |" in text


def test_committed_grid_is_sane_and_spans_the_cache():
    result = load_committed(repo_root() / "results" / "06_scaling.json", FIX)
    rows = validate_scaling(result)
    params = sorted({r["num_parameters"] for r in rows})
    assert params[0] <= 3e6 and params[-1] >= 2e8  # from in-cache to far beyond it
    assert {"L2", "L3"} <= set(result["caches"]) and result["bandwidth_gbps"]["1"] > 0
    for r in rows:
        assert all(len(load) == 3 for load in r["loadavg"]), "os.getloadavg() after every run"
        if r["threads"] == 1:  # stable to an order of magnitude
            assert max(r["tokens_per_s_runs"]) / min(r["tokens_per_s_runs"]) < 10, r
        if r["bytes"] > 4 * 32 * 2**20:  # far beyond the cache: below the DRAM bound
            assert r["share_of_bound"] < 1.2, r
    # a bigger model is never much faster than a smaller one in the same runtime and precision
    by = {}
    for r in rows:
        by.setdefault((r["runtime"], r["precision"], r["threads"]), []).append(
            (r["num_parameters"], r["tokens_per_s"]))
    for key, points in by.items():
        speeds = [s for _, s in sorted(points)]
        assert speeds[-1] < speeds[0], key


def test_live_point_agrees_with_the_committed_grid():
    """The notebook's live check: rebuild the smallest size, time ONNX Runtime fp32 decoding."""
    result = load_committed(repo_root() / "results" / "06_scaling.json", FIX)
    size = min(result["sizes"], key=lambda n: result["sizes"][n]["num_parameters"])
    shape = result["sizes"][size]
    model = build_model(scaled_model_config(shape["hidden_size"], shape["num_layers"]), seed=0)
    assert count_parameters(model) == shape["num_parameters"]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        session = load_onnx_session(export_onnx(model.eval(), Path(tmp) / "m.onnx"), threads=1)
        ids = np.random.default_rng(0).integers(
            5, SCALING_VOCAB, size=(1, result["settings"]["prompt_tokens"]))
        n = result["settings"]["new_tokens"]
        ort_generate(session, ids, 4)
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            ort_generate(session, ids, 1)
            t1 = time.perf_counter()
            ort_generate(session, ids, n)
            runs.append((n - 1) / ((time.perf_counter() - t1) - (t1 - t0)))
    committed = next(r["tokens_per_s"] for r in result["rows"] if r["size"] == size and
                     r["runtime"] == "onnxruntime" and r["precision"] == "fp32" and
                     r["threads"] == 1)
    ratio = float(np.median(runs)) / committed
    assert math.isfinite(ratio) and 0.1 <= ratio <= 10, (np.median(runs), committed)
