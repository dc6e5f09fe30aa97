"""A tiny Llama and its tokenizer for the synthetic task, and a cached "pretrained base".

Everything here produces ordinary Hugging Face objects, so the rest of overmem treats the tiny
model exactly like a hub model: `AutoTokenizer.from_pretrained(folder)` and
`AutoModelForCausalLM.from_pretrained(folder)` load what `get_tiny_base()` returns.

Tokenizer: byte-level BPE trained on generator text, with every digit its own token (so
arithmetic is done digit by digit) and the two fixed parts of the paper's prompt template as
single added tokens (the prompt costs 2 tokens instead of ~40: sequences are short, training fast).
It round-trips any text exactly. A BOS token is prepended by the post-processor; EOS is not added
automatically: training code appends `tokenizer.eos_token_id` to the response (`overmem.data.encoding.encode_example`).

Base model: pretraining on an endless stream of generated problems (`synthetic.pretrain_stream`,
disjoint from every split), each with a fresh random solution path. It learns the arithmetic and
spreads its probability over all valid phrasings and orders, the state a real pretrained LLM is in
before finetuning. Cached under `$OVERMEM_CACHE` (default `~/.cache/overmem`) in
`tiny-base-<hash of the settings>/`, except the demo's own base: it ships inside the package
(`overmem/assets/demo_base/`, with `build.json` recording the settings, seed, versions, machine,
file hashes and the command that rebuilds it), so the demo starts without pretraining.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers import trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from overmem.data import synthetic
from overmem.data.encoding import encode_example
from overmem.data.example import PROMPT_TEMPLATE, Example
from overmem.data.synthetic_problems import sample_problem, sample_solution
from overmem.train.trainer import ResponseOnlyCollator

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
# The fixed text around the instruction, each made one token.
PROMPT_HEAD, PROMPT_TAIL = PROMPT_TEMPLATE.split("{instruction}")

# Words, single digits, runs of punctuation, whitespace: BPE merges only inside these pieces.
_PIECES = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+"


def _tokenizer_corpus(n_problems: int, seed: int) -> list[str]:
    """Generator text from every setting, with the pretraining text's products (so OOD words
    and everything the base model reads are in the vocabulary)."""
    rng = random.Random(seed)
    texts = []
    for split_settings in synthetic.SPLIT_SETTINGS.values():
        settings = replace(split_settings, product_prob=synthetic.PRETRAIN.product_prob)
        for _ in range(n_problems // len(synthetic.SPLIT_SETTINGS)):
            problem = sample_problem(settings, rng)
            texts.append(problem.question + "\n" + sample_solution(problem, rng))
    return texts


def build_tokenizer(vocab_size: int = 1024, n_problems: int = 2000, seed: int = 0
                    ) -> PreTrainedTokenizerFast:
    """Train the task tokenizer (deterministic in its arguments; ~1 s)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(n_problems, seed), trainer=trainer)
    tok.add_tokens([AddedToken(PROMPT_HEAD, normalized=False, special=False),
                    AddedToken(PROMPT_TAIL, normalized=False, special=False)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=1024)


@dataclass(frozen=True)
class TinyModelConfig:
    """Size of the tiny Llama (the vocabulary size comes from the tokenizer)."""

    hidden_size: int = 96
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 288
    max_position_embeddings: int = 512


def build_model(config: TinyModelConfig, tokenizer: PreTrainedTokenizerFast,
                seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given size, with the tokenizer's special ids."""
    torch.manual_seed(seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(llama)


# The pretraining stage writes problems in a plain format, not the paper's instruction template,
# so that (as with a real base LLM) finetuning has to teach the template: the base model scores
# low accuracy under the template at epoch 0, like the black stage of the paper's Figure 1.
PRETRAIN_FORMAT = "Question: {instruction}\nSolution:\n"


# A calculation as the solutions write it: "8 + 9 = <<8+9=17>>17".
_CALCULATION = re.compile(r"\d+(?: [-+*] \d+)+ = <<[^>]+>>-?\d+")
DRILL_QUESTION = "Work out each calculation."


def arithmetic_drill(problems: Iterator[Example], n_lines: int) -> Example:
    """A drill text: the calculations of the next problems' solutions, one per line.

    A real base LLM has seen far more arithmetic than word problems; a tiny model pretrained on
    word problems alone learns the phrasing long before the sums, and its weak sums then break
    under any finetuning. Drills drawn from the same solutions give it the same operations in the
    same format (and distribution) at a fraction of the tokens."""
    lines: list[str] = []
    while len(lines) < n_lines:
        lines.extend(_CALCULATION.findall(next(problems).response))
    return Example(id="drill", question=DRILL_QUESTION, response="\n".join(lines[:n_lines]), answer="",
                   kind="numeric")


class _PretrainStream(torch.utils.data.IterableDataset):
    """Endless (input_ids, labels) features of the pretraining stream, in the plain format:
    word problems, with a share `drill_frac` of arithmetic drills (`arithmetic_drill`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, seed: int, max_length: int,
                 drill_frac: float = 0.0, drill_lines: int = 8):
        self.tokenizer, self.seed, self.max_length = tokenizer, seed, max_length
        self.drill_frac, self.drill_lines = drill_frac, drill_lines

    def __iter__(self):
        rng = random.Random(f"{self.seed}:drills")
        problems = synthetic.pretrain_stream(seed=self.seed)
        drill_source = synthetic.pretrain_stream(seed=self.seed + 1)
        while True:
            if rng.random() < self.drill_frac:
                ex = arithmetic_drill(drill_source, self.drill_lines)
            else:
                ex = next(problems)
            ids, labels, _ = encode_example(self.tokenizer, ex, max_length=self.max_length, add_eos=True,
                                            template=PRETRAIN_FORMAT)
            yield {"input_ids": ids, "labels": labels}


@dataclass(frozen=True)
class PretrainConfig:
    """The base-model stage. Constant LR after warmup, then a short linear cool-down."""

    steps: int = 900
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    cooldown_steps: int = 150
    weight_decay: float = 0.0
    drill_frac: float = 0.0
    drill_lines: int = 8
    seed: int = 0
    vocab_size: int = 1024
    model: TinyModelConfig = TinyModelConfig()

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True) + _GENERATOR_VERSION
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


# Bump when the generator or tokenizer changes in a way that invalidates cached bases.
_GENERATOR_VERSION = "synthetic-v6"


class _LossLog(TrainerCallback):
    """Keeps the losses the Trainer logs (for `pretrain_info.json`) and shows a progress bar
    with the current loss (the Trainer's own bar would print every log line)."""

    def __init__(self, steps: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.losses: list[float] = []
        self.bar = tqdm(total=steps, desc="pretraining tiny base", disable=not progress)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def pretrain_base(out_dir: Path, cfg: PretrainConfig = PretrainConfig(),
                  progress: bool = True) -> Path:
    """Train the base model on the pretraining stream with the Hugging Face Trainer (constant LR
    after warmup, linear cool-down: the "warmup_stable_decay" schedule) and save model +
    tokenizer to `out_dir` (safetensors). Returns `out_dir`."""
    import tempfile

    tokenizer = build_tokenizer(cfg.vocab_size)
    model = build_model(cfg.model, tokenizer, seed=cfg.seed)
    log = _LossLog(cfg.steps, progress)
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.lr, weight_decay=cfg.weight_decay, adam_beta2=0.98, max_grad_norm=1.0,
            warmup_steps=cfg.warmup_steps, lr_scheduler_type="warmup_stable_decay",
            lr_scheduler_kwargs={"num_decay_steps": cfg.cooldown_steps},
            logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed, use_cpu=True,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=args,
            train_dataset=_PretrainStream(tokenizer, cfg.seed, cfg.model.max_position_embeddings,
                                          cfg.drill_frac, cfg.drill_lines),
            data_collator=ResponseOnlyCollator(tokenizer.pad_token_id), callbacks=[log],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    window = max(1, min(20, len(log.losses) // 5))  # mean of the last steps
    info = {"config": asdict(cfg), "seconds": round(time.time() - start, 1),
            "first_loss": log.losses[0], "last_loss": sum(log.losses[-window:]) / window}
    (out_dir / "pretrain_info.json").write_text(json.dumps(info, indent=2))
    return out_dir


def cache_dir() -> Path:
    """`$OVERMEM_CACHE`, or `~/.cache/overmem`."""
    return Path(os.environ.get("OVERMEM_CACHE", Path.home() / ".cache" / "overmem"))


# The demo's base, pretrained once and shipped in the package: the one model-weights file in the
# repository, made by this code (its build.json says how; `python -m overmem.demo --rebuild-base`).
SHIPPED_BASE = Path(__file__).resolve().parent / "assets" / "demo_base"
BUILD_RECORD = "build.json"
# The files whose sha256 build.json records (pretrain_info.json holds the build's wall time).
HASHED_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json")
# Versions that decide the weights, recorded with a build (overmem doctor compares them with the installed ones).
BUILD_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_build_record(folder: Path) -> dict:
    """`folder/build.json`; a ValueError naming the file when it is not a JSON object."""
    path = Path(folder) / BUILD_RECORD
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rebuild it with `python -m overmem.demo --rebuild-base`")
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a JSON object; rebuild it with `python -m overmem.demo --rebuild-base`")
    return record


def shipped_base(cfg: PretrainConfig) -> Path | None:
    """The base shipped in the package if it was built with the settings `cfg`, else None."""
    if not (SHIPPED_BASE / BUILD_RECORD).is_file():
        return None
    if read_build_record(SHIPPED_BASE).get("digest") != cfg.digest():
        return None
    return SHIPPED_BASE


def record_build(folder: Path, cfg: PretrainConfig, command: str) -> dict:
    """Write `folder/build.json`: how the base in `folder` was made (settings, seed, versions,
    machine, the command that rebuilds it) and what it is (parameter shapes, file hashes)."""
    from importlib.metadata import PackageNotFoundError, version

    from safetensors import safe_open

    folder = Path(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in sorted(f.keys())}
    n_params = 0
    for shape in shapes.values():
        size = 1
        for dim in shape:
            size *= dim
        n_params += size
    versions = {"python": platform.python_version()}
    for name in BUILD_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    info_path = folder / "pretrain_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    record = {
        "what": "the tiny base that `overmem demo` finetunes, pretrained by overmem.tiny.pretrain_base",
        "command": command,
        "config": asdict(cfg),
        "digest": cfg.digest(),
        "generator_version": _GENERATOR_VERSION,
        "seed": cfg.seed,
        "pretrain_seconds": info.get("seconds"),
        "first_loss": info.get("first_loss"),
        "last_loss": info.get("last_loss"),
        "versions": versions,
        "machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "parameters": n_params,
        "shapes": shapes,
        "sha256": {name: _sha256(folder / name) for name in HASHED_FILES if (folder / name).is_file()},
    }
    (folder / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def verify_base(folder: Path) -> list[str]:
    """What in `folder` disagrees with its build.json (empty: nothing): a file hash, the model
    config against the recorded settings, or a parameter's shape."""
    from safetensors import safe_open

    folder = Path(folder)
    record = read_build_record(folder)
    problems = []
    for name in HASHED_FILES:
        if name not in record.get("sha256", {}):
            problems.append(f"{name}: no sha256 recorded")
        elif not (folder / name).is_file():
            problems.append(f"{name}: missing")
        elif _sha256(folder / name) != record["sha256"][name]:
            problems.append(f"{name}: sha256 differs from build.json")
    model = record["config"]["model"]
    config = json.loads((folder / "config.json").read_text())
    for key, value in model.items():
        if config.get(key) != value:
            problems.append(f"config.json: {key} is {config.get(key)!r}, build.json's settings say {value!r}")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in sorted(f.keys())}
    if shapes != record["shapes"]:
        problems.append("model.safetensors: parameter names or shapes differ from build.json")
    return problems


# Threads of a recorded build: the float sums of a CPU kernel can depend on how the work is split
# between threads, so one thread everywhere takes that out of what differs between machines
# (docs/commands/demo.md); the tiny model gains little from more.
BUILD_THREADS = 1


def build_base(out_dir: Path, cfg: PretrainConfig, command: str, progress: bool = True,
               threads: int = BUILD_THREADS) -> Path:
    """Pretrain the base for `cfg` into `out_dir` (replacing what is there) on `threads` torch
    threads, and record the build."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pretrain_base(tmp, cfg, progress=progress)
        record_build(tmp, cfg, command)
    finally:
        torch.set_num_threads(before)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir


def get_tiny_base(cfg: PretrainConfig = PretrainConfig(), progress: bool = True) -> Path:
    """Folder of the pretrained tiny base for `cfg`: the shipped one when it was built with `cfg`,
    else the cached one, training it first if not cached."""
    shipped = shipped_base(cfg)
    if shipped is not None:
        return shipped
    folder = cache_dir() / f"tiny-base-{cfg.digest()}"
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    # Train into a private folder and rename, so a concurrent or interrupted run never leaves
    # a half-written base behind.
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    pretrain_base(tmp, cfg, progress=progress)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder

