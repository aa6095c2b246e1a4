"""Every configuration key, its type and default, in one place.

A run's config is: dataclass defaults <- a named preset or YAML file <- `key=value` overrides.
Keys are dotted (`model.n_layer=4`, `train.lr=3e-4`, `out_dir=runs/x`); each value is parsed by
the type of the field it sets, and a key that does not exist names the closest one that does.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from gptcore.errors import UserInputError, shown

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 512
    dropout: float = 0.2
    bias: bool = False
    vocab_size: int = 0  # filled in from the data's vocabulary
    # Block options (modded-nanogpt's); the defaults are GPT-2's, which every export format expresses.
    position: str = "learned"  # learned: a position embedding table | rotary: RoPE on queries and keys
    norm: str = "layernorm"  # layernorm | rmsnorm (no mean, no bias)
    qk_norm: bool = False  # RMS-normalize each head's queries and keys before attention
    mlp: str = "gelu"  # gelu | relu2 (ReLU squared)
    tie_head: bool = True  # the LM head shares the token embedding's weights
    zero_init_proj: bool = False  # output projections (attention and MLP c_proj) start at zero
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0: off


@dataclass
class DataConfig:
    path: str = "shakespeare"  # a text file, a prepared directory, or a named corpus
    clean: str = "none"  # none | seed
    vocab: str = "chars"  # chars: the text's characters | bytes: UTF-8 bytes, one vocabulary for every text


@dataclass
class TrainConfig:
    max_iters: int = 5000
    stop_at: int = 0  # end this session early at this step with a checkpoint; resume=auto goes on
    batch_size: int = 64  # global under strong scaling, per rank under weak scaling
    grad_accum: int = 1
    scaling: str = "strong"  # strong | weak
    optimizer: str = "adamw"  # adamw | muon: Muon on the blocks' matrices, AdamW (lr, weight_decay) on the rest
    lr: float = 3e-4  # AdamW's peak learning rate
    min_lr: float = 0.0  # 0 means lr / 10; every group decays to the same fraction of its peak
    warmup_iters: int = 100
    schedule: str = "cosine"  # cosine: warmup, cosine decay to min_lr | wsd: warmup, hold, linear decay
    decay_frac: float = 0.5  # wsd: the last fraction of max_iters that decays linearly to min_lr
    muon_lr: float = 0.02  # Muon's peak learning rate (torch.optim.Muon, adjust_lr_fn="original")
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_iters: int = 20
    log_interval: int = 10
    ckpt_interval: int = 500  # steps between checkpoints; 0: only at the end, at stop_at and on preemption
    ckpt_background: bool = True  # write checkpoints in a background thread (the loop waits only for a copy)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 autocast where the GPU or CPU does bf16 natively | float32 | bfloat16
    compile: str = "auto"  # auto: torch.compile on CUDA, not on the CPU (where it did not pay) | true | false
    deterministic: bool = False  # bit-identical runs on CUDA too: deterministic kernels, no TF32 (slower)
    parallel: str = "ddp"  # ddp: a whole copy per rank | fsdp: each rank holds 1/N (FSDP2), sharded checkpoints
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (ZeRO-3); false: keep (ZeRO-2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward, for memory
    single_rank_group: bool = False  # one rank still forms a process group and wraps DDP (measures DDP's cost)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 looks the card up (gptcore/telemetry/hardware.py)
    init_from: str = ""  # start from this fp32 checkpoint's weights (fresh optimizer and schedule): fine-tuning
    threads: int = 0  # torch intra-op threads per rank; 0: OMP_NUM_THREADS, else the rank's share of the CPUs
    cpu_ranks: int = 0  # share the CPUs as if this many ranks ran on the node (a sweep: its largest size)
    sample_tokens: int = 200  # text generated at the end of training; 0 for none
    timeout_s: int = 300  # the longest a rank waits on the others (start-up, eval, checkpoints); then it fails
    step_timeout_s: float = 0.0  # the longest one step may wait, once past the first log; 0: 10x a window, >= 60 s
    requeue: bool = True  # on SIGUSR1 under Slurm: checkpoint, then requeue the job (scontrol requeue)


@dataclass
class ProfileConfig:
    phases: bool = True  # per-phase step timers (CUDA events on a GPU, read at log steps)
    comm: bool = True  # time each gradient bucket's all-reduce (a DDP communication hook)
    cprofile: bool = False
    torch: bool = False
    torch_start: int = 5  # first step of the torch.profiler window
    torch_steps: int = 3
    sampler: bool = True
    sampler_interval: float = 1.0


@dataclass
class LogConfig:
    tensorboard: str = "auto"  # event files in RUN_DIR/tb/; auto: on where the tensorboard package is installed
    wandb: str = "off"  # off | offline (compute nodes without internet: `wandb sync` later) | online
    wandb_project: str = "gptcore"
    run_name: str = ""  # the W&B run's name; empty: the run directory's name (and the Slurm job id)


@dataclass
class Config:
    out_dir: str = "runs/default"
    resume: str = "never"  # never | auto
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # The dotted keys a preset, YAML file or override set (load_config): what the user asked for,
    # as against the defaults; train.init_from takes every other model key from its checkpoint.
    given_keys: ClassVar[frozenset] = frozenset()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def key_table(config: Config) -> list[tuple[str, str, object, str]]:
    """Every dotted key as (key, type, its value in `config`, what it does): the help is the
    comment on the key's line in this file, so the listing and the code cannot drift apart."""
    rows = []
    sections = [("", config), *((f.name, getattr(config, f.name)) for f in fields(config)
                                if dataclasses.is_dataclass(getattr(config, f.name)))]
    for prefix, section in sections:
        notes = dict(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.*)$", inspect.getsource(type(section)), re.M))
        for f in fields(section):
            value = getattr(section, f.name)
            if not dataclasses.is_dataclass(value):
                rows.append((f"{prefix}.{f.name}" if prefix else f.name, type(value).__name__, value, notes.get(f.name, "")))
    return rows


