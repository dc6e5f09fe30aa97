import math

import pytest
import torch

from overmem.config import load_config
from overmem.models import load_model, load_tokenizer
from overmem.results import RunDir
from overmem.train.losses import weighted_token_ce
from overmem.train.trainer import finetune
from tests.conftest import toy_examples

IGN = -100


def _batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGN, 1, 3, IGN], [IGN, IGN, 4, 0]])  # padding / prompt are IGN
    return logits, labels


def test_mar_matches_hand_computation():
    logits, labels = _batch()
    # Worked by hand from the definition: position t predicts labels[t + 1].
    terms = []
    for b in range(2):
        for t in range(3):
            y = int(labels[b, t + 1])
            if y == IGN:
                continue
            p = math.exp(logits[b, t, y].item()) / sum(math.exp(v) for v in logits[b, t].tolist())
            terms.append((1 - p) * -math.log(p))
    expected = sum(terms) / len(terms)
    assert len(terms) == 4
    assert weighted_token_ce(logits, labels, gamma=1.0).item() == pytest.approx(expected, rel=1e-5)
    ce = weighted_token_ce(logits, labels, gamma=0.0).item()
    focal = weighted_token_ce(logits, labels, gamma=2.0).item()
    assert focal < weighted_token_ce(logits, labels, gamma=1.0).item() < ce


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_matches_autograd_on_formula(detach):
    logits, labels = _batch()
    x1 = logits.clone().requires_grad_(True)
    weighted_token_ce(x1, labels, gamma=1.0, detach_weight=detach).backward()

    x2 = logits.clone().double().requires_grad_(True)
    total, n = 0.0, 0
    for b in range(2):
        for t in range(3):
            y = int(labels[b, t + 1])
            if y == IGN:
                continue
            logp = torch.log_softmax(x2[b, t], dim=-1)[y]
            w = 1 - logp.exp()
            total = total + (w.detach() if detach else w) * -logp
            n += 1
    (total / n).backward()
    assert torch.allclose(x1.grad.double(), x2.grad, atol=1e-6)


def test_split_batch_with_total_count_equals_whole_batch():
    logits, labels = _batch()
    whole = weighted_token_ce(logits, labels, gamma=1.0)
    n = int((labels[:, 1:] != IGN).sum())
    halves = sum(weighted_token_ce(logits[i : i + 1], labels[i : i + 1], gamma=1.0, num_items=n) for i in range(2))
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)


def test_mar_is_correct_under_gradient_accumulation(tiny_model_dir, tmp_path):
    """One SGD step with 2 micro-batches x 2 accumulation equals one step on the batch of 4."""
    weights = []
    for micro in (4, 2):
        cfg = load_config(None, [
            f"model.name_or_path={tiny_model_dir}", "train.method=full", "train.loss=mar", "train.epochs=1",
            "train.batch_size=4", f"train.micro_batch_size={micro}", "train.optimizer=sgd", "train.lr=0.5",
            "train.warmup_steps=0", "train.scheduler=constant", f"out_dir={tmp_path / str(micro)}", "quiet=true",
        ])
        # Examples of different lengths, so that padding and token counts differ across micro-batches.
        examples = toy_examples(4)
        examples[0] = examples[0].__class__(**{**examples[0].__dict__, "response": examples[0].response * 3})
        trainer = finetune(cfg, load_model(cfg.model), load_tokenizer(cfg.model), examples, RunDir(cfg.out_dir))
        weights.append(trainer.model.lm_head.weight.detach().clone())
    assert not torch.equal(weights[0], load_model(cfg.model).lm_head.weight)
    assert torch.allclose(weights[0], weights[1], atol=1e-6)
