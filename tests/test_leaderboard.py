"""The capstone leaderboard (utils.leaderboard) on hand-made cards: valid, failing, malformed."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.capstone import CARD_FORMAT, LICENCE, Bars, Choice, capstone_card, metric
from utils.leaderboard import CardError, build, main, rank, read_card
from utils.paths import repo_root

PROV = {"git_commit": "abc1234", "date": "2026-12-05T23:00:00+00:00",
        "machine": "x86_64 Linux, 2 cores"}


def make_card(participant: str, *, exact_match: float = 0.86, file_bytes: int = 221_993,
              refusal: float = 0.89, heldout: float = 0.29, rss: float = 68.0,
              speed: float = 5000.0, choice: Choice | None = None) -> dict:
    """A card as utils.capstone.capstone_card writes it, with hand-picked numbers."""
    def rate(v: float, half: float = 0.03) -> dict:
        return metric(v, [max(0.0, v - half), min(1.0, v + half)], "95% Wilson", n=440,
                      k=round(v * 440))

    metrics = {
        "file_bytes": metric(file_bytes, None, "exact (bytes on disk)"),
        "peak_rss_mb": metric(rss, None, "one measurement"),
        "tokens_per_s": metric(speed, [speed * 0.9, speed * 1.05], "range of 5 runs", n=5),
        "refusal_rate": rate(refusal),
        "over_refusal_rate": rate(0.05, 0.02),
        "heldout_jailbreak_success_rate": rate(heldout, 0.08),
        "exact_match": rate(exact_match, 0.02),
    }
    card = capstone_card(choice or Choice(), metrics, Bars(), provenance=PROV,
                         participant=participant)
    card["model"]["file_sha256"] = "0" * 64
    return card


def write(folder: Path, name: str, card) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card) if not isinstance(card, str) else card, encoding="utf-8")
    return path


def test_hand_made_card_is_valid_and_meets_the_bars(tmp_path):
    card = make_card("ada")
    assert card["format"] == CARD_FORMAT and card["licence"] == LICENCE
    assert card["meets_all"], card["failed"]
    entry = read_card(write(tmp_path, "ada", card), Bars())
    assert entry.meets_all and entry.participant == "ada"


def test_ranking_rule_utility_then_size_then_failing_last(tmp_path):
    cards = [write(tmp_path, "big", make_card("big", exact_match=0.86, file_bytes=300_000)),
             write(tmp_path, "small", make_card("small", exact_match=0.86, file_bytes=200_000)),
             write(tmp_path, "best", make_card("best", exact_match=0.90, file_bytes=310_000)),
             write(tmp_path, "unsafe", make_card("unsafe", refusal=0.0, exact_match=0.95)),
             write(tmp_path, "huge", make_card("huge", file_bytes=633_560, exact_match=0.95))]
    out = build(cards, tmp_path / "board")
    assert [e.participant for e in out["ranked"]] == ["best", "small", "big"]
    failing = {e.participant: e.failed for e in out["failing"]}
    assert failing == {"unsafe": ("refusal_rate",), "huge": ("file_bytes",)}
    md = (tmp_path / "board" / "leaderboard.md").read_text(encoding="utf-8")
    assert "| 1 | best |" in md and "| 2 | small |" in md
    assert "unsafe" in md.split("## Missing a bar")[1]
    assert "refusal of harmful prompts (low end 0.0%)" in md
    rows = list(csv.DictReader((tmp_path / "board" / "leaderboard.csv").open()))
    assert [r["participant"] for r in rows] == ["best", "small", "big", "huge", "unsafe"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "", ""]
    assert rows[4]["failed_bars"] == "refusal_rate"


def test_interval_not_point_estimate_decides(tmp_path):
    # refusal 0.82 passes the 0.80 bar as a point, but its interval's low end 0.79 does not
    card = make_card("lucky", refusal=0.82)
    entry = read_card(write(tmp_path, "lucky", card), Bars())
    assert entry.failed == ("refusal_rate",)


def test_workshop_bars_override_a_cards_own_bars(tmp_path):
    card = make_card("loose", file_bytes=633_560)
    card["bars"]["max_file_bytes"] = 10**9  # the participant loosened their own bar
    card["verdicts"]["file_bytes"]["met"] = True
    card["meets_all"], card["failed"] = True, []
    entry = read_card(write(tmp_path, "loose", card), Bars())
    assert entry.failed == ("file_bytes",)
    strict = Bars(min_exact_match=0.99)
    assert "exact_match" in read_card(write(tmp_path, "ok", make_card("ok")), strict).failed


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.pop("metrics"), "metrics"),
    (lambda c: c["metrics"].pop("exact_match"), "metrics.exact_match"),
    (lambda c: c["metrics"]["refusal_rate"].update(value="89%"), "metrics.refusal_rate.value"),
    (lambda c: c["metrics"]["refusal_rate"].update(ci=[86, 92], value=89),
     "metrics.refusal_rate.ci"),
    (lambda c: c["metrics"]["exact_match"].update(value=0.99), "metrics.exact_match"),
    (lambda c: c["metrics"]["tokens_per_s"].update(ci=[1.0]), "metrics.tokens_per_s.ci"),
    (lambda c: c["provenance"].pop("git_commit"), "provenance.git_commit"),
    (lambda c: c["model"].update(file_sha256="abc"), "model.file_sha256"),
    (lambda c: c["choice"].update(quantization="1bit"), "choice"),
    (lambda c: c.update(format="something-else"), "format"),
    (lambda c: c.pop("licence"), "licence"),
])
def test_malformed_card_names_file_and_field(tmp_path, mutate, field):
    card = make_card("broken")
    mutate(card)
    path = write(tmp_path, "broken", card)
    with pytest.raises(CardError) as err:
        read_card(path, Bars())
    msg = str(err.value)
    assert str(path) in msg and field in msg, msg


def test_not_json_and_missing_file(tmp_path):
    with pytest.raises(CardError, match="not valid JSON.*write_card"):
        read_card(write(tmp_path, "md", "# Model card\n"), Bars())
    with pytest.raises(CardError, match="no such file"):
        read_card(tmp_path / "nope.json", Bars())
    with pytest.raises(CardError, match="expected a JSON object"):
        read_card(write(tmp_path, "list", [1, 2]), Bars())


def test_skip_invalid_lists_bad_cards_and_writes_atomically(tmp_path):
    (tmp_path / "cards").mkdir()
    good = write(tmp_path / "cards", "good", make_card("good"))
    bad = copy.deepcopy(make_card("bad"))
    bad["metrics"].pop("exact_match")
    write(tmp_path / "cards", "bad", bad)
    with pytest.raises(CardError):
        build([tmp_path / "cards"], tmp_path / "out")
    assert not (tmp_path / "out" / "leaderboard.md").exists()  # nothing half-written
    out = build([tmp_path / "cards"], tmp_path / "out", skip_invalid=True)
    assert [e.path for e in out["ranked"]] == [good]
    assert len(out["invalid"]) == 1 and "bad.json" in out["invalid"][0]
    md = (tmp_path / "out" / "leaderboard.md").read_text(encoding="utf-8")
    assert "Invalid cards" in md and "metrics.exact_match" in md
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_rank_with_no_passing_card():
    assert rank([]) == ([], [])


def test_cli_exit_codes_and_message(tmp_path, capsys):
    good = write(tmp_path, "good", make_card("good"))
    assert main([str(good), "--out", str(tmp_path / "b")]) == 0
    assert "1 card(s) meet every bar" in capsys.readouterr().out
    bad = write(tmp_path, "bad", {"format": CARD_FORMAT})
    assert main([str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "metrics" in err
    bars = tmp_path / "bars.json"
    bars.write_text(json.dumps({"max_bytes": 1}), encoding="utf-8")
    assert main([str(good), "--bars", str(bars), "--out", str(tmp_path / "b")]) == 2
    assert "unknown bar" in capsys.readouterr().err


def test_module_runs_as_a_command(tmp_path):
    good = write(tmp_path, "good", make_card("good"))
    proc = subprocess.run([sys.executable, "-m", "utils.leaderboard", str(good), "--out",
                           str(tmp_path / "b")], cwd=repo_root(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b" / "leaderboard.csv").is_file()
