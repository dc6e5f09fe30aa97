"""Typed run configuration: YAML in, validated objects out, `key.path=value` overrides.

Defaults follow the paper's Table 6 (Ruan et al. 2025, appendix B.2): AdamW, linear schedule,
100 warmup steps, 10 epochs, effective batch 128, LoRA r=64 / alpha=128 / dropout 0.05 on
q,k,v,up,down projections; tracked splits as in appendix B.1 (MetaTrain, MetaTest, GSM8K test).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# Bounds of counts that size a loop or an allocation: beyond them a setting is a typo, and would run
# (or allocate) without end before any result is written.
MAX_SEED = 2**32 - 1  # NumPy and the Trainer take seeds in [0, 2**32 - 1]
MAX_EPOCHS = 10_000
MAX_BOOTSTRAP = 100_000
# `generation.cache`: the Hugging Face backend's decoding (`overmem.hf_backend.HfBackend.decode`)
CacheName = Literal["auto", "pruned", "static", "dynamic"]
CACHES: tuple[str, ...] = get_args(CacheName)
MAX_TOKENS = 2**20  # a sequence or a generation; a static KV cache is allocated for this many positions


class _Strict(BaseModel):
    # No NaN or infinity in a setting: `lr: .inf` or `ppl_band: .nan` would pass the bounds below.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1; `epochs: yes` (YAML for true) is a mistake, not one epoch.
        if isinstance(v, bool) and info.field_name is not None:
            kinds = _types(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got {str(v).lower()}")
        return v


def _types(annotation: Any) -> set[Any]:
    """The types a field annotation admits (the members of a union, else itself)."""
    args = get_args(annotation)
    return set(args) if get_origin(annotation) in (Union, UnionType) else {annotation}


class ModelConfig(_Strict):
    """What to finetune: a hub id, a local Hugging Face folder, or a `.gguf` file."""

    name_or_path: str = "meta-llama/Llama-3.1-8B"
    tokenizer: str | None = Field(None, description="tokenizer source if not the model's own")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


class LoraSettings(_Strict):
    """Adapter settings; `alpha` and `target_modules` default to the method's Table 6 preset."""

    r: int = Field(64, gt=0)
    alpha: float | None = Field(None, gt=0, description="default: 128 (lora, wide_lora), 64 (pissa, milora)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="default: q,k,v,up,down (+o,gate for wide_lora)")


class TrainConfig(_Strict):
    method: Literal["full", "lora", "pissa", "milora", "wide_lora"] = Field(
        "lora", description="wide_lora = the paper's 'LoRA+' (extra o_proj, gate_proj targets)"
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    loss: Literal["ce", "mar", "focal"] = "ce"
    loss_gamma: float | None = Field(
        None, ge=0, description="focal exponent: mar is 1 (fixed), focal defaults to 2"
    )
    loss_detach_weight: bool = Field(True, description="treat the (1-p)^gamma weight as a constant")
    optimizer: str = "adamw_torch"
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="PEFT's LoRA+ optimizer: B matrices learn this many times faster"
    )
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay (the Trainer's default)")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam's second-moment decay; 0.95 is common for LLMs")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam's epsilon (added to the root of the second moment)")
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune (Jain et al. 2023): uniform noise of size alpha/sqrt(L*d) on the input "
        "embeddings while training (the Trainer's option; L tokens, hidden size d); default: off",
    )
    group_by_length: bool = Field(
        False, description="micro-batches of examples of similar length (the Trainer's LengthGroupedSampler): "
        "less padding (17% -> 5.5% of the tokens on examples/smollm2/overmem.yaml), but another order of "
        "training than the default's, so other figures",
    )
    scheduler: str = "linear"
    warmup_steps: int = Field(100, ge=0)
    epochs: int = Field(10, gt=0, le=MAX_EPOCHS)
    batch_size: int = Field(128, gt=0, description="effective batch size (per step), over all processes")
    micro_batch_size: int = Field(8, gt=0, description="examples per forward pass on each device (the per-device "
                                  "batch); accumulation = batch_size / (micro_batch_size x world_size)")
    world_size: int | None = Field(
        None, gt=0, description="processes training together; recorded by the run from its launcher (torchrun, "
        "accelerate launch); leave unset")
    fsdp: str | None = Field(None, description="FSDP mode, passed to TrainingArguments.fsdp, e.g. "
                             "'full_shard auto_wrap'; default: DDP when launched on several processes")
    fsdp_config: dict[str, Any] | None = Field(None, description="TrainingArguments.fsdp_config, e.g. "
                                               "{transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}")
    deepspeed: str | None = Field(None, description="path to a DeepSpeed JSON config (TrainingArguments.deepspeed)")
    max_length: int = Field(512, gt=8, le=MAX_TOKENS)
    seed: int = Field(42, ge=0, le=MAX_SEED)
    save_every_steps: int | None = Field(None, gt=0, description="extra checkpoints every K steps")
    report_to: list[str] = Field(default_factory=list)
    trainable: list[str] | None = Field(
        None, description="method full: train only the parameters whose name contains one of these "
        "strings (e.g. ['mlp']: the MLP blocks), freeze the rest; default: every parameter",
    )

    @model_validator(mode="after")
    def _accumulation_divides(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        return self

    @model_validator(mode="after")
    def _trainable_needs_full(self) -> TrainConfig:
        if self.trainable is not None and self.method != "full":
            raise ValueError("train.trainable: only with method: full (adapters choose their layers "
                             "with train.lora.target_modules)")
        if self.trainable is not None and not all(self.trainable):
            raise ValueError("train.trainable: empty name; give parts of parameter names such as 'mlp'")
        return self

    @model_validator(mode="after")
    def _gamma_fits_loss(self) -> TrainConfig:
        if self.loss == "mar" and self.loss_gamma not in (None, 1.0):
            raise ValueError("train.loss_gamma: MAR is gamma = 1; use loss: focal for another gamma")
        if self.loss == "ce" and self.loss_gamma:
            raise ValueError("train.loss_gamma: only used with loss: mar or focal")
        return self

    @property
    def gamma(self) -> float:
        """The focal exponent of the chosen loss (0 for plain cross-entropy)."""
        return {"ce": 0.0, "mar": 1.0}.get(self.loss, 2.0 if self.loss_gamma is None else self.loss_gamma)

    @property
    def grad_accum(self) -> int:
        """Micro-batches each process accumulates per optimizer step (`world_size` unset: 1 process)."""
        return self.batch_size // (self.micro_batch_size * (self.world_size or 1))


class DataConfig(_Strict):
    """Training data and tracked splits.

    `train` is a dataset spec (`name:split[a:b]` or a file). The monitored training subset
    ("train" split) and the validation set ("validation") follow the paper's B.1: the first
    from the training set, the second from the unseen remainder of the same source
    (`validation_source`, defaulting to the training source without its slice).
    """

    train: str = "metamathqa:train[:100000]"
    field_map: dict[str, str] | None = None
    data_dir: str | None = None
    monitor_size: int = Field(1319, gt=0)
    validation: str | None = Field(None, description="explicit validation spec instead of B.1")
    validation_size: int = Field(1319, gt=0)
    tests: dict[str, str] = Field(default_factory=lambda: {"gsm8k": "gsm8k:test"})
    test_size: int | None = Field(None, gt=0, description="seeded subsample of each test set")
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("tests")
    @classmethod
    def _no_reserved_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name in ("train", "validation"):
                raise ValueError(f"test split name {name!r} is reserved; pick another name")
        return v


class GenerationConfig(_Strict):
    """Decoding limits: the one place their defaults live (`overmem.generation.generate` and the
    analyses' `Decoding` take them from here)."""

    max_new_tokens: int = Field(512, gt=0, le=MAX_TOKENS)
    batch_size: int = Field(16, gt=0)
    stop_at_answer: bool = True
    reuse_drafts: bool = Field(
        True, description="greedy generations of a tracked split start from the previous checkpoint's: one "
        "teacher-forced pass keeps the prefix the model still chooses, decoding resumes only after it; the reference "
        "is a draft too, checked by the scoring pass for free (the same outputs, on both backends; "
        "`overmem.generation.generate_greedy`)")
    cache: CacheName = Field(
        "auto", description="KV cache during decoding (Hugging Face backend): 'pruned' decodes greedily with "
        "overmem's loop, which drops each row from its batch once it stops (about 1.4x as fast on the CPU, same "
        "outputs; sampling and models with logits processors or sliding-window layers take 'static' instead); "
        "'static' and 'dynamic' are transformers' generate with that cache; 'auto' = pruned on the CPU, dynamic "
        "on GPUs")


class VllmSettings(_Strict):
    """The vLLM engine of `eval.backend: vllm` (`overmem.vllm_backend`); None = chosen for the device."""

    gpu_memory_utilization: float | None = Field(
        None, gt=0, lt=1, description="share of GPU memory the engine takes (default 0.85); on the CPU, share of "
        "system RAM for the weights and KV cache (default: kv_cache_gib decides instead)")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV cache size in GiB (default on the CPU: 1; on "
                                       "GPUs: what gpu_memory_utilization leaves)")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs one engine spans")
    max_model_len: int | None = Field(None, gt=1, description="longest sequence (default: train.max_length + "
                                      "generation.max_new_tokens, at most the model's context length)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="weights' dtype in the engine (default: model.dtype, as the Hugging Face path)")
    enforce_eager: bool | None = Field(None, description="no CUDA graphs (default: on the CPU only)")
    max_lora_rank: int | None = Field(None, gt=0, description="largest adapter rank evaluated as an adapter "
                                      "(default: from train.lora.r; higher ranks are merged and loaded as models)")
    lora: Literal["adapter", "merge"] | None = Field(
        None, description="LoRA checkpoints as adapters on the engine's base, or merged by PEFT and loaded in "
        "place (default: adapter on GPUs, merge on the CPU, where vLLM's LoRA kernels are 2x slower)")
    python: str | None = Field(None, description="interpreter of the engine process, e.g. a virtualenv with "
                               "vLLM (default: $OVERMEM_VLLM_PYTHON, else this one)")
    start_timeout_s: float = Field(1200.0, gt=0, le=86400, description="seconds the engine may take to start (load "
                                   "the model, and on GPUs capture CUDA graphs) before it counts as failed")


class EvalConfig(_Strict):
    batch_size: int = Field(16, gt=0, description="examples per teacher-forced scoring pass")
    accuracy: bool = Field(True, description="generate and check answers (else perplexity only)")
    bootstrap: int = Field(1000, ge=100, le=MAX_BOOTSTRAP)
    confidence: float = Field(0.95, gt=0, lt=1)
    backend: Literal["hf", "vllm", "auto"] = Field(
        "hf", description="checkpoint evaluation (scoring and generation): Hugging Face, vLLM, or vLLM when it is "
        "installed and runs the model (`auto`)")
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    overlap: bool = Field(
        False, description="during `run`, evaluate each checkpoint in a second process while training goes on (the "
        "same results; for CPUs whose training leaves cores idle; one process, Hugging Face backend; "
        "`overmem.overlap`)")


class PhaseRule(_Strict):
    """The phase rule's settings (`overmem.phases` applies the rule itself): which split it reads
    and its thresholds.

    - `eps = 0.5`: perplexity counts as risen once it is 50% above its running minimum. In the
      paper's over-memorized states test ppl is 2-10x its minimum (Fig. 1 reaches 16; Table 1:
      HumanEval 1.66 -> 4.08, GPQA 4.5 -> 40), while epoch-to-epoch noise of a mean ppl over
      hundreds of examples is a few percent; 0.5 flags the onset early without firing on noise.
    - `delta = 0.05`: accuracy "stays high" if it is within 5 points of its best so far. For
      GSM8K test (n = 1319, accuracy ~0.7) the 95% bootstrap CI half-width is ~0.025, so a 5-point
      drop is beyond sampling noise. For small sets (HumanEval, n = 164: half-width ~0.075) raise
      delta to at least the CI half-width; `detect_phases` warns when it is smaller.
    - `learn_frac = 0.8`: the model has "learned" the task once accuracy reaches 80% of the best
      the run ever reaches; earlier checkpoints (the base model, the first rapid climb) form the
      paper's black low-accuracy region.
    """

    model_config = ConfigDict(frozen=True)

    split: str | None = Field(None, description="split the phases are read from (default: first test)")
    eps: float = Field(0.5, gt=0, description="over-memorized once ppl >= (1+eps) x its minimum so far")
    delta: float = Field(0.05, ge=0, description="... while accuracy stays within delta of its best so far")
    learn_frac: float = Field(0.8, gt=0, le=1, description="learned once accuracy >= learn_frac x best")


class SelectionConfig(_Strict):
    valid_split: str = "validation"
    ppl_band: float = Field(0.05, ge=0)


class AnalysisSettings(_Strict):
    """Base of each analysis's own settings model (`analysis.NAME.*`), declared with the analysis
    in `overmem.analysis.NAME`: the one place its defaults live."""


class AnalysisConfig(_Strict):
    """`overmem analyze` settings: `seed` seeds every sample and every sampled generation; then one
    section per registered analysis, typed by its own settings model (`analysis_config_model`)."""

    seed: int = Field(0, ge=0, le=MAX_SEED)


def analysis_config_model() -> type[AnalysisConfig]:
    """`AnalysisConfig` with one field per registered analysis, in registration order, each
    defaulting to that analysis's settings; unknown sections are refused like unknown fields."""
    from .analysis.base import ANALYSES  # here, not at the top: every analysis imports this module

    return _analysis_config_model(tuple((name, a.Settings) for name, a in ANALYSES.items()))


@cache  # one model class per set of analyses: an analysis registered later gets its own
def _analysis_config_model(sections: tuple[tuple[str, type[AnalysisSettings]], ...]) -> type[AnalysisConfig]:
    fields: dict[str, Any] = {name: (settings, Field(default_factory=settings)) for name, settings in sections}
    return create_model("AnalysisConfig", __base__=AnalysisConfig, __module__=__name__, **fields)


class RunConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    phases: PhaseRule = Field(default_factory=PhaseRule)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    analysis: SerializeAsAny[AnalysisConfig] = Field(default_factory=lambda: analysis_config_model()())
    merge: list[list[str]] = Field(
        default_factory=list,
        description="checkpoint groups merged at the end of `run` and tracked, e.g. [[epoch-3, epoch-10]]",
    )
    out_dir: str | None = None
    quiet: bool = False

    @field_validator("analysis", mode="before")
    @classmethod
    def _analysis_sections(cls, v: Any) -> Any:
        # Validated by the model with every analysis's section; its errors keep their field path.
        model = analysis_config_model()
        return v if isinstance(v, model) else model.model_validate(v)

    @field_validator("merge")
    @classmethod
    def _groups_of_two(cls, v: list[list[str]]) -> list[list[str]]:
        for group in v:
            if len(group) < 2:
                raise ValueError(f"merge group {group} needs two or more checkpoints")
        return v


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to fix."""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`1e-4`, `[a, b]`, `true`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty name in the key; expected key.path=value, e.g. train.lr=1e-4")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.load(value, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); "
                              "lists are [a, b], mappings {k: v}; quote text with special characters") from None
        except ConfigError as err:  # a mapping with a key given twice
            raise ConfigError(f"override {item!r}: {err}") from None
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The one-line gist of a YAML error: what went wrong and where (PyYAML's own text spans lines)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: field '{field}': {first['msg']}{extra}"


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    raw = {} if path is None else read_yaml(Path(path))
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, "config" if path is None else str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently,
    so `lr: 1e-4` ... `lr: 1e-3` further down would quietly win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    lines = f" (lines {seen[key]} and {line})" if seen[key] != line else ""
                    raise ConfigError(f"key {key!r} is given twice{lines}; keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: construct_mapping says so
                break
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML config file as a mapping (empty file: {}); a missing or unreadable one, or one with a
    key given twice, is a one-line error."""
    from .files import read_text

    try:
        text = read_text(path, "config file")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except ValueError as err:  # a folder or FIFO, unreadable, not UTF-8
        raise ConfigError(str(err)) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(err)}") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
