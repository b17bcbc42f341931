# tests/test_progress.py: plumbing/progress.py: the one line per optimizer step (every regulariser that is on, in
# the paper's order; "no regularisers" for LoRA / PiSSA) and times as h:mm:ss.

from plumbing import progress


def test_the_step_line_names_each_term_and_the_times():
    line = progress.step_line(3, 10, {"task": 1.23456, "svd": -0.5, "consistency": 0.01}, (0.1, 0.25, 0.03), 1e-4,
                              2.5, 8, 800, 2.0, 3725, 59.9)
    assert line == ("step 3/10 | task 1.2346 | consistency +0.0100 svd -0.5000 | λ 0.1/0.25/0.03 | lr 1.00e-04 | "
                    "|g| 2.500 | 4.0 ex/s, 400 tok/s | 1:02:05 elapsed, ETA 0:00:59")
    assert "| task 0.5000 | no regularisers | λ 0/0/0 |" in progress.step_line(1, 1, {"task": 0.5}, (0, 0, 0), 1e-3,
                                                                              1.0, 4, 40, 1.0, 1, 0)


def test_times_are_hours_minutes_seconds():
    assert [progress.fmt_time(s) for s in (0, 59.9, 61, 3600, 100 * 3600 + 61)] == \
        ["0:00:00", "0:00:59", "0:01:01", "1:00:00", "100:01:01"]
