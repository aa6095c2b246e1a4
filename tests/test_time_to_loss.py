"""The arithmetic behind bench/bench_time_to_loss.py's verdicts: Student's t p-values, the time at
which a curve first reaches the target, and the reference arm every other arm is compared with;
how the nanogpt arm speaks to nanoGPT's train.py and reads its times; and arms run by another
checkout (ARM@CHECKOUT)."""

import ast
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_time_to_loss  # noqa: E402
from bench_time_to_loss import incomplete_beta, report, saved_arms, split_arm, stepwise, time_to, welch  # noqa: E402
from nanogpt_arm import ITERATION, nanogpt_flags, train_seconds  # noqa: E402

from gptcore.config import load_config  # noqa: E402


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


def test_the_first_arm_is_the_reference_and_others_are_timed_to_its_final_loss(capsys):
    assert time_to([{"step": 10, "train_s": 1.0, "val": 2.0}, {"step": 20, "train_s": 2.0, "val": 1.5}], 1.6) == \
        (2.0, 20)
    assert time_to([{"step": 10, "train_s": 1.0, "val": 2.0}], 1.6) is None
    results = {
        "finetune-dropout0.2": [run(1.50, [(50, 5.0, 1.7), (100, 10.0, 1.50)]),
                                run(1.52, [(50, 5.2, 1.7), (100, 10.4, 1.52)])],
        "finetune": [run(1.45, [(50, 2.0, 1.49), (100, 4.0, 1.45)]), run(1.46, [(50, 2.2, 1.52), (100, 4.4, 1.46)])],
    }
    lines = report(results, 1.51)
    assert "the mean final loss of finetune-dropout0.2, the reference arm" in lines[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| finetune")}
    assert rows["finetune-dropout0.2"].endswith("| 100.0% |")  # its whole run: 10.2 s
    # The other arm reaches 1.51 at step 50 (2.0 s) and at step 100 (4.4 s): 3.2 s of 10.2 s.
    assert rows["finetune"].endswith(f"| {3.2 / 10.2:.1%} |")
    assert any(line.startswith("verdict finetune: 31.4% of finetune-dropout0.2's time") for line in lines)
    # --report --arms: the same runs with another reference.
    assert list(saved_arms(results, "finetune,finetune-dropout0.2")) == ["finetune", "finetune-dropout0.2"]
    assert saved_arms(results, None) is results
    with pytest.raises(SystemExit) as refused:
        saved_arms(results, "finetune,fast")
    assert refused.value.code == 2
    assert capsys.readouterr().err.endswith(": the file has no arm fast; it has finetune-dropout0.2, finetune\n")


def test_the_nanogpt_arm_gives_train_py_the_baselines_settings_as_literals_of_its_types():
    flags = dict(flag.removeprefix("--").split("=", 1) for flag in nanogpt_flags(load_config("cpu", []), 100, "cpu"))
    # nanoGPT's configurator evaluates each value as a literal (else keeps the string) and asserts
    # that its type is the type of train.py's default: a float must stay a float even when whole.
    defaults = {"n_layer": 12, "block_size": 1024, "dropout": 0.0, "bias": False, "learning_rate": 6e-4,
                "min_lr": 6e-5, "warmup_iters": 2000, "max_iters": 600000, "lr_decay_iters": 600000,
                "weight_decay": 1e-1, "beta2": 0.95, "grad_clip": 1.0, "eval_iters": 200, "log_interval": 1,
                "always_save_checkpoint": True, "compile": True, "device": "cuda", "dtype": "float16"}
    for key, default in defaults.items():
        try:
            value = ast.literal_eval(flags[key])
        except (SyntaxError, ValueError):
            value = flags[key]
        assert type(value) is type(default), (key, flags[key])
    assert (flags["n_layer"], flags["block_size"], flags["learning_rate"], flags["max_iters"]) == \
        ("4", "128", "0.002", "1500")
    assert flags["lr_decay_iters"] == flags["max_iters"] and flags["eval_interval"] == "100"


def test_the_nanogpt_arm_reads_train_pys_iteration_lines_and_leaves_its_evaluations_out():
    iter_num, lossf, dt, running_mfu = 12, 2.34567, 0.15234, -1.0
    line = f"iter {iter_num}: loss {lossf:.4f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%"  # train.py's print
    assert ITERATION.match(line).groups() == ("12", "152.34")
    # Steps 0..5, evaluations (and saves) at the start of steps 0 and 4: step 4 took 0.5 s more than
    # the median iteration (0.1 s), which is evaluation time, not training.
    times = {0: 2.0, 1: 0.1, 2: 0.1, 3: 0.12, 4: 0.6, 5: 0.1}
    trained, evaluating = train_seconds(times, interval=4, warmup=1, steps=6)
    assert trained == pytest.approx(0.1 + 0.1 + 0.12 + 0.1 + 0.1)
    assert evaluating == pytest.approx(0.5)


def test_an_ablation_row_compares_an_arm_with_the_one_before_it():
    results = {"adamw": [run(2.30, [(350, 50.0, 2.30)]), run(2.24, [(350, 50.0, 2.24)])],
               "+muon": [run(1.76, [(350, 60.0, 1.76)]), run(1.75, [(350, 60.0, 1.75)])]}
    rows = stepwise(results)
    assert rows[2] == "| adamw | 2.2700 ± 0.0424 |  |  |"
    _, p = welch([1.76, 1.75], [2.30, 2.24])
    assert rows[3] == f"| +muon | 1.7550 ± 0.0071 | -0.5150 | {p:.2g} |"


def test_an_arm_at_a_checkout_runs_that_checkouts_copy_of_the_bench(tmp_path):
    script = REPO / "bench" / "bench_time_to_loss.py"
    assert split_arm("fast") == ("fast", script)
    assert split_arm(f"fast@{tmp_path}") == ("fast", tmp_path / "bench" / "bench_time_to_loss.py")
    refused = subprocess.run([sys.executable, script, "--arms", f"fast@{tmp_path},fast"], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (f"bench_time_to_loss: no {tmp_path}/bench/bench_time_to_loss.py for the arm "
                                      f"fast@{tmp_path}: ARM@CHECKOUT needs a gptcore checkout there")
    # nanoGPT's arm through another checkout still needs nanoGPT, rather than running as a gptcore arm.
    refused = subprocess.run([sys.executable, script, "--arms", f"nanogpt@{REPO},fast"], capture_output=True, text=True,
                             timeout=120)  # without the check it would train a gptcore arm under that name
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "bench_time_to_loss: the arm nanogpt runs nanoGPT's own train.py: pass --nanogpt CHECKOUT")


def test_set_is_checked_against_every_arms_config_before_any_run(tmp_path, monkeypatch, capsys):
    script = REPO / "bench" / "bench_time_to_loss.py"
    for name in ("train.py", "model.py", "configurator.py"):  # what a nanoGPT checkout is known by
        (tmp_path / name).touch()
    bytes_config = tmp_path / "bytes.yaml"
    bytes_config.write_text("data:\n  vocab: bytes\n")
    odd_heads = tmp_path / "odd_heads.yaml"
    odd_heads.write_text("model:\n  n_embd: 100\n  n_head: 4\n")
    for extra, message in [
        (["--arms", "finetune,fast", "--set", "train.dtyp=float32"],
         "bench_time_to_loss: --set: unknown config key 'train.dtyp'; did you mean train.dtype?"),
        (["--arms", "fast", "--set", "train.dtype=float32", "--set", "model.n_head=5"],
         "bench_time_to_loss: --set: model.n_embd (128) must be divisible by model.n_head (5); try model.n_embd=125"),
        (["--arms", "baseline", "--config", "nosuch", "--set", "train.dtype=float32"],  # named as --config's, not --set's
         "bench_time_to_loss: argument --config: config 'nosuch' is neither a YAML file nor a preset; presets: cpu, "
         "fast, finetune, large, seed, shakespeare_char, tiny (see --help)"),
        (["--arms", "baseline,+rotary", "--config", str(odd_heads), "--set", "train.dtype=float32"],
         f"bench_time_to_loss: the arm +rotary cannot run on --config {odd_heads}: model.position=rotary rotates pairs "
         "of channels: the head size n_embd/n_head = 25 must be even"),
        (["--arms", "baseline,nanogpt", "--nanogpt", str(tmp_path), "--set", "train.dtype=float32"],
         "bench_time_to_loss: --set changes gptcore's config; the arm nanogpt runs nanoGPT's train.py"),
        # nanoGPT's arm on a recipe its train.py lacks: refused before the baseline's first run, not after it.
        (["--arms", "baseline,nanogpt", "--nanogpt", str(tmp_path), "--config", "fast"],
         "bench_time_to_loss: the nanogpt arm takes the baseline's recipe (AdamW, cosine, GPT-2's block); --config "
         "fast has optimizer muon, schedule wsd"),
        (["--arms", "nanogpt", "--nanogpt", str(tmp_path), "--config", str(bytes_config)],
         "bench_time_to_loss: the nanogpt arm needs a character vocabulary (nanoGPT's meta.pkl): data.vocab chars, "
         "and --data a text or a directory prepared with characters"),
    ]:
        monkeypatch.setattr(sys, "argv", [str(script), *extra])  # in this process: main() refuses before any run
        with pytest.raises(SystemExit) as refused:
            bench_time_to_loss.main()
        assert refused.value.code == 2 and capsys.readouterr() == ("", message + "\n")


def test_a_json_path_that_cannot_be_written_is_refused_before_any_run(tmp_path):
    for script in ("bench_time_to_loss", "bench_runtimes", "bench_quantize"):
        refused = subprocess.run([sys.executable, REPO / "bench" / f"{script}.py", "--json", str(tmp_path)],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and refused.stdout == "", (script, refused.stdout, refused.stderr)
        assert refused.stderr.strip() == f"{script}: --json {tmp_path} is a directory, not a file; choose another --json"


def test_report_refuses_a_file_it_cannot_read_in_one_line(tmp_path):
    script = REPO / "bench" / "bench_time_to_loss.py"
    (tmp_path / "list.json").write_text("[1]")
    for path, reason in [(tmp_path / "absent.json", "No such file"), (tmp_path / "list.json", "list indices")]:
        refused = subprocess.run([sys.executable, script, "--report", str(path)], capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 2 and refused.stdout == "" and len(refused.stderr.strip().splitlines()) == 1
        assert refused.stderr.startswith(f"bench_time_to_loss: cannot read runs from {path} (")
        assert reason in refused.stderr
        assert refused.stderr.strip().endswith("; give a file that --json wrote")


def test_one_run_stops_at_the_first_evaluation_that_reaches_stop_at(corpus):
    def one(stop_at: float) -> dict:
        done = subprocess.run([sys.executable, REPO / "bench" / "bench_time_to_loss.py", "--one", "--preset", "tiny",
                               "--overrides", '["train.max_iters=30", "train.warmup_iters=2"]', "--data", str(corpus),
                               "--every", "10", "--eval-from", "0", "--warmup", "2", "--eval-rows", "4",
                               "--stop-at", str(stop_at)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    # Any loss is below 100, so the first pass (step 10) stops the run; 0 never does.
    stopped, whole = one(100.0), one(0.0)
    assert [point["step"] for point in stopped["curve"]] == [10]
    assert [point["step"] for point in whole["curve"]] == [10, 20, 30]
    assert stopped["curve"][0]["val"] == whole["curve"][0]["val"]  # the same run up to there
