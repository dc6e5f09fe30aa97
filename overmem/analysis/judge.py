"""Win rate against the reference outputs, judged by an LLM behind an OpenAI-compatible endpoint.

Open-ended answers (Alpaca-format data, answer kind "open") have no automatic check; the paper
(App. E, Table 9) judges them with AlpacaEval 2.0 and GPT-4o. This analysis is the pairwise part of
that protocol against the dataset's own reference outputs: each checkpoint answers every
instruction (greedy, the run's decoding limits, no stop at an answer line), and the judge is asked
which of two responses, the model's and the reference, follows the instruction better.

- Position bias: the model's response is shown as "A" or "B" by `random.Random(f"{seed}:{id}")`,
  the same for an example at every checkpoint; `win_rate_as_a` / `win_rate_as_b` show what is left.
- The verdict (`parse_verdict`): the judge's reply stripped of spaces, `*`, quotes, brackets and a
  final period is "A" or "B"; else the one of "Response A" / "Response B" it names (not both);
  else invalid. Invalid verdicts are counted (`n_invalid`) and left out of the win rate.
- `win_rate` = wins / valid verdicts, with a percentile-bootstrap interval over examples
  (`eval.bootstrap`, `eval.confidence`), as accuracy elsewhere. No length control (AlpacaEval 2.0's
  LC win rate needs its fitted model): compare `mean_chars` with `mean_chars_reference`.

Off by default: not in the default suite (`Judge.default = False`); run it with
`overmem analyze RUN --suite judge --set analysis.judge.endpoint=http://localhost:8000/v1
--set analysis.judge.model=NAME`. The key, if the server wants one, is read from the environment
variable named by `api_key_env`; only that name is recorded. The client is the standard library's
urllib: POST `<endpoint>/chat/completions`, temperature 0, retried on connection errors, timeouts,
HTTP 429 and 5xx (`retries` more times, at most 10, backing off 1, 2, 4, ... s, at most 30 s a wait);
any other failure stops the analysis with `JudgeError`, one line naming the endpoint.

`analysis.judge.*`: endpoint, model, api_key_env, prompt, data, size, timeout_s, retries, max_tokens.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from ..config import AnalysisSettings, ConfigError
from ..data.example import Example, format_prompt
from .base import Analysis, AnalysisResult, Prepared, Progress, register
from .sampling import accuracy_ci, decode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_PROMPT = (
    "You are an impartial judge comparing two responses to the same instruction.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response A:\n{response_a}\n\n"
    "### Response B:\n{response_b}\n\n"
    "Which response follows the instruction better: more helpful, accurate, relevant and complete? "
    "Neither the order nor the length of the responses should sway you. "
    "Reply with one letter only: A or B."
)
PROMPT_FIELDS = frozenset({"instruction", "response_a", "response_b"})
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRIES = 10
MAX_BACKOFF_S = 30.0  # the longest wait between attempts: with MAX_RETRIES, a bounded total wait


class JudgeError(ConnectionError):
    """The judge endpoint failed: refused, timed out, an HTTP error or a malformed response."""


def chat_completions_url(endpoint: str) -> str:
    """`<endpoint>/chat/completions`; an endpoint already ending in /chat/completions is kept."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


def without_credentials(url: str) -> str:
    """`url` without a `user:password@` part, as it is recorded and shown."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class JudgeClient:
    """A minimal OpenAI-compatible chat client (urllib): one user message, temperature 0."""

    endpoint: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    retries: int = 2
    backoff_s: float = 1.0  # waits backoff_s, 2 backoff_s, ... (at most MAX_BACKOFF_S) between attempts
    max_tokens: int = 16

    @property
    def url(self) -> str:
        return chat_completions_url(self.endpoint)

    @property
    def shown_url(self) -> str:
        """The URL in messages and results: without credentials."""
        return without_credentials(self.url)

    def complete(self, prompt: str) -> tuple[str, int]:
        """(the judge's reply, attempts it took); `JudgeError` when it cannot be had."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        failure = ""
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 2), MAX_BACKOFF_S))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                failure = _http_failure(err)
                if err.code in RETRY_STATUS:
                    continue
                raise JudgeError(f"judge endpoint {self.shown_url}: {failure}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                failure = _connection_failure(err, self.timeout_s)
                continue
            return _reply_text(raw, self.shown_url), attempt
        raise JudgeError(f"judge endpoint {self.shown_url}: {failure} (after {self.retries + 1} attempt(s))")


def _http_failure(err: urllib.error.HTTPError) -> str:
    detail = " ".join(err.read().decode("utf-8", "replace").split())[:200]
    key = "; check the API key (analysis.judge.api_key_env)"
    hint = {401: key, 403: key, 404: "; check analysis.judge.endpoint (the base URL, e.g. "
            "http://localhost:8000/v1) and analysis.judge.model"}
    return f"HTTP {err.code} {err.reason}: {detail or '(no body)'}{hint.get(err.code, '')}"


def _connection_failure(err: Exception, timeout_s: float) -> str:
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused; is the server running (e.g. `vllm serve MODEL`) at that address?"
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout_s:g} s (analysis.judge.timeout_s)"
    return f"cannot connect ({reason})"


