import pytest
import torch

from overmem.config import ModelConfig, TrainConfig, load_config
from overmem.models import load_checkpoint, load_model, load_tokenizer
from overmem.results import RunDir
from overmem.train.methods import apply_method, check_method, create_optimizer
from overmem.train.trainer import finetune
from tests.conftest import toy_examples


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_milora_adapter_is_the_minor_singular_components(tiny_model_dir):
    base = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    expected_logits = _logits(base, ids)
    cfg = TrainConfig(method="milora", lora={"r": 4, "dropout": 0.0})
    model = apply_method(base, cfg)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    W = original["model.layers.0.self_attn.q_proj.weight"].double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    minor = U[:, -4:] @ torch.diag(S[-4:]) @ Vh[-4:]  # the 4 smallest singular components
    s = layer.scaling["default"]
    assert s == pytest.approx(64 / 4)
    delta = s * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    assert torch.allclose(delta, minor, atol=1e-5)
    assert torch.allclose(layer.get_base_layer().weight.double(), W - minor, atol=1e-5)
    assert torch.allclose(_logits(model, ids), expected_logits, atol=1e-5)


def test_pissa_keeps_the_function(tiny_model_dir):
    base = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    ids = torch.tensor([[1, 21, 31, 41]])
    expected = _logits(base, ids)
    model = apply_method(base, TrainConfig(method="pissa", lora={"r": 4, "dropout": 0.0}))
    assert torch.allclose(_logits(model, ids), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "wide_lora", "pissa", "milora"])
def test_every_method_trains_saves_and_reloads_over_the_original_base(tiny_model_dir, tmp_path, method):
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"train.method={method}", "train.epochs=1", "train.lr=5e-3",
        "train.batch_size=4", "train.micro_batch_size=4", "train.warmup_steps=0", "train.lora.r=4",
        "train.lora.dropout=0.0", f"out_dir={tmp_path}", "quiet=true",
    ])
    trainer = finetune(cfg, load_model(cfg.model), load_tokenizer(cfg.model), toy_examples(8), RunDir(tmp_path))
    trained = trainer.model.eval()
    ids = torch.tensor([[1, 22, 33, 44, 55, 66]])
    base_logits = _logits(load_model(cfg.model), ids)
    reloaded = load_checkpoint(tmp_path / "checkpoints" / "epoch-1", cfg.model).eval()
    assert not torch.allclose(_logits(trained, ids), base_logits, atol=1e-4), "training changed nothing"
    assert torch.allclose(_logits(reloaded, ids), _logits(trained, ids), atol=1e-4)
    targets = {n.split(".")[-1] for n, _ in trained.named_modules() if n.endswith(("o_proj", "gate_proj"))
               and hasattr(dict(trained.named_modules())[n], "lora_A")}
    assert bool(targets) == (method == "wide_lora")


def test_loraplus_optimizer_gives_b_a_larger_lr(tiny_model_dir):
    model = apply_method(load_model(ModelConfig(name_or_path=str(tiny_model_dir))),
                         TrainConfig(method="lora", lora={"r": 4}, lr=1e-3, loraplus_lr_ratio=16))
    opt = create_optimizer(model, TrainConfig(method="lora", lr=1e-3, loraplus_lr_ratio=16))
    lrs = sorted({g["lr"] for g in opt.param_groups if g["params"]})
    assert lrs == [pytest.approx(1e-3), pytest.approx(16e-3)]
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        check_method(model, TrainConfig(method="full", loraplus_lr_ratio=16))


def test_full_finetuning_of_named_parameters_only(tiny_model_dir, tmp_path):
    """`train.trainable: [mlp]` trains the MLP weights and leaves every other weight as it was,
    in the trained model and in the saved checkpoint."""
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "train.method=full", "train.trainable=[mlp]", "train.epochs=1",
        "train.lr=5e-3", "train.batch_size=4", "train.micro_batch_size=4", "train.warmup_steps=0",
        f"out_dir={tmp_path}", "quiet=true",
    ])
    before = {n: p.detach().clone() for n, p in load_model(cfg.model).named_parameters()}
    finetune(cfg, load_model(cfg.model), load_tokenizer(cfg.model), toy_examples(8), RunDir(tmp_path))
    after = dict(load_checkpoint(tmp_path / "checkpoints" / "epoch-1", cfg.model).named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    mlp = {n for n in before if ".mlp." in n}
    assert mlp and changed == mlp


def test_trainable_names_are_checked(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    with pytest.raises(ValueError, match=r"train.trainable: \['mpl'\] match no parameter"):
        apply_method(model, TrainConfig(method="full", trainable=["mpl"]))
    with pytest.raises(ValueError, match="only with method: full"):
        TrainConfig(method="lora", trainable=["mlp"])
    kept = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    apply_method(model, TrainConfig(method="full", trainable=["mlp"]))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == kept


def _two_adam_steps(betas: tuple[float, float], eps: float, lr: float, grads: list[float]) -> float:
    """Reference: AdamW without weight decay, from its definition (bias-corrected moments)."""
    p, m, v = 1.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p -= lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)) ** 0.5 + eps)
    return p


