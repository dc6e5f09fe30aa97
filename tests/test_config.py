import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from overmem.config import ConfigError, RunConfig, dump_config, load_config
from overmem.train.methods import lora_alpha, lora_targets


def test_defaults_follow_table6():
    c = RunConfig()
    assert (c.train.batch_size, c.train.warmup_steps, c.train.epochs, c.train.scheduler) == (128, 100, 10, "linear")
    assert (c.train.lora.r, c.train.lora.dropout) == (64, 0.05)
    assert (lora_alpha(c.train), lora_targets(c.train)) == (128, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    wide = c.train.model_copy(update={"method": "wide_lora"})
    assert lora_targets(wide)[-2:] == ["o_proj", "gate_proj"] and lora_alpha(wide) == 128
    assert lora_alpha(c.train.model_copy(update={"method": "milora"})) == 64
    assert c.train.grad_accum == 16


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name_or_path: some/model\ntrain:\n  lr: 1.0e-5\n  method: full\n")
    c = load_config(p, ["train.lr=3e-4", "train.lora.target_modules=[q_proj, v_proj]", "data.tests={a: gsm8k:test}"])
    assert c.model.name_or_path == "some/model"
    assert c.train.lr == pytest.approx(3e-4) and c.train.method == "full"
    assert c.train.lora.target_modules == ["q_proj", "v_proj"]
    assert c.data.tests == {"a": "gsm8k:test"}
    again = RunConfig.model_validate(yaml.safe_load(dump_config(c)))
    assert again == c


@pytest.mark.parametrize(
    "text, field",
    [
        ("train:\n  lr: -1\n", "train.lr"),
        ("train:\n  method: qlora\n", "train.method"),
        ("train:\n  batch_size: 10\n  micro_batch_size: 4\n", "train"),
        ("trian:\n  lr: 1\n", "trian"),
        ("data:\n  tests: {train: gsm8k:test}\n", "data.tests"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and f"field '{field}" in msg and "\n" not in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("imports", [
    # Every RunConfig imports the analyses' settings (seconds of import time for `overmem select/plot/report`).
    "from overmem.config import RunConfig, load_config\nRunConfig()\nload_config(None, ['train.lr=1e-4'])\n",
    # The command line imports `vllm_backend` (for its error type), which implements the backend
    # interface: seconds of start-up for every command, and for the tracking worker, which imports
    # the command line's module before it can arrange to die with the run.
    "import overmem.backend_api, overmem.vllm_backend, overmem.cli\n",
], ids=["settings", "command line"])
def test_settings_and_the_command_line_load_without_torch(imports):
    """Neither may pull in torch or transformers."""
    code = f"import sys\n{imports}print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_override_mapping_with_a_key_twice_is_refused():
    with pytest.raises(ConfigError, match=r"^override 'data.tests=\{a: x, a: y\}': key 'a' is given twice; keep one$"):
        load_config(None, ["data.tests={a: x, a: y}"])
    assert load_config(None, ["data.tests={a: gsm8k:test, b: svamp}"]).data.tests == {"a": "gsm8k:test", "b": "svamp"}
