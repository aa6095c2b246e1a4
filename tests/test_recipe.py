"""The recipe: Muon, the warmup-hold-decay schedule and the block options, through everything a
model goes through (train, resume on one and two ranks, decode with and without the cache,
compiled decode, quantization, FSDP, init_from, export), and their bad values refused in one line."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_one_line_error, gptcore_here, run_gptcore, step_losses
from gptcore.config import ModelConfig, TrainConfig, load_config
from gptcore.inference.quantize import model_from_quantized, quantized_checkpoint
from gptcore.models.gpt import GPT, ReLUSquared, parameter_count
from gptcore.models.optim import Muon, MuonAdamW, lr_factor, make_optimizer, orthogonalize

# Each block option alone at a value away from GPT-2's, and all of them together.
OPTIONS = {
    "rotary": {"position": "rotary"},
    "qk_norm": {"qk_norm": True},
    "rmsnorm": {"norm": "rmsnorm"},
    "relu2": {"mlp": "relu2"},
    "untied": {"tie_head": False},
    "zero_init": {"zero_init_proj": True},
    "softcap": {"logit_softcap": 8.0},
}
ALL = {key: value for option in OPTIONS.values() for key, value in option.items()}
ALL_OVERRIDES = [f"model.{key}={value}" for key, value in ALL.items()]
RECIPE = ["train.optimizer=muon", "train.schedule=wsd", "train.decay_frac=0.4", *ALL_OVERRIDES]
TINY = ["--config", "tiny", "train.device=cpu", "train.log_interval=1", "train.sample_tokens=0"]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, corpus) -> Path:
    """A tiny run with Muon, wsd and every block option, whose checkpoint the tests only read."""
    run = tmp_path_factory.mktemp("recipe") / "run"
    assert run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run}", *RECIPE).returncode == 0
    return run


def options_model(options: dict, seed: int = 0, **shape) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 40,
                            "dropout": 0.0, **shape, **options})
    model = GPT(config).eval()
    if config.zero_init_proj:  # a model that has trained: its projections are no longer zero
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("c_proj.weight"):
                    param.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("name", [*OPTIONS, "all"])
def test_each_block_option_decodes_the_same_tokens_with_and_without_the_cache(name):
    options = ALL if name == "all" else OPTIONS[name]
    model = options_model(options)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    # 40 new tokens through a 16-token window: the cache is refilled as the window slides.
    cached = model.generate(prompt, 40, temperature=0.0)
    recomputed = model.generate(prompt, 40, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)
    full, _ = model(cached[:, :16], cached[:, 1:17])
    cache = model.kv_cache(2, torch.device("cpu"), torch.float32)
    model(cached[:, :10], cache=cache, pos=torch.arange(10))
    step = model.decode_step(cached[:, 10:11], torch.tensor([10]), cache)
    assert torch.allclose(step[:, -1], full[:, 10], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_gives_autograds_values_and_gradients_bit_for_bit(dtype):
    h = torch.randn(4, 8, 64, dtype=dtype)
    h[0, 0, :4] = 0.0  # relu's kink: autograd's gradient there is 0
    grad = torch.randn_like(h)
    ours, reference = h.clone().requires_grad_(), h.clone().requires_grad_()
    out = ReLUSquared.apply(ours)
    expected = torch.relu(reference).square()
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(out, expected) and torch.equal(ours.grad, reference.grad)
    assert torch.autograd.gradcheck(ReLUSquared.apply, torch.randn(3, 5, dtype=torch.float64, requires_grad=True))


@pytest.mark.slow
def test_a_compiled_training_step_with_every_block_option_equals_the_eager_one():
    """What a GPU run does by default (train.compile=auto): one graph for the whole model, ReLU²'s
    autograd Function included, with eager's loss and gradients."""
    model = options_model(ALL).train()
    x = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(2))
    losses, grads = [], []
    for forward in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        _, loss = forward(x, x)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_the_options_change_what_they_say_and_default_to_gpt2():
    gpt2 = options_model({})
    assert "wpe" in gpt2.transformer and gpt2.lm_head.weight is gpt2.transformer.wte.weight
    rotary = options_model(OPTIONS["rotary"])
    assert "wpe" not in rotary.transformer
    untied = options_model(OPTIONS["untied"])
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    torch.manual_seed(0)
    zero = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40, zero_init_proj=True))
    assert all(not p.any() for n, p in zero.named_parameters() if n.endswith("c_proj.weight"))
    capped = options_model(OPTIONS["softcap"], n_embd=32)
    with torch.no_grad():
        capped.lm_head.weight.mul_(1000)  # huge logits: the cap holds them
    logits, _ = capped(torch.randint(0, 40, (1, 8)))
    assert logits.abs().max() <= 8.0
    # A position-free model still tells positions apart (rotary), so permuting a prompt changes it.
    x = torch.randint(0, 40, (1, 8), generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(rotary(x)[0], rotary(x.flip(1))[0])


def test_the_compiled_decode_step_with_every_option_picks_the_eager_tokens():
    torch._dynamo.reset()
    model = options_model(ALL)
    prompt = torch.randint(0, 40, (1, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.generate(prompt, 20, temperature=0.0, compile=True),
                       model.generate(prompt, 20, temperature=0.0))


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_quantized_models_with_every_option_stay_close_to_fp32(mode):
    model = options_model(ALL, n_embd=64, n_head=2)
    config = load_config(None, [f"model.{k}={v}" for k, v in ALL.items()] + [
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=16", "model.dropout=0"])
    config.model.vocab_size = 40
    state = {"config": config.to_dict(), "vocab": [chr(65 + i) for i in range(40)], "model": model.state_dict()}
    quantized, kind = model_from_quantized(quantized_checkpoint(state, mode, 32), config)
    assert kind == mode
    x = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, reference = model(x, x)
        _, loss = quantized(x, x)
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()


def test_wsd_warms_up_holds_then_decays_linearly_to_min_lr():
    t = TrainConfig(max_iters=100, warmup_iters=10, lr=1e-3, min_lr=1e-5, schedule="wsd", decay_frac=0.3)
    factors = [lr_factor(step, t) for step in range(101)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert all(f == 1.0 for f in factors[10:71])  # hold until 70% of the steps
    decay = factors[70:101]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.01)  # min_lr / lr
    assert factors[85] == pytest.approx(1 - 0.5 * 0.99)  # halfway down, a straight line
    # cosine, unchanged: lr/10 at the end, halfway at the middle of the decay
    c = TrainConfig(max_iters=110, warmup_iters=10, lr=1e-3)
    assert lr_factor(110, c) == pytest.approx(0.1) and lr_factor(60, c) == pytest.approx(0.55)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    config = load_config("tiny", ["train.optimizer=muon", "model.tie_head=false"])
    config.model.vocab_size = 30
    model = GPT(config.model)
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, MuonAdamW)
    muon = {id(p) for g in optimizer.parts["muon"].param_groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in muon}
    assert names == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    adamw = {id(p) for g in optimizer.parts["adamw"].param_groups for p in g["params"]}
    assert adamw | muon == {id(p) for p in model.parameters()} and not adamw & muon


def test_muons_fp32_orthogonalization_is_pytorchs_newton_schulz_in_fp32(monkeypatch):
    """Where bf16 matmuls are emulated, Muon orthogonalizes in fp32: PyTorch's iteration itself
    (bit for bit in bf16), and with it in fp32, PyTorch's whole update bit for bit."""
    from torch.optim import _muon  # PyTorch's own Newton-Schulz, the reference

    coefficients, eps = (3.4445, -4.7750, 2.0315), 1e-7
    for shape in ((48, 16), (16, 48), (16, 16)):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        assert torch.equal(orthogonalize(grad, coefficients, 5, eps, torch.bfloat16),
                           _muon._zeropower_via_newtonschulz(grad, coefficients, 5, eps))
    monkeypatch.setattr(_muon, "_zeropower_via_newtonschulz",
                        lambda grad, coefficients, steps, eps: orthogonalize(grad, coefficients, steps, eps,
                                                                             torch.float32))
    torch.manual_seed(0)
    ours, theirs = torch.randn(48, 16), torch.randn(16, 48)
    params = {"ours": [ours, theirs], "pytorch": [ours.clone(), theirs.clone()]}
    kwargs = dict(lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, adjust_lr_fn="original")
    optimizers = {"ours": Muon(params["ours"], torch.float32, **kwargs),
                  "pytorch": torch.optim.Muon(params["pytorch"], **kwargs)}
    for _ in range(3):
        grads = [torch.randn(p.shape) for p in params["ours"]]
        for name, optimizer in optimizers.items():
            for param, grad in zip(params[name], grads):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(params["ours"], params["pytorch"]):
        assert torch.equal(a, b)
    assert all(torch.equal(optimizers["ours"].state[a]["momentum_buffer"],
                           optimizers["pytorch"].state[b]["momentum_buffer"])
               for a, b in zip(params["ours"], params["pytorch"]))


@pytest.mark.slow
def test_a_muon_run_with_every_option_resumes_bit_identically(tmp_path, corpus):
    common = [*TINY, f"data.path={corpus}", "train.max_iters=24", *RECIPE]
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = run_gptcore("train", *common, f"out_dir={straight}")
    assert done.returncode == 0, done.stderr
    assert "optimizer=muon schedule=wsd" in done.stdout
    assert run_gptcore("train", *common, f"out_dir={split}", "train.stop_at=11").returncode == 0
    resumed = run_gptcore("train", *common, f"out_dir={split}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 11" in resumed.stdout
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, split))
    assert set(a["optimizer"]) == {"muon", "adamw"} and a["optimizer"]["muon"]["state"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    losses = step_losses(straight)
    assert losses == step_losses(split) and losses[24] < losses[1] - 0.5
    # Resuming it with AdamW cannot load Muon's state: one line, before anything is written.
    refused = run_gptcore("train", *common, f"out_dir={split}", "resume=auto", "train.max_iters=30",
                          "train.optimizer=adamw")
    assert_one_line_error(refused, 2, "train.optimizer=muon (asked adamw)")


@pytest.mark.parametrize("optimizer, tolerance", [
    ("adamw", 1e-5),
    # Muon orthogonalizes in bf16 where the CPU has it in hardware: two ranks' gradients differ from one rank's
    # in the last fp32 bits (the order of the all-reduce's sums), which can move an update by one
    # bf16 step, ~lr * 2^-8 = 8e-5 at muon_lr 0.02. Within a world size, resume is bit-identical.
    ("muon", 2e-4),
])
@pytest.mark.slow
def test_a_two_rank_run_resumes_a_one_rank_checkpoint(optimizer, tolerance, tmp_path, corpus):
    common = [*TINY, f"data.path={corpus}", *RECIPE, f"train.optimizer={optimizer}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    assert run_gptcore("train", *common, f"out_dir={one}").returncode == 0
    assert run_gptcore("train", *common, f"out_dir={mixed}", "train.stop_at=10").returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    two = subprocess.run([*torchrun, "-m", "gptcore", "train", *common, f"out_dir={mixed}", "resume=auto"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "world_size=2" in two.stdout
    a, b = step_losses(one), step_losses(mixed)
    assert set(a) == set(b) and max(abs(a[s] - b[s]) for s in a) < tolerance


@pytest.mark.slow
def test_fine_tuning_from_a_recipe_checkpoint_keeps_its_options(tmp_path, corpus, recipe_run):
    tuned = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={tmp_path / 'tuned'}",
                        f"train.init_from={recipe_run / 'ckpt.pt'}", "train.max_iters=5", "train.optimizer=muon")
    assert tuned.returncode == 0, tuned.stderr
    saved = torch.load(tmp_path / "tuned" / "ckpt.pt", weights_only=True)["config"]["model"]
    assert saved["position"] == "rotary" and saved["tie_head"] is False and saved["mlp"] == "relu2"


@pytest.mark.slow
def test_fsdp_trains_the_block_options_and_refuses_muon(tmp_path, corpus):
    fsdp = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={tmp_path / 'fsdp'}", "train.parallel=fsdp",
                       "train.max_iters=6", *ALL_OVERRIDES)
    assert fsdp.returncode == 0, fsdp.stderr
    plain = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={tmp_path / 'plain'}", "train.max_iters=6",
                        *ALL_OVERRIDES)
    a, b = step_losses(tmp_path / "fsdp"), step_losses(tmp_path / "plain")
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4
    refused = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={tmp_path / 'muon'}",
                          "train.parallel=fsdp", "train.optimizer=muon")
    assert_one_line_error(refused, 2, "train.optimizer=muon", "train.parallel=fsdp")
    assert not (tmp_path / "muon").exists()


def test_a_recipe_model_samples_quantizes_and_refuses_gpt2_exports_in_one_line(tmp_path, capsys, recipe_run):
    run = recipe_run
    fp32 = gptcore_here(capsys, "sample", "--ckpt", run / "ckpt.pt", "--tokens", "30", "--temperature", "0")
    assert fp32.returncode == 0, fp32.stderr
    quantized = gptcore_here(capsys, "quantize", "--ckpt", run / "ckpt.pt", "--mode", "int8", "--out",
                             run / "ckpt_int8.pt")  # beside the run's data, which eval reads
    assert quantized.returncode == 0, quantized.stderr
    evaluated = gptcore_here(capsys, "eval", "--ckpt", run / "ckpt_int8.pt")
    assert evaluated.returncode == 0, evaluated.stderr
    for fmt in ("hf", "nanogpt"):
        refused = gptcore_here(capsys, "export", "--ckpt", run / "ckpt.pt", "--format", fmt, "--out", tmp_path / fmt)
        assert_one_line_error(refused, 2, "model.position=rotary", "model.tie_head=False", "--format gptcore")
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("override, fragment", [
    ("train.decay_frac=-0.1", "train.decay_frac must be in [0, 1]"),
    ("train.muon_lr=0", "train.muon_lr must be positive"),
    ("train.optimizer=sgd", "train.optimizer must be one of adamw, muon"),
    ("train.schedule=step", "train.schedule must be one of cosine, wsd"),
    ("model.position=alibi", "model.position must be one of learned, rotary"),
    ("model.rope=true", "unknown config key 'model.rope'"),
    ("model.logit_softcap=-1", "model.logit_softcap must not be negative"),
    ("train.muon_momentum=1.5", "train.muon_momentum must be in [0, 1)"),
])
def test_bad_recipe_values_are_one_line_each(override, fragment, capsys, tmp_path):
    result = gptcore_here(capsys, "train", "--config", "tiny", override, f"out_dir={tmp_path / 'run'}")
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "run").exists()


def test_the_fast_preset_is_the_cpu_shape_with_the_recipe():
    fast, cpu = load_config("fast"), load_config("cpu")
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        assert getattr(fast.model, key) == getattr(cpu.model, key)
    assert fast.train.batch_size == cpu.train.batch_size
    assert fast.train.optimizer == "muon" and fast.train.schedule == "wsd"
    assert fast.train.max_iters < cpu.train.max_iters
    assert math.isfinite(fast.train.muon_lr)


@pytest.mark.slow
def test_checkpoints_with_nan_weights_or_the_wrong_shapes_are_refused_in_one_line(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run}", "train.max_iters=4").returncode == 0
    state = torch.load(run / "ckpt.pt", weights_only=True)
    state["model"]["transformer.h.1.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")  # valid checksums, poisoned weights
    for command in (["sample", "--ckpt", tmp_path / "nan.pt"], ["eval", "--ckpt", tmp_path / "nan.pt"],
                    ["quantize", "--ckpt", tmp_path / "nan.pt", "--mode", "int8", "--out", tmp_path / "q.pt"],
                    ["export", "--ckpt", tmp_path / "nan.pt", "--format", "hf", "--out", tmp_path / "hf"]):
        refused = gptcore_here(capsys, *command)
        assert_one_line_error(refused, 2, "NaN or infinite weights (transformer.h.1.mlp.c_fc.weight)")
    assert not (tmp_path / "q.pt").exists() and not (tmp_path / "hf").exists()
    tuned = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={tmp_path / 'tuned'}",
                        f"train.init_from={tmp_path / 'nan.pt'}")
    assert_one_line_error(tuned, 2, "NaN or infinite weights")
    torch.save(state, run / "ckpt.pt")
    resumed = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run}", "resume=auto",
                          "train.max_iters=8")
    assert_one_line_error(resumed, 2, "NaN or infinite weights")
    state["model"]["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shape.pt")
    wrong = gptcore_here(capsys, "sample", "--ckpt", tmp_path / "shape.pt")
    assert_one_line_error(wrong, 2, "size mismatch")
