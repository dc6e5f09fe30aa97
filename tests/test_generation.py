import pytest
import torch

from overmem.generation import DEFAULTS, AnswerLineStop, generate, generate_greedy, truncate_after_answer
from tests.conftest import fixed_continuation, make_tiny_llama


def test_batched_greedy_equals_one_at_a_time(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer), seed=1)
    prompts = ["Q: 1+1?\nA:", "A much longer question about apples and pears?\nA:", "Hi", "x = 3; y = 4\n"]
    batched = generate(model, char_tokenizer, prompts, max_new_tokens=12, batch_size=4, stop_at_answer=False)
    for p, (text,) in zip(prompts, batched):
        (single,) = generate(model, char_tokenizer, [p], max_new_tokens=12, batch_size=1, stop_at_answer=False)[0:1]
        assert text == single[0]
        assert len(char_tokenizer(text, add_special_tokens=False)["input_ids"]) <= 12


def test_sampling_is_seeded(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer), seed=2)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.0, num_samples=3, seed=7, stop_at_answer=False)
    a = generate(model, char_tokenizer, ["abc", "defgh"], **kw)
    b = generate(model, char_tokenizer, ["abc", "defgh"], **kw)
    assert a == b and len(a[0]) == 3
    assert len(set(a[0])) > 1  # a random tiny model samples different continuations


def test_answer_line_stop(char_tokenizer):
    prompt = char_tokenizer("Q?\n")["input_ids"]
    stop = AnswerLineStop(char_tokenizer, prompt_width=len(prompt))
    done = char_tokenizer("Q?\n" + "So 3.\n#### 18\n")["input_ids"]
    pending = char_tokenizer("Q?\n" + "So 3.\n#### 18")["input_ids"]
    early = char_tokenizer("Q?\n" + "So 3.\n####\n")["input_ids"]
    assert stop(torch.tensor([done]), None).tolist() == [True]
    assert stop(torch.tensor([pending]), None).tolist() == [False]
    assert stop(torch.tensor([early]), None).tolist() == [False]
    assert truncate_after_answer("a\n#### 5\nmore text") == "a\n#### 5"
    assert truncate_after_answer("no answer line") == "no answer line"


def test_answer_line_stop_only_in_the_rows_that_stop(char_tokenizer):
    prompt = char_tokenizer("Q?\n")["input_ids"]
    done = char_tokenizer("Q?\n" + "So 3.\n#### 18\n")["input_ids"]
    stop = AnswerLineStop(char_tokenizer, prompt_width=len(prompt), rows=[False, True])
    assert stop(torch.tensor([done, done]), None).tolist() == [False, True]


def test_a_continuation_is_cut_at_its_answer_line_only_where_asked(char_tokenizer):
    """A program may hold a `####` comment; with stop_at_answer off (one value or per prompt) the
    text comes back whole, with it on it is cut after its first answer line."""
    model = make_tiny_llama(len(char_tokenizer), seed=4)
    code = "def f(x):\n    #### the base case\n    return x\n"
    fixed_continuation(model, char_tokenizer, code)
    prompts = ["Write f.\n", "Write g.\n"]
    assert generate(model, char_tokenizer, prompts, stop_at_answer=False) == [[code], [code]]
    cut = "def f(x):\n    #### the base case"
    assert generate(model, char_tokenizer, prompts, stop_at_answer=True) == [[cut], [cut]]
    assert generate(model, char_tokenizer, prompts, stop_at_answer=[False, True], batch_size=1) == [[code], [cut]]
    with pytest.raises(ValueError, match="stop_at_answer: 1 values for 2 prompts"):
        generate(model, char_tokenizer, prompts, stop_at_answer=[True])


