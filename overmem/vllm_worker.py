"""The vLLM engine process of the vLLM evaluation backend (`overmem.vllm_backend` starts it).

It runs as a script of its own (`python vllm_worker.py`), so that the engine never lives in the
caller's process: no `fork` of a process that holds models, no need for a `__main__` guard in the
caller's script, and its interpreter may be another virtual environment (vLLM pins its own
transformers). It imports nothing from overmem.

Protocol: one JSON object per line. Requests come on stdin; replies go to the file descriptor that
was stdout when the process started, and everything the libraries print goes to stderr. Each
request gets one reply, `{"ok": ...}` or `{"error": "one line"}`. Only JSON crosses the pipe (no
pickle). Requests:

- `start`: engine settings (`model` folder or hub id, `dtype`, `max_model_len`, ...); the engine
  starts with this model's weights.
- `load`: `weights` (a folder of safetensors, or null for the engine's own model) reloaded in place
  into the running engine (vLLM's `reload_weights`, as RL trainers do between steps).
- `score`: teacher-forced log-probabilities (`prompt_logprobs`) of `ids[i][start[i]:]` given the
  tokens before each, optionally under the LoRA adapter `lora` (a folder); with `greedy`, also
  what `greedy` gives for the same rows, from the same pass.
- `greedy`: the greedy next token after every position of `ids[i]` from `start[i] - 1` on (the
  prompt log-probs' top token; the last from one decoding step): drafts verified in one pass.
- `generate`: continuations of token-id prompts (greedy at `temperature` 0), `n` per prompt, each
  request seeded with `seed + i`, at most `max_tokens[i]` tokens each; returns token ids, the caller
  decodes them.
- `stop`: reply, then exit.

Token ids, not text, go both ways: the caller's tokenizer alone decides which tokens are scored.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _tops(x: list[int], s: int, out) -> list[int]:
    """The greedy token after `x[:t]` for t = s .. len(x): the top prompt log-prob at each position
    (`out` asked for one), then the token decoded after the whole of `x`."""
    lps = out.prompt_logprobs  # position t: {token: Logprob} of token t and the top token given tokens < t
    top = [x[t] if lps[t][x[t]].rank == 1 else next(k for k, v in lps[t].items() if v.rank == 1)
           for t in range(s, len(x))]
    return top + [out.outputs[0].token_ids[0]]


def _retie(worker) -> bool:
    """After an in-place reload, point a tied LM head at the reloaded embedding again.

    vLLM's layer-wise reload restores each layer's parameters separately, which leaves a tied
    `lm_head` on its old weight (it logs "ParallelLMHead: Failed to load weights"); on the CPU the
    head's packed GEMM copy must be rebuilt from the new weight too."""
    model = worker.model_runner.get_model()
    head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
    if head is None or inner is None or not getattr(model.config, "tie_word_embeddings", False):
        return False
    head.weight = inner.embed_tokens.weight
    head.quant_method.process_weights_after_loading(head)
    return True


