"""Generate docs/RESULTS.md: the course's findings, lesson by lesson, beside published anchors.

Every measured number in the generated file is read from a results file (``results/*.json``)
that a notebook (``make execute``) or a script (``make experiments``, ``make students``,
``make regimes``) wrote, with the machine, date and commit it was measured on. The published
anchors are quoted with their source; they are the only numbers typed here. The key figures
are copied from the executed solution notebooks' outputs into ``docs/figures/``.

    python scripts/results_doc.py           # write docs/RESULTS.md and docs/figures/
    python scripts/results_doc.py --check   # exit 1 when docs/RESULTS.md is out of date

A finding whose results key is missing says which command measures it; a results file whose
structure changed makes this script fail loudly (tests run it on the committed results).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, from any folder
    sys.path.insert(0, str(ROOT))

from utils.io import atomic_write_bytes, atomic_write_text  # noqa: E402


class Missing(Exception):
    """A results key that has not been measured yet (the finding says how to measure it)."""


def get(data: dict[str, Any], path: str) -> Any:
    """``data["a"]["b"]`` for ``path="a.b"``; :class:`Missing` when a key is absent or None."""
    cur: Any = data
    for part in path.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            raise Missing(path)
        cur = cur[part]
    return cur


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def ci(lo: float, hi: float) -> str:
    return f"[{pct(lo)}, {pct(hi)}]"


def pval(p: float) -> str:
    return f"{p:.2g}"


@dataclass(frozen=True)
class Finding:
    """One row: what was measured (a function of the lesson's results) beside its anchor."""

    what: str
    measured: Callable[[dict[str, dict[str, Any]]], str]
    anchor: str = ""
    how: str = "`make execute`"


def _rows(results: dict[str, dict[str, Any]], findings: Iterable[Finding]) -> list[str]:
    lines = ["| finding | measured here | published anchor |", "| --- | --- | --- |"]
    for f in findings:
        try:
            measured = f.measured(results)
        except Missing as e:
            measured = f"not measured yet (`{e}`): run {f.how}"
        lines.append(f"| {f.what} | {measured} | {f.anchor or '-'} |")
    return lines


# --- the findings, lesson by lesson --------------------------------------------------------

def _l01_errors(r: dict) -> str:
    d = r["01_distillation_theory"]
    p = get(d, "paired_tests.distilled_vs_alone")
    return (f"test errors (of {get(d, 'n_test')}), mean ± std over {len(get(d, 'seeds'))} seeds: "
            f"teacher {get(d, 'teacher_test_errors'):.1f} ± {get(d, 'teacher_test_errors_std'):.1f}"
            f", alone {get(d, 'student_baseline_test_errors'):.1f} ± "
            f"{get(d, 'student_baseline_test_errors_std'):.1f}, distilled "
            f"{get(d, 'student_distilled_test_errors'):.1f} ± "
            f"{get(d, 'student_distilled_test_errors_std'):.1f}; distilled vs alone: "
            f"{p['mean_diff']:+.2f} errors saved, paired t p = {pval(p['p_value'])}, sign p = "
            f"{pval(p['sign_p_value'])} ({'significant' if p['significant'] else 'not significant'}"
            " at 0.05)")


def _l01_scarce(r: dict) -> str:
    d = get(r["01_distillation_theory"], "scarce_transfer_paired_test")
    p, e = d["distilled_vs_alone"], d["per_seed_test_errors"]
    mean = {k: sum(v) / len(v) for k, v in e.items()}
    return (f"{d['per_class']} images per digit, T = {d['temperature']:g}, alpha = "
            f"{d['alpha']:g} (chosen on seeds {d['settings_chosen_on_seeds']}), "
            f"{len(d['seeds'])} new seeds declared in advance: test errors alone "
            f"{mean['alone']:.1f}, distilled {mean['distilled']:.1f}; {p['mean_diff']:+.1f} ± "
            f"{p['std_diff']:.1f} errors saved, paired t p = {pval(p['p_value'])}, sign p = "
            f"{pval(p['sign_p_value'])}, {p['wins']}/{p['n']} seeds ahead "
            f"({'significant' if p['significant'] else 'not significant'} at 0.05)")


def _l01_omitted(r: dict) -> str:
    d = r["01_distillation_theory"]
    return (f"digit {get(d, 'omitted_digit')} left out of the transfer set: "
            f"{get(d, 'omitted_digit_errors_before_bias'):.1f} errors on its "
            f"{int(get(d, 'omitted_digit_n_test'))} test images, "
            f"{get(d, 'omitted_digit_errors_after_bias'):.1f} after the bias correction "
            "(chosen on validation)")


def _l02_teacher(r: dict) -> str:
    d = r["02_teacher"]
    skills = get(d, "teacher_exact_match.per_skill")
    return (f"{get(d, 'teacher_params'):,} parameters, built in "
            f"{get(d, 'teacher_train_seconds') / 60:.0f} min; exact match per skill "
            + ", ".join(f"{k} {pct(v, 0)}" for k, v in skills.items())
            + f" (n = {get(d, 'teacher_exact_match.n')}); refusal "
            f"{pct(get(d, 'teacher_refusal_rate'))}, over-refusal "
            f"{pct(get(d, 'teacher_over_refusal_rate'))}, held-out jailbreaks refused "
            f"{pct(get(d, 'teacher_heldout_jailbreak_refusal_rate'))} (live subset)")


def _regime(r: dict, regime: str, budget: str, method: str) -> dict:
    rows = get(r["03_regimes"], "regimes")
    for row in rows:
        if (row["regime"], row["budget"], row["method"]) == (regime, budget, method):
            return row
    raise Missing(f"regimes[{regime}, {budget}, {method}]")


def _vs(row: dict) -> str:
    t = row["vs_sft"]
    return (f"{row['method']} {row['mean']:.3f} ± {row['std']:.3f} vs sft "
            f"{row['mean'] - t['mean_diff']:.3f} ({t['mean_diff']:+.3f}, paired t p = "
            f"{pval(t['p_value'])}, {t['wins']}/{t['n']} seeds ahead)")


def _l03_scarce(r: dict) -> str:
    return ("5% gold labels, exact match on the test skills: "
            + _vs(_regime(r, "scarce-5%", "long", "seq_kd")) + "; "
            + _vs(_regime(r, "scarce-5%", "long", "forward_kl")) + "; 20% labels: "
            + _vs(_regime(r, "scarce-20%", "long", "seq_kd")))


def _l03_abundant(r: dict) -> str:
    ent = get(r["03_regimes"], "teacher_entropy_nats.overall")
    return (_vs(_regime(r, "abundant", "long", "forward_kl"))
            + f"; the teacher's mean next-token entropy on its answers is {ent:.4f} nats")


def _l03_warm(r: dict) -> str:
    rows = [_regime(r, "scarce-5%", "sft+500", m) for m in ("forward_kl", "reverse_kl",
                                                            "on_policy")]
    return "500 steps from each seed's 5% SFT student: " + "; ".join(_vs(x) for x in rows)


def _l03_multi(r: dict) -> str:
    d = r["03_multi_answer"]
    rows = {(x["regime"], x["method"]): x for x in get(d, "regimes")}

    def tv(regime: str, method: str) -> str:
        x = rows.get((regime, method))
        if x is None:
            raise Missing(f"03_multi_answer regimes[{regime}, {method}]")
        t = x["vs_sft"]
        vs = "" if t is None else (f" (paired t p = {pval(t['p_value'])}, "
                                   f"{t['wins']}/{t['n']} seeds ahead)")
        return f"{method} {x['tv_mean']:.3f} ± {x['tv_std']:.3f}{vs}"

    kl = get(d, "forward_vs_reverse")
    return (f"any-letter skill (several right answers; teacher entropy "
            f"{get(d, 'teacher_entropy_nats.overall'):.2f} nats per answer token, TV to the truth "
            f"{get(d, 'teacher.tv'):.3f}); TV to the true answer distribution, lower is better: "
            f"64 words: {tv('scarce', 'sft')}, {tv('scarce', 'forward_kl')}, "
            f"{tv('scarce', 'reverse_kl')}, "
            f"{tv('scarce', 'on_policy')}; 4,000 words: {tv('abundant', 'sft')}, "
            f"{tv('abundant', 'forward_kl')}; reverse vs forward KL: validity "
            f"{-kl['validity']['mean_diff']:+.3f} (p = {pval(kl['validity']['p_value'])}), "
            f"coverage {-kl['coverage']['mean_diff']:+.3f} "
            f"(p = {pval(kl['coverage']['p_value'])})")


def _l03_kept(r: dict) -> str:
    k = get(r["03_white_box_distillation"], "kept_fraction_at_1_8")
    return (f"{k['name']}: {pct(k['kept'])} of the teacher's exact match by generation "
            f"({k['exact_match']:.3f} vs {k['teacher_exact_match']:.3f}, n = {k['n']}), "
            f"{k['times_smaller']:.1f}x fewer parameters")


def _l03_frontier(r: dict) -> str:
    f = get(r["03_white_box_distillation"], "frontier_long")
    points = sorted(get(f, "points"), key=lambda p: (p["params"], p["method"]))
    sizes = sorted({p["size"] for p in points}, key=lambda s: next(
        p["params"] for p in points if p["size"] == s))
    if len(sizes) < 2:
        raise Missing("03_white_box_distillation frontier_long (make frontier)")

    def one(size: str) -> str:
        by = {p["method"]: p for p in points if p["size"] == size}
        sft, kd = by["sft"], by["forward_kl"]
        return (f"{size} (1/{1 / sft['fraction_of_teacher']:.0f} of the teacher, "
                f"{len(sft['seeds'])} seeds): forward KL {pct(kd['kept_mean'])} ± "
                f"{pct(kd['kept_std'])}, SFT {pct(sft['kept_mean'])} ± {pct(sft['kept_std'])}")

    return (f"share of the teacher's exact match kept at {points[0]['steps']:,} steps "
            f"(teacher-forced, {get(r['03_white_box_distillation'], 'eval_subset.n')} test "
            "prompts): " + "; ".join(one(s) for s in sizes))


def _l04_extracted(r: dict) -> str:
    d = get(r["04_black_box_distillation"], "extracted_students")
    return "; ".join(
        f"{name}: exact match {v['exact_match']:.3f} ± {v['exact_match_std']:.3f} "
        f"({pct(v['kept_fraction'])} of the teacher) from {v['queries']:,} queries, refuses "
        f"{pct(v['refusal_rate'])} of restricted requests" for name, v in d.items())


def _l04_carlini(r: dict) -> str:
    d = r["04_black_box_distillation"]
    rec = get(d, "logit_bias_recovery")
    trunc = next(v for k, v in rec.items() if k.startswith("truncate"))
    return (f"hidden size estimated {get(d, 'svd_hidden_size_estimated')} (true "
            f"{get(d, 'svd_hidden_size_true')}); top-k + logit_bias recovers full log-probs "
            f"to {trunc['mean_abs_logprob_error']:.1g} nats mean error with "
            f"{trunc['queries']} queries per prompt")


def _l04_defences(r: dict) -> str:
    d = get(r["04_black_box_distillation"], "defences")
    return "; ".join(
        f"{name}: SVD estimate {v['svd_estimate']} of {v['svd_true']}, honest user's "
        f"log-prob error {v['honest_user_mean_abs_logprob_error']:.3g} nats"
        for name, v in d.items() if isinstance(v, dict) and "svd_estimate" in v)


def _l04_radioactive(r: dict) -> str:
    d = get(r["04_black_box_distillation"], "radioactivity_realistic")
    parts = [f"{k}: {pval(v)}" if isinstance(v, float) else f"{k}: {v}"
             for k, v in d.items() if not isinstance(v, dict | list)]
    return "; ".join(parts)


def _l05_variants(r: dict) -> str:
    d = r["05_quantization"]
    fp32 = next(v for v in get(d, "variants") if v["name"] == "fp32")
    out = []
    for v in get(d, "variants"):
        if v["name"] == "fp32":
            continue
        size = (f", file {fp32['file_bytes'] / v['file_bytes']:.2f}x smaller"
                if v.get("file_bytes") and fp32.get("file_bytes") else "")
        out.append(f"{v['name']}: {v['bits_per_weight']:.2f} bits/weight, exact match "
                   f"{v['score']:.3f} (fp32 {fp32['score']:.3f}), top-1 flips "
                   f"{pct(v['top1_flip_rate'], 2)}{size}")
    return "; ".join(out)


def _l05_gguf(r: dict) -> str:
    d = get(r["05_quantization"], "gguf")
    return "; ".join(f"{name}: {v['file_bytes']:,} bytes" for name, v in d.items())


def _l06_runtimes(r: dict) -> str:
    d = r["06_on_device_deployment"]
    return "; ".join(
        f"{v['name']}: {v['tokens_per_s_1thread']:,.0f} tok/s (1 thread), "
        f"{pct(v['share_of_bound'])} of its bandwidth bound"
        for v in get(d, "runtimes") if v.get("tokens_per_s_1thread"))


def _l06_scaling(r: dict) -> str:
    d = get(r["06_on_device_deployment"], "scaling")
    if isinstance(d, dict):
        summary = {k: v for k, v in d.items() if not isinstance(v, dict | list)}
        if summary:
            return "; ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                             for k, v in summary.items())
    return "see results/06_on_device_deployment.json `scaling`"


def _l07_models(r: dict) -> str:
    d = r["07_safety_evaluation"]
    out = []
    for m in get(d, "models"):
        lo, hi = m["refusal_ci"]
        out.append(f"{m['name']}: refusal {pct(m['refusal_rate'])} {ci(lo, hi)}, "
                   f"over-refusal {pct(m['over_refusal_rate'])}, held-out jailbreak success "
                   f"{pct(m['heldout_jailbreak_success_rate'])}, "
                   + (f"harmful (harm judge) {pct(m['harmful_rate'])}, "
                      if m.get("harmful_rate") is not None else "")
                   + f"utility {m['utility_score']:.3f}")
    return "<br>".join(out)


def _l07_judges(r: dict) -> str:
    d = get(r["07_safety_evaluation"], "judge_agreement_xstest")
    return "; ".join(f"{k} {pct(v['agreement'])} (n = {v['n']:,})" for k, v in d.items())


def _l07_erosion(r: dict) -> str:
    d = get(r["07_safety_evaluation"], "erosion_curve")
    head = f"{d['student']} fine-tuned on benign skill chats, {len(d['seeds'])} seeds: "
    return head + "; ".join(
        f"lr {f['lr']:g}: refusal {pct(f['refusal_step0'])} -> {pct(f['refusal_last_mean'])} "
        f"after {f['last_step']} steps (McNemar p < 0.05 in {f['seeds_significant']}/"
        f"{f['n_seeds']} seeds), utility {pct(f['utility_step0'])} -> "
        f"{pct(f['utility_last_mean'])}, harmful {pct(f['harmful_last_mean'])}"
        for f in d["findings"])


def _l07_adaptive(r: dict) -> str:
    d = get(r["07_safety_evaluation"], "adaptive_attack")
    return (f"random search over a suffix, {d['budget']} suffixes x {d['train_prompts']} "
            f"training requests; on {d['test_prompts']} held-out requests: " + "; ".join(
                f"{h['model']}: not refused {pct(h['none_success']['rate'])} -> "
                f"{pct(h['attack_success_mean'])}, harmful (harm judge) "
                f"{pct(h['attack_harmful_mean'])}" for h in d["summary"]))


def _l07_harm(r: dict) -> str:
    d = get(r["07_safety_evaluation"], "harm_judge_agreement")
    if isinstance(d, dict) and "agreement" in d:
        return f"{pct(d['agreement'])} agreement on {d.get('n', '?')} labelled course outputs"
    return "see results/07_safety_evaluation.json `harm_judge_agreement`"


def _l08_card(card: dict) -> str:
    m, c = card["metrics"], card["choice"]
    parts = [f"{c['student']} / {c['quantization']} / {c['runtime']}: "
             f"{m['file_bytes']['value']:,.0f} B, {m['peak_rss_mb']['value']:.0f} MiB, "
             f"{m['tokens_per_s']['value']:,.0f} tokens/s"]
    for k, label in (("refusal_rate", "refusal"), ("over_refusal_rate", "over-refusal"),
                     ("heldout_jailbreak_success_rate", "held-out jailbreaks"),
                     ("exact_match", "exact match")):
        parts.append(f"{label} {pct(m[k]['value'])} {ci(*m[k]['ci'])}")
    verdict = "meets every bar" if card["meets_all"] else "misses " + ", ".join(card["failed"])
    return ", ".join(parts) + f": **{verdict}**"


def _l08_reference(r: dict) -> str:
    d = r.get("08_capstone", {})
    return "<br>".join(_l08_card(c) for c in [get(d, "reference"), get(d, "experiment")])


def _l08_failing(r: dict) -> str:
    return "<br>".join(_l08_card(c) for c in get(r.get("08_capstone", {}), "failing"))


def _l08_guardrail(r: dict) -> str:
    d = get(r.get("08_capstone", {}), "guardrail")
    e, lat = d["effect"], d["latency"]
    rows = []
    for k, label in (("heldout_jailbreak_success", "held-out jailbreak success"),
                     ("heldout_jailbreak_success_raw_filter",
                      "held-out jailbreak success (filter without normalisation)"),
                     ("adaptive_suffix_success", "adaptive suffix success"),
                     ("over_refusal", "over-refusal"),
                     ("skill_prompts_blocked", "skill prompts blocked")):
        b, a = e[k]["before"], e[k]["after"]
        rows.append(f"{label} {pct(b['rate'])} -> {pct(a['rate'])} {ci(*a['ci'])}"
                    + (f" (McNemar p = {pval(e[k]['p_value'])})" if "p_value" in e[k] else ""))
    added = lat["added_ms_when_answered"]
    return ("; ".join(rows) + f"; latency added to a request that reaches the model "
            f"{added['value']:+.1f} ms [{added['ci'][0]:+.1f}, {added['ci'][1]:+.1f}]")


LESSONS: dict[str, tuple[str, list[str], list[Finding]]] = {
    "01_distillation_theory": ("01 · Distillation theory (digits)", ["01_distillation_theory"], [
        Finding("a small net distilled from a big one makes fewer errors than trained alone",
                _l01_errors, "Hinton, Vinyals & Dean (2015), MNIST, 10,000 test images: teacher "
                "67 errors, small net alone 146, distilled 74"),
        Finding("with a tiny transfer set the distilled net wins by far more than seed noise",
                _l01_scarce, "Hinton et al. (2015, section 6, speech): trained on 3% of the "
                "data, hard targets overfit (44.5% test frame accuracy), soft targets reach "
                "57.0% (58.9% with all the data)"),
        Finding("a class never seen in the transfer set is learnt from the soft targets",
                _l01_omitted, "Hinton et al. (2015): digit 3 omitted, 206 errors (133 on the "
                "1,010 threes), 109 (14 on threes) after raising the bias of class 3"),
    ]),
    "02_teacher": ("02 · The teacher language model", ["02_teacher"], [
        Finding("the shipped teacher meets its targets", _l02_teacher,
                "course targets: >= 90% exact match per skill, refusal >= 95%, over-refusal "
                "<= 5%, build <= 30 min", "`make teacher`"),
    ]),
    "03_white_box_distillation": ("03 · White-box distillation",
                                  ["03_white_box_distillation", "03_regimes",
                                   "03_multi_answer"], [
        Finding("with scarce labels the teacher's outputs beat training alone", _l03_scarce,
                "Kim & Rush (2016): training on the teacher's own outputs (sequence-level KD) "
                "beat word-level KD for their translation students", "`make regimes`"),
        Finding("with abundant exact labels distillation ties SFT", _l03_abundant,
                "Hinton et al. (2015): soft targets help through the relative probabilities "
                "of wrong answers; a near one-hot teacher has none", "`make regimes`"),
        Finding("where a prompt has several right answers, the teacher's distribution beats "
                "one label per prompt", _l03_multi,
                "Hinton et al. (2015): soft targets carry the relative probabilities the "
                "labels lack; Gu et al. (2024, MiniLLM): reverse KL is mode-seeking",
                "`scripts/experiments_03_multi_answer.py`"),
        Finding("reverse KL and on-policy GKD run from an SFT'd student", _l03_warm,
                "Agarwal et al. (2024, GKD) and Gu et al. (2024, MiniLLM) start from a "
                "fine-tuned student", "`make regimes`"),
        Finding("the frontier over student sizes at the long budget", _l03_frontier,
                "Mirzadeh et al. (2020): the gap between teacher and student capacity limits "
                "what distillation transfers; Cho & Hariharan (2019): a much smaller student "
                "can gain less from a stronger teacher", "`make students`, `make frontier`"),
        Finding("a student at most 1/8 of the teacher keeps its skills", _l03_kept,
                "DistilBERT keeps 97% of BERT at 60% of its size (Sanh et al. 2019); "
                "TinyBERT 96.8% at 1/7.5 (Jiao et al. 2020)", "`make students`"),
    ]),
    "04_black_box_distillation": ("04 · Black-box distillation, extraction and defences",
                                  ["04_black_box_distillation"], [
        Finding("students extracted through the API (prompts only)", _l04_extracted,
                "DeepSeek-R1's distilled models are SFT on the teacher's generations "
                "(DeepSeek-AI 2025): text-only extraction", "`make students`"),
        Finding("the hidden size and full log-probs leak through the API", _l04_carlini,
                "Carlini et al. (2024): hidden size of OpenAI's ada and babbage recovered; full "
                "logit vectors from top-k logprobs plus logit_bias"),
        Finding("defences against the SVD attack, and what they cost honest users",
                _l04_defences, "Carlini et al. (2024) discuss removing logit_bias, noise and "
                "rate limits"),
        Finding("radioactivity of watermarked traffic, on fresh prompts", _l04_radioactive,
                "Sander et al. (2024): detectable with p < 1e-5 when as little as 5% of the "
                "training text is watermarked; Kirchenbauer et al. (2023): z > 4"),
    ]),
    "05_quantization": ("05 · Quantization", ["05_quantization"], [
        Finding("every variant measured the same way", _l05_variants,
                "llama.cpp's Q8_0 and Q4_0 store 8.5 and 4.5 bits per weight (blocks of 32 "
                "with an fp16 scale)"),
        Finding("GGUF files written with the gguf package", _l05_gguf,
                "llama.cpp's GGUF format"),
    ]),
    "06_on_device_deployment": ("06 · On-device deployment", ["06_on_device_deployment"], [
        Finding("decode speed per runtime and its share of the bandwidth bound",
                _l06_runtimes, "roofline model (Williams et al. 2009): decode tokens/s <= "
                "memory bandwidth / bytes read per token"),
        Finding("where quantization buys speed (model sizes beyond the cache)", _l06_scaling,
                "decode is memory-bound once the weights leave the cache: int8 reads 4x fewer "
                "bytes than fp32", "`python scripts/bench_scaling.py`"),
    ]),
    "07_safety_evaluation": ("07 · Safety evaluation", ["07_safety_evaluation"], [
        Finding("what every model keeps of the teacher's safety (95% Wilson intervals)",
                _l07_models, "XSTest (Röttger et al. 2024): refusal and over-refusal are "
                "two numbers, not one"),
        Finding("refusal judges against XSTest's 2,250 human labels", _l07_judges,
                "Röttger et al. (2024): XSTest's string match agrees with humans on about "
                "88% of completions"),
        Finding("a harm-aware judge against labelled course outputs", _l07_harm,
                "StrongREJECT (Souly et al. 2024): score whether a response fulfils the "
                "request, not whether it refuses"),
        Finding("benign fine-tuning erodes refusals", _l07_erosion,
                "Qi et al. (2023): benign fine-tuning raised Llama-2-7b-chat's harmfulness "
                "from 0.3% to 16.1% (Alpaca)", "`make erosion`"),
        Finding("an adaptive (search-based) attack against each model", _l07_adaptive,
                "Zou et al. (2023), Andriushchenko et al. (2024): searched suffixes jailbreak "
                "aligned chat models; Souly et al. (2024): many 'successful' jailbreaks are "
                "empty", "`make adaptive-attack`"),
    ]),
    "08_capstone": ("08 · Capstone", ["08_capstone"], [
        Finding("the reference and the open experiment's configurations against the three bars",
                _l08_reference, "lesson 06's file budget (half the fp32 student); XSTest "
                "(Röttger et al. 2024): refusal and over-refusal, two numbers"),
        Finding("configurations that miss a bar", _l08_failing,
                "Hong et al. (2024): 3-bit quantization erodes what 4-bit keeps; Qi et al. "
                "(2023): fine-tuning on benign data alone erodes refusals"),
        Finding("an input/output guardrail from lesson 07's judges", _l08_guardrail,
                "Inan et al. (2023), Llama Guard: input and output classification of a chat "
                "model's traffic"),
    ]),
}

# the key figure of each lesson: (solution notebook, cell id), copied from its outputs
FIGURES: dict[str, list[tuple[str, str]]] = {
    "03_white_box_distillation": [("03_white_box_distillation", "regimes_plot")],
    "05_quantization": [("05_quantization", "figure")],
    "07_safety_evaluation": [("07_safety_evaluation", "erosion_plot")],
    "08_capstone": [("08_capstone", "card_figure")],
}


def _provenance_line(data: dict[str, Any]) -> str:
    p = data.get("provenance") or {}
    return (f"`{p.get('git_commit', '?')}`, {str(p.get('date', '?'))[:10]}, "
            f"{p.get('machine', '?')}" + (f" ({p['cpu']})" if p.get("cpu") else ""))


def _figure_png(notebook: Path, cell_id: str) -> bytes | None:
    if not notebook.is_file():
        return None
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell.get("id") == cell_id:
            for out in cell.get("outputs", []):
                png = out.get("data", {}).get("image/png")
                if png:
                    return base64.b64decode("".join(png) if isinstance(png, list) else png)
    return None


def render(results_dir: Path, solutions_dir: Path | None = None
           ) -> tuple[str, dict[str, bytes]]:
    """The markdown of docs/RESULTS.md and the figures it links ({file name: png bytes})."""
    results = {p.stem: json.loads(p.read_text(encoding="utf-8"))
               for p in sorted(results_dir.glob("[0-9][0-9]_*.json"))}
    figures: dict[str, bytes] = {}
    lines = [
        "# Results: what the course measured, beside the published anchors",
        "",
        "Generated by `scripts/results_doc.py` from `results/*.json` (written by the solution",
        "notebooks under `make execute` and by the scripts of `make experiments`, `make students`",
        "and `make regimes`). Do not edit by hand. Each lesson names the commit, date and machine",
        "of each results file; intervals are 95% Wilson intervals for rates and ± one standard",
        "deviation over seeds for means. The anchors are quoted from their papers: they are",
        "measured on other models and data, so read them as the shape of the effect to look for,",
        "not as numbers to match. Raw values: the JSON files themselves.",
    ]
    for lesson, (title, files, findings) in LESSONS.items():
        lines += ["", f"## {title}", ""]
        for name in files:
            if name in results:
                lines.append(f"- `results/{name}.json`: {_provenance_line(results[name])}")
            else:
                lines.append(f"- `results/{name}.json`: missing")
        lines.append("")
        lines += _rows(results, findings)
        for nb_name, cell_id in FIGURES.get(lesson, []):
            png = _figure_png((solutions_dir or ROOT / "solutions") / f"{nb_name}.ipynb",
                              cell_id)
            if png is not None:
                fname = f"{nb_name}_{cell_id}.png"
                figures[fname] = png
                lines += ["", f"![{nb_name}, cell {cell_id}](figures/{fname})"]
    return "\n".join(lines) + "\n", figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when docs/RESULTS.md differs from what results/ generates")
    args = ap.parse_args(argv)
    text, figures = render(ROOT / "results")
    target = ROOT / "docs" / "RESULTS.md"
    if args.check:
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            print("docs/RESULTS.md is out of date with results/: run "
                  "`python scripts/results_doc.py` (or `make results-doc`).")
            return 1
        print("docs/RESULTS.md is up to date with results/.")
        return 0
    atomic_write_text(target, text)
    for fname, png in figures.items():
        atomic_write_bytes(ROOT / "docs" / "figures" / fname, png)
    print(f"wrote docs/RESULTS.md and {len(figures)} figure(s) in docs/figures/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
