"""The arithmetic behind bench/bench_time_to_loss.py's verdicts: Student's t p-values, the time at
which a curve first reaches the target, and the reference arm every other arm is compared with."""

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from bench_time_to_loss import incomplete_beta, report, time_to, welch  # noqa: E402


@pytest.mark.parametrize("t, df, p", [(2.228, 10, 0.05), (2.086, 20, 0.05), (3.169, 10, 0.01), (0.0, 7, 1.0),
                                      (12.706, 1, 0.05)])
def test_two_sided_p_values_match_students_t_table(t, df, p):
    assert incomplete_beta(df / 2, 0.5, df / (df + t * t)) == pytest.approx(p, abs=2e-4)


def test_welch_on_samples_with_unequal_spread():
    # Welch's t for these two samples: means 20 and 30, variances 10 and 40, n = 5 each, so
    # t = -10 / sqrt(2 + 8) and df = 10^2 / (2^2/4 + 8^2/4) = 5.88.
    t, p = welch([16.0, 18.0, 20.0, 22.0, 24.0], [22.0, 26.0, 30.0, 34.0, 38.0])
    assert t == pytest.approx(-10 / 10 ** 0.5)
    assert p == pytest.approx(0.02004, abs=5e-5)  # twice the t density's tail past 3.162, integrated numerically


def run(final: float, curve: list[tuple[int, float, float]]) -> dict:
    return {"max_iters": curve[-1][0], "ms_per_step": 100.0, "final_val": final,
            "curve": [{"step": step, "train_s": seconds, "val": val} for step, seconds, val in curve]}


def test_the_first_arm_is_the_reference_and_others_are_timed_to_its_final_loss():
    assert time_to([{"step": 10, "train_s": 1.0, "val": 2.0}, {"step": 20, "train_s": 2.0, "val": 1.5}], 1.6) == \
        (2.0, 20)
    assert time_to([{"step": 10, "train_s": 1.0, "val": 2.0}], 1.6) is None
    results = {
        "finetune": [run(1.50, [(50, 5.0, 1.7), (100, 10.0, 1.50)]), run(1.52, [(50, 5.2, 1.7), (100, 10.4, 1.52)])],
        "finetune-dropout0": [run(1.45, [(50, 2.0, 1.49), (100, 4.0, 1.45)]),
                              run(1.46, [(50, 2.2, 1.52), (100, 4.4, 1.46)])],
    }
    lines = report(results, 1.51)
    assert "the mean final loss of finetune, the reference arm" in lines[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| finetune")}
    assert rows["finetune"].endswith("| 100.0% |")  # its whole run: 10.2 s
    # The other arm reaches 1.51 at step 50 (2.0 s) and at step 100 (4.4 s): 3.2 s of 10.2 s.
    assert rows["finetune-dropout0"].endswith(f"| {3.2 / 10.2:.1%} |")
    assert any(line.startswith("verdict finetune-dropout0: 31.4% of finetune's time") for line in lines)
