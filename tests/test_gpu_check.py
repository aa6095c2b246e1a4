"""bench/gpu_check.sh --smoke: every section of the GPU check runs on the CPU at a tiny shape and
lands in the summary, the checks that can pass on a CPU pass, and the CUDA-only ones say so."""

import json
import subprocess

from conftest import REPO
from gptcore.metrics import read_metrics

SECTIONS = ("env", "train", "resume", "gpu_to_cpu", "inference", "decode", "shakespeare", "ddp", "fsdp")


def test_smoke_mode_runs_every_section_and_writes_the_summary(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((out / "summary.json").read_text())
    by_section = {}
    for row in rows:
        by_section.setdefault(row["section"].split(" (")[0], []).append(row)
    assert list(by_section) == list(SECTIONS)
    assert not [row for row in rows if row["ok"] is False], [row for row in rows if row["ok"] is False]
    checks = {row["check"]: row for row in rows}
    assert checks["two straight runs, deterministic"]["value"] == "bit-identical"
    assert checks["stopped at 20 + resumed vs straight"]["value"] == "bit-identical"
    assert by_section["gpu_to_cpu"] == [{"section": by_section["gpu_to_cpu"][0]["section"], "check": "-",
                                        "value": "skipped: no CUDA (smoke runs on the CPU)", "aim": "", "ok": None}]
    assert checks["int8 with --device auto"]["ok"] is True
    assert checks["DDP(compiled), 1-rank group"]["value"].startswith("backend gloo")
    assert checks["tiny FSDP vs DDP, 1 rank (eager)"]["value"].endswith("x)")
    assert checks["tiny FSDP memory, 1 rank"]["value"].startswith("state ")
    for label in ("fp32 eager", "fp32 compiled", "bf16 eager", "bf16 compiled"):
        assert checks[f"tiny decode batch 1, {label}"]["value"].endswith("GB/s")
    # The runs behind the rows are real: the compiled training run logged its steps.
    assert [r["step"] for r in read_metrics(out / "runs" / "train-compiled" / "metrics.jsonl") if "loss" in r][-1] == 40
    # The table is printed last, and is the file.
    printed = result.stdout.rstrip().splitlines()
    assert printed[-1] == f"gpu_check: summary in {out / 'summary.md'}"
    assert (out / "summary.md").read_text().strip() in result.stdout
    # A second check into the same directory is refused at once, before any section runs.
    again = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.strip() == (
        f"gpu_check: {out} holds an earlier check's runs; pass a new --out directory")
