"""The contract of one analysis of `overmem analyze`, the registry, and what every analysis sees.

An analysis is one module of this package: its metric functions, a library runner (model,
tokenizer, examples -> `AnalysisResult`), and an `Analysis` subclass registered with `@register`:

    class MiaSettings(AnalysisSettings):       # `analysis.mia.*` of the run config: the only place
        size: int = Field(500, gt=0)           # its defaults live

    @register
    class Mia(Analysis[MiaSettings]):
        name = "mia"                           # `--suite` name; RUN/analysis/mia.json
        description = "Membership inference ..."
        Settings = MiaSettings

        def prepare(self) -> Prepared: ...     # what it needs: check settings, load data
        def run(self, data, model, tokenizer, progress) -> AnalysisResult: ...   # one checkpoint
        def columns(self, settings) -> list[tuple[str, str]]: ...   # table: (label, metric key)
        def finish(self, doc) -> None: ...     # optional: values across checkpoints
        def figures(self, doc, fresh) -> list[str] | None: ...      # optional

`overmem.analysis.suite` makes one instance per invocation, with the run's `Context` and the
analysis's own settings from the run config (`self.ctx`, `self.settings`), and runs it over the
checkpoints. The run config's `analysis` section has one entry per registered analysis
(`overmem.config.analysis_config_model`). Registration order is the order of the default suite,
of the config sections and of the printed tables: the order of the import in `__init__`. An
analysis with `default = False` (the judge, which needs a server) runs only when named.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import Field

from ..config import AnalysisSettings, ConfigError, RunConfig
from ..data.example import Example
from ..data.specs import parse_spec, sample_examples
from ..data.splits import Pools, load_spec, training_pools
from ..results import RunDir
from .sampling import Decoding

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

S = TypeVar("S", bound=AnalysisSettings)
Progress = Callable[[int], None]


@dataclass
class AnalysisResult:
    """What every analysis runner returns: aggregate metrics and one row per sample."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]


@dataclass
class Prepared:
    """An analysis ready to run: the settings recorded in NAME.json (every one used, data specs
    resolved), the data handed to each `run`, and the progress units of one `run` (0: no bar)."""

    settings: dict[str, Any]
    data: Any
    total: int


class SampledSettings(AnalysisSettings):
    """Settings shared by the analyses that sample: which data, how many queries, how to sample."""

    data: str | None = Field(None, description="dataset spec (default: the run's first test set)")
    size: int | None = Field(100, gt=0, description="seeded sample of queries (None: all)")
    n_samples: int = Field(1, gt=0, description="sampled generations per query")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


@dataclass
class Context:
    """The run being analysed and its config; data every analysis may share is loaded once."""

    run: RunDir
    cfg: RunConfig

    @property
    def seed(self) -> int:
        """`analysis.seed`: seeds every sample of data and every sampled generation."""
        return self.cfg.analysis.seed

    def load(self, spec: str, size: int | None = None) -> list[Example]:
        """A dataset spec as the run reads it, then a seeded sample of `size` (all if None or larger)."""
        return load_spec(self.cfg.data, spec, size=size, seed=self.seed)

    def sample(self, examples: list[Example], size: int | None) -> list[Example]:
        """A seeded sample of `size` of `examples` (all of them if None or larger)."""
        return examples if size is None or size >= len(examples) else sample_examples(examples, size, self.seed)

    def first_test(self, field_name: str) -> str:
        """The run's first test set, the default data of setting `field_name`."""
        if not self.cfg.data.tests:
            raise ConfigError(f"{field_name}: the run has no test set; give a dataset spec")
        return next(iter(self.cfg.data.tests.values()))

    def sampled(self, s: SampledSettings, name: str, **extra: Any) -> tuple[dict[str, Any], list[Example]]:
        """(recorded settings, queries) of the sampling analysis `name`: its data (default: the first
        test set) and sampling settings, then `extra`, then `common()`."""
        spec = s.data or self.first_test(f"analysis.{name}.data")
        examples = self.load(spec, s.size)
        settings = {"data": spec, "size": s.size, "n_samples": s.n_samples, "temperature": s.temperature,
                    "top_p": s.top_p, **extra, **self.common()}
        return settings, examples

    @property
    def train_source(self) -> str:
        """The dataset the run trained on (`synthetic`, `metamathqa`, a file path, ...)."""
        return parse_spec(self.cfg.data.train).name_or_path

    @cached_property
    def pools(self) -> Pools:
        """The run's training set and the unseen examples of its source (`training_pools`)."""
        return training_pools(self.cfg.data)

    def decoding(self, sampled: SampledSettings | None = None) -> Decoding:
        """Greedy decoding with the run's generation settings, or sampling as `sampled` says."""
        sampling = {} if sampled is None else dict(
            temperature=sampled.temperature, top_p=sampled.top_p, n_samples=sampled.n_samples)
        return Decoding.from_config(self.cfg.generation, max_prompt_tokens=self.cfg.train.max_length,
                                    seed=self.seed, **sampling)

    def common(self) -> dict[str, Any]:
        """Settings every analysis records: decoding and scoring limits, seed."""
        g = self.cfg.generation
        return {"seed": self.seed, "max_new_tokens": g.max_new_tokens, "generation_batch_size": g.batch_size,
                "stop_at_answer": g.stop_at_answer, "max_length": self.cfg.train.max_length}

    def relative(self, path: Path) -> str:
        """`path` relative to the run folder, as NAME.json records files."""
        return path.relative_to(self.run.root).as_posix()

    def figure(self, paths: Sequence[Path]) -> str:
        """The recorded path of a saved figure: its PNG (the SVG lies beside it)."""
        return self.relative(paths[0])


class Analysis(ABC, Generic[S]):
    """One analysis (module docstring): `name`, `description`, `Settings`, and how it prepares,
    runs on one model, fills its table, and optionally finishes across checkpoints and draws."""

    name: ClassVar[str]
    description: ClassVar[str]
    Settings: ClassVar[type[AnalysisSettings]]
    default: ClassVar[bool] = True  # part of the default suite; False: only when named (`--suite NAME`)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.settings: S = getattr(ctx.cfg.analysis, self.name)

    @abstractmethod
    def prepare(self) -> Prepared:
        """Check the settings and load the data; everything that can fail on bad input fails here,
        before anything is written."""

    @abstractmethod
    def run(self, data: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            progress: Progress) -> AnalysisResult:
        """The analysis of one model on the prepared data."""

    @abstractmethod
    def columns(self, settings: dict[str, Any]) -> list[tuple[str, str]]:
        """(column label, metric key) of the table, from the recorded settings."""

    def finish(self, doc: dict[str, Any]) -> None:
        """Add values derived from several checkpoints to NAME.json's content `doc` (none by default)."""

    def figures(self, doc: dict[str, Any], fresh: set[str]) -> list[str] | None:
        """Draw the figures of every checkpoint in `doc` (those in `fresh` were just computed) and
        return their paths relative to RUN; None for an analysis without figures."""
        return None


ANALYSES: dict[str, type[Analysis]] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: make `cls` an analysis of `overmem analyze` and a section of the run config."""
    if cls.name in ANALYSES:
        raise ValueError(f"analysis {cls.name!r} is registered twice")
    ANALYSES[cls.name] = cls
    return cls


def default_suite() -> list[str]:
    """The analyses `overmem analyze` runs when no `--suite` is given: all but those off by default
    (`default = False`, e.g. the judge, which needs a server)."""
    return [name for name, cls in ANALYSES.items() if cls.default]