def test_static_cache_gives_the_same_outputs(char_tokenizer):
    """The preallocated KV cache is a speed option only: greedy texts and seeded samples are unchanged,
    with left padding in mixed-length batches."""
    model = make_tiny_llama(len(char_tokenizer), seed=3)
    prompts = ["Q: 1+1?\nA:", "A much longer question about apples and pears?\nA:", "Hi", "x = 3; y = 4\n"]
    for kw in (dict(), dict(do_sample=True, temperature=1.0, num_samples=2, seed=5)):
        dynamic = generate(model, char_tokenizer, prompts, max_new_tokens=16, batch_size=3, stop_at_answer=False,
                           cache="dynamic", **kw)
        for cache in ("static", "auto"):
            assert generate(model, char_tokenizer, prompts, max_new_tokens=16, batch_size=3, stop_at_answer=False,
                            cache=cache, **kw) == dynamic


def test_default_cache_is_auto():
    """`auto` (the default) is the static cache on the CPU: the same outputs (test above), about as
    fast there (measured in docs/backends.md)."""
    assert DEFAULTS.cache == "auto"


def test_unknown_cache_is_rejected(char_tokenizer):
    with pytest.raises(ValueError, match="generation.cache: 'paged'"):
        generate(make_tiny_llama(len(char_tokenizer)), char_tokenizer, ["a"], cache="paged")


def test_an_overlong_prompt_keeps_its_last_tokens(char_tokenizer):
    """A question of 100k characters used to reach the model whole (attention over 100k positions:
    hundreds of GB). The prompt now keeps its last `max_prompt_tokens` tokens, so it decodes as its
    tail does."""
    model = make_tiny_llama(len(char_tokenizer), seed=1)
    real_forward, widths = model.forward, []

    def bounded_forward(*args, input_ids, **kwargs):
        widths.append(input_ids.shape[1])
        assert input_ids.shape[1] <= 64, f"a prompt of {input_ids.shape[1]} tokens reached the model"
        return real_forward(*args, input_ids=input_ids, **kwargs)

    model.forward = bounded_forward
    huge = "Tom has 3 apples and buys 4 more. " * 3000 + "How many apples does he have?\nA:"
    kw = dict(max_new_tokens=8, stop_at_answer=False, max_prompt_tokens=64)
    assert len(huge) > 100_000
    for cache in ("pruned", "static"):
        widths.clear()
        texts = generate(model, char_tokenizer, [huge, "Hi"], cache=cache, **kw)
        assert texts == generate(model, char_tokenizer, [huge[-100:], "Hi"], cache=cache, **kw)
        assert max(widths) == 64
    with pytest.raises(ValueError, match="max_prompt_tokens must be at least 1"):
        generate(model, char_tokenizer, ["a"], max_prompt_tokens=0)


def test_nothing_runs_past_the_models_context(char_tokenizer):
    """A model of 48 positions under limits meant for longer ones (prompts of 512, 30 new tokens):
    a prompt keeps its last 47 tokens and a continuation ends where the context does; scoring cuts
    the example's prompt to fit. No forward pass sees more than 48 positions."""
    from overmem.data.example import Example
    from overmem.scoring import score_examples
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=48, bos_token_id=1, eos_token_id=99,
                                         pad_token_id=0)).eval()
    positions = []
    real_forward = model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        ids, cache = kwargs.get("input_ids"), kwargs.get("cache_position")
        positions.append(int(cache[-1]) + 1 if cache is not None else ids.shape[1])
        return out

    model.forward = forward
    long, short = "x" * 100, "y" * 20  # 101 and 21 tokens with BOS
    got = generate_greedy(model, char_tokenizer, [long, short], max_new_tokens=30, max_prompt_tokens=512,
                          stop_at_answer=False, cache="dynamic")
    assert [len(c.ids) for c in got] == [1, 27]  # 47 + 1 and 21 + 27 = 48 positions
    assert max(positions) <= 48
    alone = generate_greedy(model, char_tokenizer, [short], max_new_tokens=27, stop_at_answer=False)
    assert got[1].ids == alone[0].ids  # the same continuation, ended by the context instead of the limit
    positions.clear()
    (scored,) = score_examples(model, char_tokenizer, [Example(id="a", question=long, response="z" * 10, answer="")],
                               max_length=512)
    assert scored.truncated and scored.n_tokens == 10 and max(positions) <= 47  # as the vLLM engine: context - 1