def _reply_text(raw: bytes, url: str) -> str:
    """The message content of a chat-completions response; `JudgeError` if it has none."""
    excerpt = " ".join(raw.decode("utf-8", "replace").split())[:200]
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except json.JSONDecodeError:
        raise JudgeError(f"judge endpoint {url}: malformed response (not JSON): {excerpt!r}") from None
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge endpoint {url}: malformed response (no choices[0].message.content): "
                         f"{excerpt!r}") from None
    if not isinstance(content, str):
        raise JudgeError(f"judge endpoint {url}: malformed response (content is not text): {excerpt!r}")
    return content


_STRIP = " \t\n*\"'`()[]."
_NAMED_RE = re.compile(r"\b(?:response|output)\s*\(?([AB])\b", re.IGNORECASE)


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or None (invalid): the rule in the module docstring."""
    bare = reply.strip(_STRIP)
    if bare in ("A", "B"):
        return bare
    named = {m.upper() for m in _NAMED_RE.findall(reply)}
    return named.pop() if len(named) == 1 else None


def model_position(example_id: str, seed: int) -> str:
    """Where the model's response is shown for this example: "A" or "B" (seeded, per example)."""
    return "A" if random.Random(f"{seed}:{example_id}").random() < 0.5 else "B"


def check_prompt(template: str) -> None:
    """A judge prompt must use exactly {instruction}, {response_a} and {response_b}."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ConfigError(f"analysis.judge.prompt: {err}; write literal braces as {{{{ and }}}}") from None
    if fields != PROMPT_FIELDS:
        raise ConfigError(f"analysis.judge.prompt: uses {sorted(fields)}; it must use exactly "
                          f"{{instruction}}, {{response_a}} and {{response_b}}")


def judge_win_rate(
    client: JudgeClient,
    examples: Sequence[Example],
    generations: Sequence[str],
    *,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    n_boot: int = 1000,
    confidence: float = 0.95,
    progress: Callable[[int], None] | None = None,
) -> AnalysisResult:
    """Judge each generation against its example's reference (`response`): metrics `win_rate` with
    `win_rate_ci_low`/`_high`, `wins`, `n`, `n_invalid`, `win_rate_as_a`/`_as_b`, `mean_chars`,
    `mean_chars_reference`; one row per example with the judge's reply and verdict."""
    rows = []
    for ex, text in zip(examples, generations, strict=True):
        position = model_position(ex.id, seed)
        a, b = (text, ex.response) if position == "A" else (ex.response, text)
        reply, attempts = client.complete(prompt.format(instruction=ex.question, response_a=a, response_b=b))
        verdict = parse_verdict(reply)
        rows.append({"id": ex.id, "instruction": ex.question, "generation": text, "reference": ex.response,
                     "model_position": position, "judge_reply": reply, "verdict": verdict,
                     "win": None if verdict is None else verdict == position, "attempts": attempts})
        if progress:
            progress(1)
    valid = [r for r in rows if r["win"] is not None]
    stats = accuracy_ci([r["win"] for r in valid], n_boot=n_boot, confidence=confidence, seed=seed)
    metrics: dict[str, Any] = {"win_rate": stats["accuracy"], "win_rate_ci_low": stats["ci_low"],
                               "win_rate_ci_high": stats["ci_high"], "wins": sum(r["win"] for r in valid),
                               "n": len(valid), "n_invalid": len(rows) - len(valid)}
    for position in ("A", "B"):
        shown = [r["win"] for r in valid if r["model_position"] == position]
        metrics[f"win_rate_as_{position.lower()}"] = float(np.mean(shown)) if shown else float("nan")
    metrics["mean_chars"] = float(np.mean([len(t) for t in generations])) if rows else float("nan")
    metrics["mean_chars_reference"] = float(np.mean([len(ex.response) for ex in examples])) if rows else float("nan")
    return AnalysisResult(metrics, rows)


