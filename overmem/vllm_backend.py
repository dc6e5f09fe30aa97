"""The vLLM backend of checkpoint evaluation (`eval.backend: vllm | auto`).

One engine per process and setting (`engine_for`): it starts once (the engine's start is the cost,
16-20 s on two CPU cores) and every checkpoint evaluated afterwards is loaded into it in place.
The engine runs in a process of its own (`overmem.vllm_worker`, talking JSON over a pipe); this
module does not import vLLM.

What a checkpoint becomes (`open_checkpoint`) is a `VllmModel` handle, an evaluation backend
(`overmem.backend_api.EvalBackend`) as `overmem.hf_backend.HfBackend` is: `overmem.scoring` and
`overmem.generation` send it token ids, so both backends score and continue exactly the same tokens.

- The base model (None): the engine's own weights.
- A full checkpoint folder: its weights reloaded in place into the engine.
- A LoRA adapter that vLLM runs as one (plain LoRA on linear projections, rank up to the engine's
  `max_lora_rank`; PiSSA and MiLoRA checkpoints are saved as such, see `overmem.train.methods`): a
  LoRA request on the base, nothing merged or written.
- Any other adapter (DoRA, `modules_to_save`, higher rank, ...): merged by PEFT into a temporary
  folder, loaded in place like a full checkpoint, the folder removed when the handle is dropped.

The Min-K%++ vocabulary statistics are not available from vLLM: `with_vocab_stats()` loads the same
checkpoint with Hugging Face for the analyses that need them.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend_api import EvalBackend, Progress, TokenScores
from .config import RunConfig, VllmSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WORKER = Path(__file__).with_name("vllm_worker.py")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM allocates adapters for
LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_REQUEST = 64  # prompts or examples per request (at least; the engine batches them itself)
STOP_SECONDS = 30  # a worker that has not exited this long after `stop` is killed
_LOG_TAIL = 1500


class VllmError(RuntimeError):
    """The vLLM engine could not start or answer; the message says why in one line."""


class VllmEngine:
    """One vLLM engine in a worker process; `request` sends one JSON request and returns the reply."""

    def __init__(self, settings: dict[str, Any], python: str | None = None, start_timeout_s: float | None = None):
        self.settings = settings
        self.python = python or sys.executable
        self._lock = threading.Lock()
        self.log = tempfile.NamedTemporaryFile(prefix="overmem-vllm-", suffix=".log", delete=False)  # noqa: SIM115
        env = dict(os.environ, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
        # vLLM drops to one torch thread on the CPU unless OMP_NUM_THREADS is set (an empty one is invalid).
        if not env.get("OMP_NUM_THREADS", "").strip():
            env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else os.cpu_count() or 1)
        if settings.get("tensor_parallel_size", 1) == 1:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine runs in the worker itself: no 2nd process
        try:
            # A process group of its own, so that a kill reaches what it started too (an interpreter
            # that is a wrapper script not exec'ing Python, the engine's own workers).
            self.proc = subprocess.Popen(  # noqa: S603 - our own worker script
                [self.python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                text=True, encoding="utf-8", env=env, start_new_session=True)
        except OSError as err:
            self._drop_log()
            raise VllmError(f"eval.vllm.python: cannot run {self.python!r} ({err})") from None
        self.weights: str | None = None
        try:
            started = self._start(settings, start_timeout_s or VllmSettings().start_timeout_s)
            self.pid, self.vocab_size = started["pid"], started["vocab_size"]
        except BaseException:
            self.close()
            raise

    def _start(self, settings: dict[str, Any], timeout_s: float) -> Any:
        """The `start` request, answered within `timeout_s` (an interpreter that never answers is killed
        instead of waited on forever); a missing vLLM is told with how to install it."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"op": "start", **settings}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the worker is gone: the request below says how it ended
        else:
            if not select.select([self.proc.stdout], [], [], timeout_s)[0]:
                self._kill()
                raise VllmError(f"the vLLM engine ({self.python}) did not start within {timeout_s:g} s; check that "
                                "the interpreter runs overmem's vLLM worker (eval.vllm.python, $OVERMEM_VLLM_PYTHON), "
                                "or raise eval.vllm.start_timeout_s for a model that loads slowly")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=STOP_SECONDS)
            raise VllmError(f"the vLLM engine process died during 'start' (exit {self.proc.returncode}; {self._tail()})")
        reply = json.loads(line)
        if "No module named 'vllm'" in reply.get("error", ""):
            raise VllmError(f"vLLM is not installed for {self.python}: install it with `EXTRAS=vllm bash "
                            "scripts/setup.sh` (a virtualenv of its own; then set OVERMEM_VLLM_PYTHON as it says), "
                            "or set eval.vllm.python to an interpreter that has vLLM")
        if "error" in reply:
            raise VllmError(f"vLLM start: {reply['error']}")
        return reply["ok"]

    def request(self, op: str, **args: Any) -> Any:
        with self._lock:
            if self.proc.poll() is not None or self.proc.stdin is None or self.proc.stdout is None:
                raise VllmError(f"the vLLM engine process has exited ({self._tail()})")
            try:
                self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                self.proc.wait(timeout=STOP_SECONDS)
                raise VllmError(f"the vLLM engine process died during {op!r} (exit {self.proc.returncode}; "
                                f"{self._tail()})")
            reply = json.loads(line)
        if "error" in reply:
            raise VllmError(f"vLLM {op}: {reply['error']}")
        return reply["ok"]

    def load(self, weights: str | None) -> None:
        """The weights of the folder `weights` (None: the engine's model) into the engine, in place."""
        if weights != self.weights:
            self.request("load", weights=weights)
            self.weights = weights

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Stop the worker (and with it the engine and everything it holds); idempotent."""
        if self.proc.poll() is None:
            try:
                with self._lock:
                    assert self.proc.stdin is not None
                    self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                    self.proc.stdin.flush()
                self.proc.wait(timeout=STOP_SECONDS)
            except (OSError, subprocess.TimeoutExpired, AssertionError):
                self._kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # a request still buffered for a worker that died: BrokenPipeError
                    pass
        self._drop_log()

    def _kill(self) -> None:
        """Kill the worker's process group (the worker and whatever it started), then reap the worker."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (OSError, AttributeError):  # gone already, or no process groups here
            self.proc.kill()
        self.proc.wait()

    def _tail(self) -> str:
        try:
            text = Path(self.log.name).read_text(errors="replace")
        except OSError:
            return "no log"
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        return "last message: " + last.strip()[-_LOG_TAIL:] if last else "no message"

    def _drop_log(self) -> None:
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