class Engine:
    def __init__(self, settings: dict) -> None:
        from vllm import LLM

        self.lora_ids: dict[str, int] = {}
        self.model = settings["model"]
        self.weights: str | None = None  # folder loaded in place (None: the engine's own model)
        kwargs = dict(
            model=settings["model"],
            revision=settings.get("revision"),
            dtype=settings["dtype"],
            seed=settings.get("seed", 0),
            max_model_len=settings["max_model_len"],
            gpu_memory_utilization=settings["gpu_memory_utilization"],
            kv_cache_memory_bytes=settings.get("kv_cache_memory_bytes"),
            tensor_parallel_size=settings.get("tensor_parallel_size", 1),
            enforce_eager=settings["enforce_eager"],
            # Scoring reads prompt log-probs, which a cached prefix would skip.
            enable_prefix_caching=False,
            # The caller tokenizes and decodes; the model's generation_config.json must not add
            # stop tokens or sampling defaults the Hugging Face path does not use.
            skip_tokenizer_init=True,
            generation_config="vllm",
            trust_remote_code=False,
        )
        if settings.get("max_lora_rank"):
            kwargs.update(enable_lora=True, max_lora_rank=settings["max_lora_rank"], max_loras=1)
        self.llm = LLM(**kwargs)
        from vllm.platforms import current_platform

        # vLLM 0.32's CPU LoRA kernels index the LM head's (unused) LoRA per request, not per prompt
        # token, so prompt log-probs of several requests in one step fail ("einsum(): subscript b
        # has size ..."): with LoRA on the CPU, each sequence is scored in a step of its own.
        self.score_one_by_one = bool(settings.get("max_lora_rank")) and current_platform.is_cpu()

    def _lora(self, path: str | None):
        if not path:
            return None
        from vllm.lora.request import LoRARequest

        if path not in self.lora_ids:
            self.lora_ids[path] = len(self.lora_ids) + 1
        return LoRARequest(f"adapter-{self.lora_ids[path]}", self.lora_ids[path], path)

    def load(self, weights: str | None) -> dict:
        if weights == self.weights:
            return {"reloaded": False}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights or self.model})
        self.llm.collective_rpc(_retie)
        self.weights = weights
        return {"reloaded": True}

    def _prompt_pass(self, ids: list[list[int]], lora: str | None, top: int) -> list:
        """One teacher-forced pass over each of `ids` (and one decoded token): the engine's outputs,
        with the prompt log-prob of every token and of the `top` most likely ones at each position."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top, detokenize=False)
        prompts, request = [TokensPrompt(prompt_token_ids=x) for x in ids], self._lora(lora)
        if self.score_one_by_one:
            return [self.llm.generate([p], params, use_tqdm=False, lora_request=request)[0] for p in prompts]
        return self.llm.generate(prompts, params, use_tqdm=False, lora_request=request)

    def score(self, ids: list[list[int]], start: list[int], lora: str | None,
              greedy: bool = False) -> list[list[list[float]]]:
        """Per row, the log-prob of each token from `start` on and its rank (vLLM's: the number of
        tokens at least as likely, itself included); with `greedy`, also the greedy tokens `greedy`
        gives from `start` on."""
        result = []
        for x, s, out in zip(ids, start, self._prompt_pass(ids, lora, 1 if greedy else 0)):
            lps = out.prompt_logprobs  # position t: {token: Logprob} of token t given tokens < t
            kept = [lps[t][x[t]] for t in range(max(s, 1), len(x))]
            row = [[v.logprob for v in kept], [v.rank for v in kept]]
            result.append(row + [_tops(x, s, out) if 0 < s < len(x) else None] if greedy else row)
        return result

    def greedy(self, ids: list[list[int]], start: list[int], lora: str | None) -> list[list[int]]:
        return [_tops(x, s, out) for x, s, out in zip(ids, start, self._prompt_pass(ids, lora, 1))]

    def generate(self, prompts: list[list[int]], *, max_tokens: list[int], n: int, temperature: float, top_p: float,
                 seed: int, stop_token_ids: list[int], lora: str | None) -> list[list[list[int]]]:
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens[i], seed=seed + i,
                                 stop_token_ids=stop_token_ids, detokenize=False) for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                 lora_request=self._lora(lora))
        return [[list(c.token_ids) for c in out.outputs] for out in outs]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"


def serve(requests, reply) -> None:
    engine: Engine | None = None
    for line in requests:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.pop("op")
            if op == "stop":
                reply({"ok": True})
                return
            if op == "start":
                engine = Engine(req)
                result = {"pid": os.getpid(), "vocab_size": engine.llm.llm_engine.model_config.get_vocab_size()}
            elif engine is None:
                raise RuntimeError(f"{op!r} before 'start'")
            elif op == "load":
                result = engine.load(req.get("weights"))
            elif op == "greedy":
                result = engine.greedy(req["ids"], req["start"], req.get("lora"))
            elif op == "score":
                result = engine.score(req["ids"], req["start"], req.get("lora"), bool(req.get("greedy")))
            elif op == "generate":
                result = engine.generate(**req)
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as err:  # noqa: BLE001 - every failure goes back to the caller as one line
            traceback.print_exc(file=sys.stderr)
            reply({"error": _one_line(err)})
            continue
        reply({"ok": result})


def main() -> None:
    # Replies get the original stdout; whatever vLLM, torch or C++ code prints goes to stderr.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    serve(sys.stdin, reply)


if __name__ == "__main__":
    main()