class JudgeSettings(AnalysisSettings):
    endpoint: str | None = Field(
        None, description="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (unset: the judge is off)")
    model: str | None = Field(None, description="the judge model's name on that server")
    api_key_env: str | None = Field(
        None, description="name of the environment variable holding the API key (the key is never recorded)")
    prompt: str = Field(DEFAULT_PROMPT, description="judge prompt with {instruction}, {response_a}, {response_b}")
    data: str | None = Field(None, description="dataset spec with reference outputs (default: the first test set)")
    size: int | None = Field(100, gt=0, description="seeded sample of instructions (None: all)")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="seconds to wait for one judge reply")
    retries: int = Field(2, ge=0, le=MAX_RETRIES,
                         description="further attempts after a connection error, timeout, 429 or 5xx")
    max_tokens: int = Field(16, gt=0, description="tokens the judge may reply with")


@register
class Judge(Analysis[JudgeSettings]):
    name = "judge"
    description = "Win rate against the reference outputs, judged by an LLM endpoint (paper App. E; off by default)"
    Settings = JudgeSettings
    default = False  # needs a judge server: only when asked for with --suite judge

    def prepare(self) -> Prepared:
        s, ctx = self.settings, self.ctx
        if not s.endpoint:
            raise ConfigError("analysis.judge.endpoint: not set; the judge needs an OpenAI-compatible server, e.g. "
                              "--set analysis.judge.endpoint=http://localhost:8000/v1 --set analysis.judge.model=NAME")
        if not re.match(r"https?://[^/\s]+", s.endpoint):
            raise ConfigError(f"analysis.judge.endpoint: {s.endpoint!r} is not an http(s) URL, "
                              "e.g. http://localhost:8000/v1")
        if not s.model:
            raise ConfigError("analysis.judge.model: not set; give the judge model's name on that server")
        api_key = None
        if s.api_key_env:
            api_key = os.environ.get(s.api_key_env)
            if not api_key:
                raise ConfigError(f"analysis.judge.api_key_env: the environment variable {s.api_key_env} is not set")
        check_prompt(s.prompt)
        spec = s.data or ctx.first_test("analysis.judge.data")
        examples = ctx.load(spec, s.size)
        client = JudgeClient(s.endpoint, s.model, api_key, timeout_s=s.timeout_s, retries=s.retries,
                             max_tokens=s.max_tokens)
        settings = {"endpoint": client.shown_url, "model": s.model, "api_key_env": s.api_key_env, "prompt": s.prompt,
                    "data": spec, "size": s.size, "timeout_s": s.timeout_s, "retries": s.retries,
                    "max_tokens": s.max_tokens, "positions": "seeded per example", "decoding": "greedy",
                    "bootstrap": ctx.cfg.eval.bootstrap, "confidence": ctx.cfg.eval.confidence, **ctx.common()}
        settings["stop_at_answer"] = False
        return Prepared(settings, (examples, client), 2 * len(examples))

    def run(self, data: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            progress: Progress) -> AnalysisResult:
        examples, client = data
        decoding = replace(self.ctx.decoding(), stop_at_answer=False)  # open answers have no answer line
        texts = decode(model, tokenizer, [format_prompt(ex.question) for ex in examples], decoding, progress)
        ev = self.ctx.cfg.eval
        return judge_win_rate(client, examples, [t[0] for t in texts], prompt=self.settings.prompt,
                              seed=self.ctx.seed, n_boot=ev.bootstrap, confidence=ev.confidence, progress=progress)

    def columns(self, settings: dict[str, Any]) -> list[tuple[str, str]]:
        return [("win rate", "win_rate"), ("CI low", "win_rate_ci_low"), ("CI high", "win_rate_ci_high"),
                ("n", "n"), ("invalid", "n_invalid"), ("chars", "mean_chars")]