@dataclass(eq=False)
class VllmModel(EvalBackend):
    """A checkpoint as the vLLM engine evaluates it (`overmem.backend_api.EvalBackend`): token ids
    sent to the engine, which loads the checkpoint's weights or adapter on its first request."""

    engine: VllmEngine
    cfg: RunConfig
    source: str | None  # the checkpoint folder (None: the base model)
    weights: str | None = None  # folder loaded into the engine in place (None: the engine's own model)
    lora: str | None = None  # LoRA adapter folder applied per request
    _merged: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    min_request = VLLM_REQUEST  # the engine batches by itself
    verify_lookahead = 1  # the engine decodes one token past prompt + draft

    @classmethod
    def open(cls, path: str | Path | None, cfg: RunConfig) -> VllmModel:
        return open_checkpoint(path, cfg)

    @property
    def context(self) -> int:
        return self.engine.settings["max_model_len"]

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def drafts_exact(self) -> bool:
        return True  # the engine decodes by the argmax, without the model's generation_config

    def score(self, ids: Sequence[list[int]], labels: Sequence[list[int]], *, pad_id: int,
              vocab_stats: bool = False, chunk_size: int | None = None, greedy: bool = False) -> list[TokenScores]:
        """The engine's prompt log-probs of each row's tokens from its first labelled one on (a
        response mask; nothing is padded, `pad_id` and `chunk_size` are moot), with their ranks; no
        entropies (the engine returns no whole distribution). The engine's rank counts the tokens
        at least as likely, so it is `rank_t` except where another token's log-prob equals y_t's
        exactly (then it is higher). With `greedy`, the top token of each prompt log-prob from the
        first labelled one on and the token decoded after the row (as `verify`), from the same pass."""
        # Imported here: the command line imports this module (VllmError) and must start without torch.
        import torch

        from .data.encoding import IGNORE

        if vocab_stats:
            raise ValueError("the vLLM engine computes no vocabulary statistics (score with_vocab_stats())")
        starts = [next((t for t, y in enumerate(row) if y != IGNORE), len(row)) for row in labels]
        if len(ids) != len(labels) or any(IGNORE in row[t:] for row, t in zip(labels, starts)):
            raise ValueError("labels: one row per row of ids, labelled from its first scored token to its end")
        self.engine.load(self.weights)
        rows = self.engine.request("score", ids=[list(x) for x in ids], start=starts, lora=self.lora, greedy=greedy)
        return [TokenScores(torch.tensor(row[0], dtype=torch.float32), ranks=torch.tensor(row[1], dtype=torch.long),
                            greedy=torch.tensor(row[2], dtype=torch.long) if greedy and row[2] is not None else None)
                for row in rows]

    def with_vocab_stats(self) -> EvalBackend:
        from .hf_backend import HfBackend

        _note_once("vocabulary statistics (Min-K%++) come from the Hugging Face backend: vLLM does not compute them")
        return HfBackend.open(self.source, self.cfg)

    def verify(self, tokenizer: PreTrainedTokenizerBase, seqs: dict[int, tuple[list[int], list[int]]], *,
               batch_size: int) -> dict[int, list[int]]:
        """One prefill of each prompt + draft (its prompt log-probs' top tokens) and one decoding step past it."""
        if not seqs:
            return {}
        self.engine.load(self.weights)
        keys = list(seqs)
        tops = self.engine.request("greedy", ids=[seqs[k][0] + seqs[k][1] for k in keys],
                                   start=[len(seqs[k][0]) for k in keys], lora=self.lora)
        return dict(zip(keys, tops))

    def decode(self, tokenizer: PreTrainedTokenizerBase, inputs: Sequence[list[int]], limits: Sequence[int], *,
               answer_line: Sequence[bool], carried: Sequence[int] | None = None,
               expected: Sequence[int | None] | None = None, batch_size: int, cache: str = "auto",
               num_samples: int = 1, sampling: tuple[float, float] | None = None, seed: int = 0,
               progress: Progress | None = None) -> list[list[list[int]]]:
        """EOS is the one stop token: a continuation runs on past its answer line (vLLM has no stop
        rule of ours; `answer_line`, `carried`, `expected` and `cache` are moot). Greedy at temperature 0;
        sampling seeds prompt i with `seed + i`."""
        temperature, top_p = sampling if sampling else (0.0, 1.0)
        stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        out: list[list[list[int]]] = []
        step = max(batch_size, self.min_request)  # the engine batches by itself; this only paces progress reports
        for start in range(0, len(inputs), step):
            part = inputs[start : start + step]
            self.engine.load(self.weights)
            out.extend(self.engine.request("generate", prompts=[list(p) for p in part],
                                           max_tokens=list(limits[start : start + step]), n=num_samples,
                                           temperature=temperature, top_p=top_p, seed=seed + start,
                                           stop_token_ids=stop, lora=self.lora))
            if progress:
                progress(len(part))
        return out

    def close(self) -> None:
        if self._merged is not None:
            self._merged.cleanup()
            self._merged = None

    def __del__(self) -> None:
        self.close()


