import math

import torch

from overmem.data.example import format_prompt
from overmem.scoring import encode_example, score_examples
from tests.conftest import make_tiny_llama, toy_examples


def reference_logprobs(model, tokenizer, example):
    """Independent computation: one example at a time, no padding, explicit log_softmax."""
    prompt = tokenizer(format_prompt(example.question))["input_ids"]
    resp = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + resp])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return [float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(resp)]


def test_perplexity_matches_unbatched_reference(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer))
    examples = toy_examples(5)
    # Make lengths differ so that batches carry padding.
    examples[1] = examples[1].__class__(**{**examples[1].__dict__, "response": examples[1].response + " Done!"})
    scores = score_examples(model, char_tokenizer, examples, batch_size=3)
    for ex, s in zip(examples, scores):
        ref = reference_logprobs(model, char_tokenizer, ex)
        assert s.n_tokens == len(ref) == len(ex.response)
        assert torch.allclose(s.logprobs.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4)
        assert math.isclose(s.ppl, math.exp(-sum(ref) / len(ref)), rel_tol=1e-4)


def test_encode_masks_prompt_and_appends_eos(char_tokenizer):
    ex = toy_examples(1)[0]
    ids, labels = encode_example(char_tokenizer, ex, max_length=4096, add_eos=True)
    n_prompt = len(char_tokenizer(format_prompt(ex.question))["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == char_tokenizer.eos_token_id
    assert char_tokenizer.decode(ids[n_prompt:-1]) == ex.response
