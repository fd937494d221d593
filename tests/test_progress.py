"""Progress bars redraw rarely enough for nbval (see utils.progress)."""

import io
import time

from utils.progress import MIN_INTERVAL_S, progress_bar


def test_bar_redraws_at_most_every_min_interval():
    out = io.StringIO()
    bar = progress_bar(total=10_000, file=out, ascii=True)
    start = time.monotonic()
    for _ in range(10_000):
        time.sleep(0.0001)
        bar.update(1)
    elapsed = time.monotonic() - start
    bar.close()
    redraws = out.getvalue().count("\r")
    # tqdm's default (0.1 s) would redraw ~10x per second; the course's bars at most every 2 s
    # (plus the first draw and the final one at close).
    assert redraws <= elapsed / MIN_INTERVAL_S + 3, (redraws, elapsed)


def test_caller_can_still_choose_an_interval():
    bar = progress_bar(range(3), mininterval=0.5, file=io.StringIO())
    assert bar.mininterval == 0.5
    assert list(bar) == [0, 1, 2]


def test_run_jobs_keeps_the_order_in_one_process_and_in_several() -> None:
    import operator

    import pytest

    from utils.progress import run_jobs

    jobs = [(2, 5), (3, 2), (10, 0)]
    assert run_jobs(pow, jobs) == [32, 9, 1]
    assert run_jobs(pow, jobs, workers=2) == [32, 9, 1]  # spawned processes, same order
    assert run_jobs(operator.add, [(1,), (2,)], extra=(10,)) == [11, 12]
    with pytest.raises(ValueError, match="workers must be at least 1"):
        run_jobs(pow, jobs, workers=0)


def test_paired_grid_arguments_default_and_refuse():
    import pytest

    from utils.progress import paired_grid_parser, parse_paired_grid_args

    def parse(argv):
        p = paired_grid_parser("grid.py", "a grid", "/tmp/out.json")
        p.add_argument("--quick", action="store_true")
        return parse_paired_grid_args(p, argv)

    assert parse([]).seeds == [0, 1, 2, 3, 4] and parse(["--quick"]).seeds == [0, 1]
    assert parse(["--seeds", "3", "5"]).seeds == [3, 5] and parse([]).out == "/tmp/out.json"
    for bad in (["--seeds", "1"], ["--seeds", "2", "2"], ["--jobs", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)