_noted: set[str] = set()


def _note_once(text: str) -> None:
    if text not in _noted:
        _noted.add(text)
        print(f"note: {text}", file=sys.stderr)


# --- the engine of this process --------------------------------------------------------------------

_engine: VllmEngine | None = None
_key: str | None = None


def engine_settings(cfg: RunConfig) -> dict[str, Any]:
    """The engine's settings for `cfg` (`eval.vllm`, the defaults filled in for this machine)."""
    import torch

    from transformers import AutoConfig

    from .models import context_length, engine_model_folder, resolve_dtype

    v, cuda = cfg.eval.vllm, torch.cuda.is_available()
    dtype = v.dtype or cfg.model.dtype
    rank = v.max_lora_rank
    if rank is None and cfg.train.method != "full":
        # PiSSA and MiLoRA checkpoints are saved as rank-2r LoRA over the original base.
        rank = cfg.train.lora.r * (2 if cfg.train.method in ("pissa", "milora") else 1)
    if rank is not None:
        rank = next((r for r in LORA_RANKS if r >= rank), None)
    if (v.lora or ("adapter" if cuda else "merge")) == "merge":
        rank = None  # an engine without LoRA: adapters are merged and loaded in place
    folder = engine_model_folder(cfg.model)
    # The longest sequence evaluated, within the model's own context (vLLM refuses a longer
    # max_model_len); `overmem.generation` cuts prompts and continuations to fit it.
    longest = cfg.train.max_length + cfg.generation.max_new_tokens
    try:  # a folder, or a hub model already downloaded: its config is read here without the network
        context = context_length(AutoConfig.from_pretrained(folder, revision=cfg.model.revision, local_files_only=True,
                                                            trust_remote_code=cfg.model.trust_remote_code))
    except (OSError, ValueError):  # not here yet: the engine downloads it, and derives its own length
        context = None
    return {
        "model": folder,
        "revision": cfg.model.revision,
        "dtype": str(resolve_dtype(dtype)).removeprefix("torch."),
        "max_model_len": v.max_model_len or (longest if context is None else min(longest, context)),
        "gpu_memory_utilization": v.gpu_memory_utilization or (0.85 if cuda else 0.1),
        # On the CPU the share above must also hold the weights (0.92 of RAM fails; 0.1 is too little
        # for SmolLM2-135M beside a busy machine's other processes): a fixed KV cache size is robust.
        "kv_cache_memory_bytes": int((v.kv_cache_gib or 1.0) * 2**30) if v.kv_cache_gib or not (
            cuda or v.gpu_memory_utilization) else None,
        "tensor_parallel_size": v.tensor_parallel_size,
        "enforce_eager": (not cuda) if v.enforce_eager is None else v.enforce_eager,
        "max_lora_rank": rank,
        "seed": 0,
    }