CHOICES = {
    "resume": ("never", "auto"),
    "data.clean": ("none", "seed"),
    "data.vocab": ("chars", "bytes"),
    "model.position": ("learned", "rotary"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "relu2"),
    "train.scaling": ("strong", "weak"),
    "train.optimizer": ("adamw", "muon"),
    "train.schedule": ("cosine", "wsd"),
    "train.parallel": ("ddp", "fsdp"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "float32", "bfloat16"),
    "train.compile": ("auto", "true", "false"),
    "log.tensorboard": ("auto", "true", "false"),
    "log.wandb": ("off", "offline", "online"),
}


SECTIONS = ("model", "data", "train", "profile", "log")
MAX_LAYERS = 1000  # deeper than any GPT trained; bounds the time to build a model from a header
# What a checkpoint's weights are laid out for: a resumed run must keep them.
ARCHITECTURE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.bias",
                     "model.position", "model.norm", "model.qk_norm", "model.mlp", "model.tie_head",
                     "model.logit_softcap")
# What a resumed run must keep besides its weights' layout: the optimizer's state has its shape.
RESUME_KEYS = ARCHITECTURE_KEYS + ("train.optimizer",)
# The block options and their GPT-2 values: an export to a GPT-2 format needs every one at its default.
BLOCK_OPTIONS = {"model.position": "learned", "model.norm": "layernorm", "model.qk_norm": False, "model.mlp": "gelu",
                 "model.tie_head": True, "model.logit_softcap": 0.0}


def all_keys(obj=None, prefix: str = "") -> dict[str, type]:
    """Every settable dotted key with the type of its field."""
    obj = obj if obj is not None else Config()
    keys = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.update(all_keys(value, prefix + f.name + "."))
        else:
            keys[prefix + f.name] = type(value)
    return keys