@pytest.mark.parametrize("method", ["full", "lora"])
def test_adam_settings_reach_the_optimizer(tmp_path, tiny_model_dir, method):
    """train.adam_beta1/beta2/epsilon are the optimizer the Trainer builds (and LoRA+'s): two
    steps on one weight match AdamW worked out by hand, and differ from the defaults."""
    from transformers import Trainer

    from overmem.train.trainer import training_args

    over = ["train.adam_beta1=0.5", "train.adam_beta2=0.6", "train.adam_epsilon=0.1", "train.lr=0.01",
            f"model.name_or_path={tiny_model_dir}", f"train.method={method}", f"out_dir={tmp_path}"]
    if method == "lora":
        over.append("train.loraplus_lr_ratio=1")
    cfg = load_config(None, over)
    model = torch.nn.Linear(1, 1, bias=False)
    opt = (create_optimizer(model, cfg.train) if method == "lora"
           else Trainer(model=model, args=training_args(cfg, RunDir(tmp_path), model)).create_optimizer())
    with torch.no_grad():
        model.weight.fill_(1.0)
    grads = [0.3, -0.05]
    for g in grads:
        model.weight.grad = torch.tensor([[g]])
        opt.step()
    expected = _two_adam_steps((0.5, 0.6), 0.1, 0.01, grads)
    assert model.weight.item() == pytest.approx(expected, abs=1e-7)
    assert abs(expected - _two_adam_steps((0.9, 0.999), 1e-8, 0.01, grads)) > 1e-3  # the settings matter


@pytest.mark.parametrize("method", ["full", "lora"])
def test_neftune_noise_reaches_the_embeddings(tmp_path, tiny_model_dir, method, monkeypatch):
    """train.neftune_noise_alpha: while training, the input embeddings the model reads are the
    clean ones plus noise drawn uniformly from [-m, m], m = alpha / sqrt(L * d) (L the batch's
    padded length, d the hidden size); without the option they are the clean ones."""
    import overmem.train.trainer as trainer_mod

    seen = []

    class CaptureFirstBatch(trainer_mod.EpochCheckpointCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # Registered after the Trainer's own NEFTune hook, so it sees the noisy output.
            def first_batch(mod, inp, out):
                if not seen:
                    seen.append((inp[0], out.detach(), mod.weight.detach().clone()))

            model.get_input_embeddings().register_forward_hook(first_batch)

    monkeypatch.setattr(trainer_mod, "EpochCheckpointCallback", CaptureFirstBatch)
    noise = {}
    for alpha in (None, 5.0):
        seen.clear()
        over = [f"model.name_or_path={tiny_model_dir}", f"train.method={method}", "train.epochs=1",
                "train.batch_size=4", "train.micro_batch_size=4", "train.warmup_steps=0", "train.lora.r=4",
                f"out_dir={tmp_path / str(alpha)}", "quiet=true"]
        cfg = load_config(None, over + ([f"train.neftune_noise_alpha={alpha}"] if alpha else []))
        finetune(cfg, load_model(cfg.model), load_tokenizer(cfg.model), toy_examples(4), RunDir(cfg.out_dir))
        ids, out, weight = seen[0]
        noise[alpha] = (out - weight[ids], ids.shape[1] * weight.shape[1])
    assert noise[None][0].abs().max().item() == 0.0
    drawn, dims = noise[5.0]
    bound = 5.0 / dims ** 0.5
    assert drawn.abs().max().item() <= bound * (1 + 1e-5)
    assert drawn.abs().max().item() > 0.95 * bound  # thousands of uniform draws come close to the bound
    assert abs(drawn.mean().item()) < 0.05 * bound  # centred
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        load_config(None, ["train.neftune_noise_alpha=0"])


def test_group_by_length_makes_length_grouped_micro_batches(tmp_path, tiny_model_dir):
    """train.group_by_length: the Trainer draws micro-batches of similar lengths (its
    LengthGroupedSampler, which sorts by length within random groups of 4 micro-batches here), so
    an epoch pads far less than the default random order."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from overmem.train.trainer import training_args

    lengths = [3 + i % 4 if i % 2 else 38 + i % 4 for i in range(64)]  # short and long, interleaved
    data = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    model = torch.nn.Linear(1, 1, bias=False)
    padding = {}
    for grouped in (False, True):
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"out_dir={tmp_path}", "train.micro_batch_size=4",
                                 "train.batch_size=4", f"train.group_by_length={str(grouped).lower()}"])
        sampler = Trainer(model=model, args=training_args(cfg, RunDir(tmp_path), model), train_dataset=data)._get_train_sampler()
        assert isinstance(sampler, LengthGroupedSampler) is grouped
        order = list(sampler)
        assert sorted(order) == list(range(64))
        batches = [[lengths[i] for i in order[s:s + 4]] for s in range(0, 64, 4)]
        padding[grouped] = sum(4 * max(b) - sum(b) for b in batches)
    assert padding[True] < padding[False] / 4