def engine_python(cfg: RunConfig) -> str | None:
    """The engine's interpreter: `eval.vllm.python`, else `$OVERMEM_VLLM_PYTHON` (set by
    `EXTRAS=vllm bash scripts/setup.sh`, which puts vLLM in a virtualenv of its own), else this one."""
    return cfg.eval.vllm.python or os.environ.get("OVERMEM_VLLM_PYTHON") or None


def engine_for(cfg: RunConfig) -> VllmEngine:
    """This process's engine for `cfg`, started on first use; one with other settings is closed first."""
    global _engine, _key
    settings = engine_settings(cfg)
    key = json.dumps([settings, engine_python(cfg)], sort_keys=True)
    if _engine is not None and (_key != key or not _engine.alive):
        close_engine()
    if _engine is None:
        _engine, _key = VllmEngine(settings, engine_python(cfg), cfg.eval.vllm.start_timeout_s), key
    return _engine


def close_engine() -> None:
    """Stop this process's engine, if any (also done at exit)."""
    global _engine, _key
    if _engine is not None:
        engine, _engine, _key = _engine, None, None
        engine.close()


atexit.register(close_engine)


def vllm_importable(python: str | None) -> bool:
    """Whether the engine's interpreter can import vllm (checked without importing it here)."""
    if python is None:
        from importlib.util import find_spec

        return find_spec("vllm") is not None
    try:
        done = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],  # noqa: S603
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.stdout.strip() == "True"


# --- checkpoints as handles ------------------------------------------------------------------------

def lora_as_adapter(adapter_config: dict[str, Any], max_rank: int | None) -> str | None:
    """Why vLLM cannot run this PEFT adapter config as an adapter (None: it can)."""
    c = adapter_config
    targets = c.get("target_modules")
    ranks = [c.get("r") or 0, *(c.get("rank_pattern") or {}).values()]
    checks = [
        (c.get("peft_type") != "LORA", f"peft_type {c.get('peft_type')!r}"),
        (bool(c.get("use_dora")), "DoRA"),
        (c.get("bias", "none") != "none" or bool(c.get("lora_bias")), "trained biases"),
        (bool(c.get("modules_to_save")), "modules_to_save"),
        (c.get("layers_to_transform") is not None, "layers_to_transform"),
        (not isinstance(targets, list) or not set(targets) <= LORA_MODULES, f"target modules {targets!r}"),
        (max_rank is None, "the engine runs without LoRA (eval.vllm.lora: merge, the default on the CPU; "
                           "train.method: full; or a rank above 512)"),
        (max_rank is not None and max(ranks) > max_rank, f"rank {max(ranks)} > eval.vllm.max_lora_rank {max_rank}"),
    ]
    return next((why for bad, why in checks if bad), None)


def open_checkpoint(path: str | Path | None, cfg: RunConfig) -> VllmModel:
    """The checkpoint at `path` (None: the base model) ready in this process's engine."""
    from .models import check_adapter_base, is_adapter, load_checkpoint, release_memory
    from .results import ADAPTER_CONFIG

    engine = engine_for(cfg)
    if path is None:
        return VllmModel(engine, cfg, None)
    path = Path(path)
    if is_adapter(path):
        check_adapter_base(path, cfg.model.name_or_path, uncomparable_ok=True)
        adapter_config = json.loads((path / ADAPTER_CONFIG).read_text())
        if lora_as_adapter(adapter_config, engine.settings["max_lora_rank"]) is None:
            return VllmModel(engine, cfg, str(path), lora=str(path.resolve()))
        merged = tempfile.TemporaryDirectory(prefix="overmem-merged-")
        import torch

        model = load_checkpoint(path, cfg.model, torch.device("cpu")).merge_and_unload()
        model.save_pretrained(merged.name)
        del model
        release_memory()
        return VllmModel(engine, cfg, str(path), weights=merged.name, _merged=merged)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: neither a model folder nor a PEFT adapter")
    return VllmModel(engine, cfg, str(path), weights=str(path.resolve()))