def parse_value(key: str, raw, kind: type):
    """Parse a string (from the command line) or a YAML scalar into the field's type."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise UserInputError(f"config key {key} needs true or false, got {shown(raw)}")
    if kind is int:
        if isinstance(raw, bool):
            raise UserInputError(f"config key {key} needs an integer, got {shown(raw)}")
        try:
            number = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise UserInputError(f"config key {key} needs an integer, got {shown(raw)}") from None
        if not number.is_integer():
            raise UserInputError(f"config key {key} needs an integer, got {shown(raw)}")
        return int(number)
    if kind is float:
        if isinstance(raw, bool):
            raise UserInputError(f"config key {key} needs a number, got {shown(raw)}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise UserInputError(f"config key {key} needs a number, got {shown(raw)}") from None
    if not isinstance(raw, (str, int, float, bool)):
        raise UserInputError(f"config key {key} needs a single value, got {shown(raw)}")
    if isinstance(raw, bool):  # YAML reads true/false (and on/off) as booleans: `compile: true`, `wandb: off`
        return ("off", "on")[raw] if "off" in CHOICES.get(key, ()) else ("false", "true")[raw]
    return str(raw)


# nanoGPT's names for our keys: its users type them out of habit.
NANOGPT_NAMES = {
    "learning_rate": "train.lr", "gradient_accumulation_steps": "train.grad_accum",
    "lr_decay_iters": "train.max_iters", "init_from": "train.init_from", "dataset": "data.path",
}


def closest_key(key: str, keys) -> str | None:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in NANOGPT_NAMES:
        return NANOGPT_NAMES[leaf]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(leaf, by_leaf, n=1, cutoff=0.6)
    return by_leaf[close[0]] if close else None


def set_key(config: Config, key: str, raw) -> None:
    keys = all_keys()
    if key not in keys:
        close = closest_key(key, keys)
        hint = f"; did you mean {close}?" if close else f"; valid keys: {', '.join(sorted(keys))}"
        raise UserInputError(f"unknown config key {key!r}{hint}")
    *parents, name = key.split(".")
    target = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, parse_value(key, raw, keys[key]))


def dotted_items(tree: dict, source: str) -> list[tuple[str, object]]:
    """(dotted key, value) pairs of a config tree, walked by the schema: sections are one level of
    plain keys, and nothing deeper is ever visited. A file from elsewhere (a checkpoint's config,
    a YAML file with aliases) can nest shared references that would unfold into billions of
    entries; those stay unvisited and fail as values of the wrong kind."""
    if not isinstance(tree, dict):
        raise UserInputError(f"{source} must be a mapping of keys to values")
    def name(key) -> str:
        if not isinstance(key, str):
            raise UserInputError(f"{source} has a key that is not a name ({shown(key)})")
        return key

    items = []
    for key, value in tree.items():
        if name(key) in SECTIONS:
            if not isinstance(value, dict):
                raise UserInputError(f"{source}: {key} must be a mapping of keys to values, got {shown(value)}")
            items += [(f"{key}.{name(inner_key)}", inner) for inner_key, inner in value.items()]
        else:
            items.append((key, value))
    return items


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(name_or_file: str) -> dict:
    path = Path(name_or_file)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_file}.yaml"
        if not path.is_file():
            raise UserInputError(
                f"config {name_or_file!r} is neither a YAML file nor a preset; "
                f"presets: {', '.join(preset_names())}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        detail = str(err).replace("\n", " ")
        raise UserInputError(f"config file {path} is not valid YAML: {detail}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UserInputError(f"config file {path} must be a mapping of keys to values")
    return tree


def parse_overrides(args: list[str]) -> dict[str, str]:
    overrides = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UserInputError(f"override {arg!r} is not of the form key=value (e.g. train.max_iters=100)")
        overrides[key.strip()] = value
    return overrides


def validate(config: Config) -> Config:
    for key, allowed in CHOICES.items():
        value = config.to_dict()
        for part in key.split("."):
            value = value[part]
        if value not in allowed:
            raise UserInputError(f"config key {key} must be one of {', '.join(allowed)}, got {shown(value)}")
    m, t = config.model, config.train
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
        "model.block_size": m.block_size, "train.max_iters": t.max_iters,
        "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.lr": t.lr,
        "train.muon_lr": t.muon_lr,
        "train.eval_interval": t.eval_interval, "train.eval_iters": t.eval_iters,
        "train.log_interval": t.log_interval, "train.timeout_s": t.timeout_s,
    }
    for key, value in positive.items():
        if not value > 0:
            raise UserInputError(f"config key {key} must be positive, got {value}")
    non_negative = {
        "train.warmup_iters": t.warmup_iters, "train.min_lr": t.min_lr,
        "train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip,
        "train.ckpt_interval": t.ckpt_interval, "train.threads": t.threads, "train.cpu_ranks": t.cpu_ranks,
        "train.sample_tokens": t.sample_tokens, "train.stop_at": t.stop_at,
        "train.peak_tflops": t.peak_tflops, "train.step_timeout_s": t.step_timeout_s,
        "train.muon_weight_decay": t.muon_weight_decay, "model.logit_softcap": m.logit_softcap,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UserInputError(f"config key {key} must not be negative, got {value}")
    if m.n_layer > MAX_LAYERS:
        raise UserInputError(f"config key model.n_layer={m.n_layer} is more than {MAX_LAYERS} layers; use fewer")
    if m.n_embd % m.n_head:
        raise UserInputError(
            f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}); "
            f"try model.n_embd={m.n_embd // m.n_head * m.n_head or m.n_head}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserInputError(f"config key model.dropout must be in [0, 1), got {m.dropout}")
    if not 0.0 <= t.decay_frac <= 1.0:
        raise UserInputError(f"config key train.decay_frac must be in [0, 1] (the decaying fraction of the steps), "
                             f"got {t.decay_frac}")
    if m.position == "rotary" and (m.n_embd // m.n_head) % 2:
        raise UserInputError(f"model.position=rotary rotates pairs of channels: the head size n_embd/n_head = "
                             f"{m.n_embd // m.n_head} must be even")
    if t.optimizer == "muon" and t.parallel == "fsdp":
        raise UserInputError("train.optimizer=muon orthogonalizes whole matrices, and under train.parallel=fsdp each "
                             "rank holds only a shard of each; use train.parallel=ddp with muon, or adamw with fsdp")
    for key, value in (("train.beta1", t.beta1), ("train.beta2", t.beta2), ("train.muon_momentum", t.muon_momentum)):
        if not 0.0 <= value < 1.0:
            raise UserInputError(f"config key {key} must be in [0, 1), got {value}")
    if config.profile.sampler_interval <= 0:
        raise UserInputError("config key profile.sampler_interval must be positive")
    return config


def load_config(name_or_file: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- preset or YAML file <- overrides, validated."""
    config, given = Config(), set()
    if name_or_file:
        for key, value in dotted_items(read_yaml(name_or_file), f"config {name_or_file}"):
            set_key(config, key, value)
            given.add(key)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
        given.add(key)
    config.given_keys = frozenset(given)
    return validate(config)


