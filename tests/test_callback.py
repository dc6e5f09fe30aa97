import json

from transformers import Trainer, TrainerControl, TrainingArguments

from overmem.callback import OverMemorizationCallback
from overmem.config import EvalConfig, GenerationConfig, ModelConfig, PhaseRule
from overmem.data.encoding import encode_example
from overmem.models import load_model, load_tokenizer
from overmem.results import append_jsonl, read_jsonl
from overmem.train.trainer import ResponseOnlyCollator
from tests.conftest import toy_examples


def test_callback_tracks_each_epoch_and_logs_through_the_trainer(tiny_model_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    tok, model = load_tokenizer(cfg), load_model(cfg)
    train = [dict(zip(("input_ids", "labels"), encode_example(tok, e, max_length=512, add_eos=True)))
             for e in toy_examples(8)]
    cb = OverMemorizationCallback(
        tok, {"test": toy_examples(4, "t", 50)}, tmp_path / "dyn",
        eval_cfg=EvalConfig(bootstrap=100), gen_cfg=GenerationConfig(max_new_tokens=16),
    )
    args = TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=ResponseOnlyCollator(0),
                      callbacks=[cb])
    cb.bind(trainer)
    trainer.train()
    rows = read_jsonl(tmp_path / "dyn" / "dynamics.jsonl")
    assert [(r["checkpoint"], r["split"]) for r in rows] == [("epoch-0", "test"), ("epoch-1", "test"),
                                                             ("epoch-2", "test")]
    logged = [h for h in trainer.state.log_history if "overmem/test/ppl" in h]
    assert [h["overmem/test/ppl"] for h in logged] == [r["ppl"] for r in rows]
    assert rows[2]["ppl"] < rows[0]["ppl"]


def test_onset_stops_training_and_marks_the_checkpoint_to_keep(tmp_path, char_tokenizer):
    cb = OverMemorizationCallback(char_tokenizer, {"test": toy_examples(2)}, tmp_path, on_onset="stop")
    # A hand-made curve: ppl doubles after epoch-2 while accuracy holds -> onset at epoch-3.
    for e, (ppl, acc) in enumerate([(9.0, 0.1), (3.0, 0.7), (2.0, 0.72), (3.5, 0.71)]):
        append_jsonl(tmp_path / "dynamics.jsonl", {
            "checkpoint": f"epoch-{e}", "epoch": float(e), "step": e, "split": "test", "n": 100, "ppl": ppl,
            "ppl_token": ppl, "accuracy": acc, "accuracy_ci_low": acc - 0.05, "accuracy_ci_high": acc + 0.05})
    control = TrainerControl()
    cb._check_onset(control)
    assert control.should_training_stop and cb.onset == "epoch-3"
    keep = json.loads((tmp_path / "keep.json").read_text())
    assert keep["onset"] == "epoch-3" and keep["keep"] == "epoch-2"


def test_phase_split_defaults_to_the_runs_first_test_split(tmp_path, char_tokenizer):
    splits = {name: toy_examples(2) for name in ("train", "validation", "gsm8k", "math")}
    cb = OverMemorizationCallback(char_tokenizer, splits, tmp_path)
    assert cb.phase_split == "gsm8k" and cb.token_splits == ["gsm8k"]
    cb = OverMemorizationCallback(char_tokenizer, splits, tmp_path, rule=PhaseRule(split="math"))
    assert cb.phase_split == "math"
    only_valid = {"train": toy_examples(2), "validation": toy_examples(2)}
    assert OverMemorizationCallback(char_tokenizer, only_valid, tmp_path).phase_split == "validation"