def config_from_dict(tree: dict, source: str = "the saved config") -> Config:
    """Rebuild and validate a Config saved in a checkpoint or config.yaml, exactly as a YAML file
    is checked: an untrusted file gets no more room than a user's own."""
    config = Config()
    for key, value in dotted_items(tree, source):
        set_key(config, key, value)
    return validate(config)


def resume_conflicts(saved: Config, requested: Config, keys=RESUME_KEYS) -> list[str]:
    """The keys (by default those a resumed run must keep) on which a checkpoint and the run that
    would resume it differ, as `key=saved (asked key=requested)`. Everything else may change on
    resume (see the README)."""
    conflicts = []
    for key in keys:
        section, name = key.split(".")
        was, now = getattr(getattr(saved, section), name), getattr(getattr(requested, section), name)
        if was != now:
            conflicts.append(f"{key}={was} (asked {now})")
    return conflicts


def non_gpt2_options(model: ModelConfig) -> list[str]:
    """The block options of a model set away from GPT-2's, as `key=value`: what a GPT-2 export cannot hold."""
    return [f"{key}={getattr(model, key.split('.')[1])}" for key, gpt2 in BLOCK_OPTIONS.items()
            if getattr(model, key.split(".")[1]) != gpt2]


def batch_split(config: Config, world_size: int) -> tuple[int, int]:
    """(rows per rank per micro-step, rows per micro-step across all ranks)."""
    t = config.train
    if t.scaling == "weak":
        return t.batch_size, t.batch_size * world_size
    if t.batch_size % world_size:
        raise UserInputError(
            f"train.batch_size={t.batch_size} is the global batch under strong scaling and must divide "
            f"evenly over {world_size} ranks; use a multiple of {world_size} or train.scaling=weak")
    return t.batch_size // world_size, t.batch_size


def write_yaml(config: Config, path: Path) -> None:
    from gptcore.files import atomic_write_bytes

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_bytes(Path(path), text.encode("utf-8"))
