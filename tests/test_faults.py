"""Bad input and faults, through the real command line: what a user can get wrong (or what can go
wrong while a command runs), the exit code, a fragment of the one-line message, and that nothing is
left behind that a later run would trust. One section per area."""

import errno
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from overmem.cli import main
from overmem.config import EvalConfig, GenerationConfig, dump_config, load_config
from overmem.data.example import Example
from overmem.data.file_examples import load_file
from overmem.dynamics import evaluate_checkpoint
from overmem.results import RunDir, read_jsonl, write_jsonl
from tests.conftest import (DATA_DIR, make_tiny_llama, processes_named, random_lora_adapter, toy_examples,
                            write_toy_jsonl)

# ---- code grading: a forged pass, programs outliving their grader ------------------------------

HUMANEVAL = DATA_DIR / "humaneval" / "HumanEval.jsonl"
needs_humaneval = pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"no HumanEval file at {HUMANEVAL}")

# A wrong program that claims to have run its tests: it prints every 32-hex string of its own file
# (where the old harness wrote its "ran to the end" marker) and leaves with exit code 0.
_FORGED = ("```python\nimport os, re, sys\ndef {entry}(*args):\n    return None\n"
           "for m in re.findall(r'[0-9a-f]{{32}}', open(__file__).read()):\n    sys.stdout.write('\\n' + m + '\\n')\n"
           "sys.stdout.flush()\nos._exit(0)\n```")

# A program that sleeps (and leaves a daemon of its own, in a session of its own), each process
# named `token` so that survivors are found.
_SLEEPER = ("```python\nimport ctypes, os, time\ndef {entry}(*args):\n    return None\n"
            "ctypes.CDLL(None).prctl(15, b'{token}', 0, 0, 0)\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\n    os._exit(0)\ntime.sleep(120)\n```")


def _humaneval_generations(path, template, n=2, **fields):
    problems = [json.loads(line) for line in HUMANEVAL.read_text().splitlines()[:n]]
    write_jsonl(path, [{"id": p["task_id"], "generation": template.format(entry=p["entry_point"], **fields)}
                       for p in problems])
    return path


def _wait_for(condition, seconds=60.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _leftovers(pid):
    """Program folders and pids cgroups named after grader `pid`."""
    from overmem.sandbox import CGROUP_PREFIX, FOLDER_PREFIX

    import tempfile

    found = list(Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}{pid}-*"))
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        found += [p for p in root.glob(f"{CGROUP_PREFIX}{pid}-*") if p.is_dir()]
    return found


@needs_humaneval
def test_grade_a_program_that_prints_the_end_marker_and_exits_0_is_not_passed(tmp_path, capsys):
    gens = _humaneval_generations(tmp_path / "gens.jsonl", _FORGED)
    out = tmp_path / "grades.json"
    assert main(["grade", "--data", "humaneval[:2]", "--data-dir", str(DATA_DIR), "--generations", str(gens),
                 "--out", str(out), "--timeout", "10"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 2 and result["n_correct"] == 0, result
    rows = read_jsonl(tmp_path / "grades.samples.jsonl")
    assert [r["failure"] for r in rows] == ["the program exited before its tests ran (exit code 0)"] * 2


def _grade_sleepers(tmp_path, token):
    gens = _humaneval_generations(tmp_path / "gens.jsonl", _SLEEPER, token=token)
    argv = [sys.executable, "-m", "overmem", "grade", "--data", "humaneval[:2]", "--data-dir", str(DATA_DIR),
            "--generations", str(gens), "--out", str(tmp_path / "grades.json"), "--timeout", "100"]
    grader = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Both programs and their daemons are up (4 processes), or the test cannot tell anything.
    assert _wait_for(lambda: len(processes_named(token)) >= 4), (processes_named(token), grader.poll())
    return grader


@needs_humaneval
def test_grade_sigterm_kills_its_programs_and_leaves_nothing(tmp_path):
    token = "term" + os.urandom(4).hex()
    grader = _grade_sleepers(tmp_path, token)
    grader.send_signal(signal.SIGTERM)
    _, err = grader.communicate(timeout=60)
    assert grader.returncode == 143 and "terminated; re-run the same command" in err, err
    assert processes_named(token) == [] and _leftovers(grader.pid) == []
    assert not (tmp_path / "grades.json").exists()


@needs_humaneval
def test_grade_sigkill_its_supervisors_kill_its_programs(tmp_path):
    token = "kill" + os.urandom(4).hex()
    grader = _grade_sleepers(tmp_path, token)
    grader.kill()
    grader.communicate(timeout=60)
    # The kernel tells each program's supervisor that the grader died; it takes the program down.
    gone = _wait_for(lambda: processes_named(token) == [] and _leftovers(grader.pid) == [], 30)
    assert gone, (processes_named(token), _leftovers(grader.pid))


@needs_humaneval
def test_grade_killed_with_its_supervisors_is_cleaned_by_the_next_grade(tmp_path):
    token = "left" + os.urandom(4).hex()
    grader = _grade_sleepers(tmp_path, token)
    supervisors = [int(p) for p in Path(f"/proc/{grader.pid}/task/{grader.pid}/children").read_text().split()]
    for pid in [grader.pid, *supervisors]:  # all at once: no supervisor is left to clean up
        os.kill(pid, signal.SIGKILL)
    grader.communicate(timeout=60)
    time.sleep(0.5)
    left = _leftovers(grader.pid)
    assert left, "the test needs leftovers to clean"
    from overmem.sandbox import SANDBOX_UID, clean_leftovers

    programs = processes_named(token)
    sandbox_uids = all(SANDBOX_UID <= Path(f"/proc/{pid}").stat().st_uid for pid in programs)
    clean_leftovers()  # what the next grade on this machine does first
    assert [p for p in left if p.exists()] == []
    if os.geteuid() == 0 and sandbox_uids:  # programs of an unprivileged uid of their own: found by it
        assert _wait_for(lambda: processes_named(token) == [], 10), processes_named(token)


# ---- training: settings the Trainer checks, divergence, kills ---------------------------------


def _train_args(model_dir, files, out, *sets, epochs=2, batch_size=8):
    """`overmem run` on the tiny model: 16 training examples, `batch_size / 4` micro-batches a step."""
    config = out.parent / "config.yaml"
    config.write_text("quiet: true\n")
    base = [
        f"model.name_or_path={model_dir}", f"data.train={files['train']}[:16]",
        f"data.tests={{test: {files['test']}}}", "data.monitor_size=6", "data.validation_size=6",
        "train.method=full", f"train.epochs={epochs}", "train.lr=5e-3", f"train.batch_size={batch_size}",
        "train.micro_batch_size=4", "train.warmup_steps=0", "generation.max_new_tokens=8", "eval.bootstrap=200",
    ]
    return ["run", str(config), "--out", str(out), *[a for s in (*base, *sets) for a in ("--set", s)]]


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


# (overrides, fragment of the message). Each is refused with exit 2 before the run folder exists:
# found mid-run, it would leave a folder whose corrected re-run is refused as "a different train section".
TRAIN_SETTINGS = [
    (["train.scheduler=bogus"], "train.scheduler: unknown scheduler 'bogus'; choose one of linear, cosine"),
    (["train.optimizer=bogus"], "train.optimizer: unknown optimizer 'bogus'"),
    (["train.scheduler=cosine_with_min_lr"], "train.scheduler: 'cosine_with_min_lr' cannot be used here"),
    (["train.scheduler=warmup_stable_decay"], "train.scheduler: 'warmup_stable_decay' cannot be used here"),
    (["train.scheduler=reduce_lr_on_plateau"], "train.scheduler: lr_scheduler_type reduce_lr_on_plateau requires"),
    (["train.scheduler=greedy"], "train.scheduler: lr_scheduler_type greedy requires an eval strategy"),
    pytest.param(["train.optimizer=adamw_bnb_8bit"], "train.optimizer: 'adamw_bnb_8bit': You need to install "
                 "`bitsandbytes`", marks=pytest.mark.skipif(not _missing("bitsandbytes"), reason="installed")),
    pytest.param(["train.optimizer=lomo"], "train.optimizer: 'lomo': You need to install `lomo_optim`",
                 marks=pytest.mark.skipif(not _missing("lomo_optim"), reason="installed")),
    (["train.report_to=[bogus]"], "train.report_to: bogus is not supported"),
    pytest.param(["train.report_to=[wandb]"], "train.report_to: wandb not installed",
                 marks=pytest.mark.skipif(not _missing("wandb"), reason="installed")),
    (["train.trainable=[mpl]"], "train.trainable: ['mpl'] match no parameter"),
    (["train.loraplus_lr_ratio=4"], "train.loraplus_lr_ratio: the LoRA+ optimizer needs an adapter method"),
    (["train.method=lora", "train.lora.target_modules=[nope_proj]"],
     "train.lora.target_modules: ['nope_proj'] not found in the model"),
]


@pytest.mark.parametrize("sets, fragment", TRAIN_SETTINGS)
def test_train_settings_are_refused_before_anything_is_written(tiny_model_dir, toy_jsonl, tmp_path, capsys,
                                                               sets, fragment):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, toy_jsonl, out, *sets)) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_train_split_row_of_a_diverged_model_is_null_and_counted():
    from overmem.config import EvalConfig
    from overmem.dynamics import split_summary

    samples = [{"nll_sum": 4.0, "n_tokens": 2, "ppl": 7.39, "truncated": False},
               {"nll_sum": float("nan"), "n_tokens": 3, "ppl": float("nan"), "truncated": False}]
    row = split_summary(samples, EvalConfig())
    assert row["ppl"] is row["ppl_token"] is row["nll_token"] is None
    assert row["non_finite"] == 1 and row["n"] == 2
    assert "non_finite" not in split_summary(samples[:1], EvalConfig())


@pytest.mark.slow
@pytest.mark.parametrize("batch_size, fragment", [
    (8, "training diverged at step 2 (loss nan)"),  # step 1 makes the weights useless, step 2's loss shows it
    (16, "training diverged by step 1: epoch-1 has non-finite losses (6 of 6 on train"),  # one step an epoch
])
def test_train_diverged_run_exits_1_and_keeps_what_it_finished(tiny_model_dir, toy_jsonl, tmp_path, capsys,
                                                               batch_size, fragment):
    """A huge learning rate: the run stops with exit 1 and one line naming the step and what to change;
    dynamics.jsonl holds no NaN (the diverged checkpoint's perplexities are null and counted), and phases,
    selection and report describe the checkpoints before the divergence."""
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, toy_jsonl, out, "train.lr=1e10", batch_size=batch_size)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert fragment in err and "lower train.lr (now 1e+10)" in err
    text = out.joinpath("dynamics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = read_jsonl(out / "dynamics.jsonl")
    finite = {r["checkpoint"] for r in rows if r["ppl"] is not None}
    assert finite == {"epoch-0"}
    assert all(r["non_finite"] == r["n"] for r in rows if r["ppl"] is None)
    phases = json.loads((out / "phases.json").read_text())
    assert [c["checkpoint"] for c in phases["checkpoints"]] == ["epoch-0"]
    assert json.loads((out / "selection.json").read_text())["choices"]["recommended"]["checkpoint"] == "epoch-0"
    assert (out / "report.html").stat().st_size > 0


def _rows_without_timing(out):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(out / "dynamics.jsonl")]


@pytest.mark.slow
def test_train_sigkill_while_the_trainer_saves_then_rerun(tiny_model_dir, toy_jsonl, tmp_path):
    """SIGKILL `overmem run` as soon as the Trainer starts writing its first resume checkpoint; the
    same command then finishes the run with the numbers of a run that was never killed."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(_train_args(tiny_model_dir, toy_jsonl, ref, epochs=3)) == 0
    cmd = [sys.executable, "-m", "overmem.cli", *_train_args(tiny_model_dir, toy_jsonl, out, epochs=3)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "trainer_state" / "checkpoint-2").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "epoch-3").exists()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _rows_without_timing(out) == _rows_without_timing(ref)


# ---- length: over-length input and references with no scorable token --------------------------
# Not errors: the example is cut (the prompt loses its start; see data/encoding.fit_lengths) or left
# out of the perplexity, and every row says so. `overmem evaluate` exits 0 on each.

_QUESTION = "Tom has 2 apples and buys 3 more. How many apples does he have?"
_RESPONSE = "He has 2 + 3 = <<2+3=5>>5 apples.\n#### 5"

# (question, reference, tokens of the reference scored) with train.max_length=512 and one token a character.
LENGTH_CASES = [
    pytest.param("Tom counts apples. " * 32 + _QUESTION, _RESPONSE, len(_RESPONSE), id="600-token question"),
    pytest.param("Tom counts apples. " * 5300 + _QUESTION, _RESPONSE, len(_RESPONSE), id="100k-character question"),
    pytest.param(_QUESTION, "He counts. " * 70 + _RESPONSE, 511, id="reference longer than max_length"),
]


@pytest.mark.parametrize("question, response, n_scored", LENGTH_CASES)
def test_length_overlong_example_is_cut_and_counted(tiny_model_dir, toy_jsonl, tmp_path, capsys,
                                                    question, response, n_scored):
    """The toy test file plus one over-length example: the example used to score no token (its NaN left
    out of the mean while `n` counted it) or to reach generation whole (100k positions of attention).
    Now its perplexity is finite, its row says `truncated`, the split row counts it in `n_truncated`,
    and the command ends in bounded time."""
    data = tmp_path / "data.jsonl"
    data.write_text(toy_jsonl["test"].read_text() + json.dumps({"question": question, "answer": response}) + "\n")
    res = tmp_path / "eval.json"
    start = time.monotonic()
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(res), "-q",
                 "--set", "train.max_length=512", "--set", "generation.max_new_tokens=8"]) == 0
    assert time.monotonic() - start < 120
    assert "n=9  n_truncated=1  ppl=" in capsys.readouterr().out
    row = json.loads(res.read_text())
    assert row["n"] == 9 and row["n_truncated"] == 1 and "n_skipped" not in row and math.isfinite(row["ppl"])
    samples = read_jsonl(tmp_path / "eval.samples.jsonl")
    (cut,) = [s for s in samples if s["truncated"]]
    assert cut["n_tokens"] == n_scored and math.isfinite(cut["ppl"]) and isinstance(cut["generation"], str)
    assert "NaN" not in res.read_text() + (tmp_path / "eval.samples.jsonl").read_text()


def test_length_reference_with_no_scorable_token_is_skipped_and_counted(tmp_path, char_tokenizer):
    """An empty reference (data files refuse one; a callback's own examples may hold one) has no
    perplexity: its sample row says null, the split's `ppl` is the mean over the scored examples and the
    row states `n` and `n_skipped`; nothing written holds NaN."""
    model = make_tiny_llama(len(char_tokenizer), seed=1)
    examples = [*toy_examples(2), Example("empty", _QUESTION, "", "5")]
    run = RunDir(tmp_path / "run")
    (row,) = evaluate_checkpoint(
        model, char_tokenizer, {"test": examples}, run, checkpoint="epoch-1", epoch=1.0, step=1,
        eval_cfg=EvalConfig(bootstrap=100), gen_cfg=GenerationConfig(max_new_tokens=4), max_length=512, quiet=True,
    )
    samples = read_jsonl(run.samples("epoch-1", "test"))
    assert row["n"] == 3 and row["n_skipped"] == 1 and "n_truncated" not in row
    assert samples[2]["n_tokens"] == 0 and samples[2]["ppl"] is None and samples[2]["truncated"] is False
    assert row["ppl"] == pytest.approx((samples[0]["ppl"] + samples[1]["ppl"]) / 2)
    assert row["accuracy"] is not None  # every example was still asked
    assert "NaN" not in run.dynamics.read_text() + run.samples("epoch-1", "test").read_text()


# ---- command line: input errors, corrupt files, merge, select, analysis files -----------------
# A row: what the user got wrong (set up in a fresh folder beside a shared small world: a tiny base,
# another base of the same shapes, one of other shapes, two LoRA adapters of the first, data files,
# and a run folder with its dynamics, phases, selection and figure), the command line, the exit code
# (2: usage and input errors; 1: failures), a fragment of the one-line message, and that no file was
# written or changed.


def _lora_adapter(base, path, tokenizer, seed):
    """A LoRA adapter over `base`, as if trained (records `base`)."""
    return random_lora_adapter(AutoModelForCausalLM.from_pretrained(base), path, tokenizer, seed,
                               r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])


def _dynamics_rows():
    """Four checkpoints: perplexity falls, then rises while accuracy stays (over-memorization)."""
    rows = []
    for epoch, (ppl, acc) in enumerate([(3.0, 0.25), (2.0, 0.5), (1.8, 0.75), (2.9, 0.75)]):
        for split, shift in (("train", -0.5), ("validation", 0.0), ("test", 0.1)):
            rows.append({"checkpoint": f"epoch-{epoch}", "epoch": epoch, "step": 2 * epoch, "split": split, "n": 8,
                         "ppl": ppl + shift, "ppl_token": ppl + shift, "nll_token": math.log(ppl + shift),
                         "n_tokens": 300, "accuracy": acc, "accuracy_ci_low": acc - 0.25,
                         "accuracy_ci_high": acc + 0.25})
    return rows


@pytest.fixture(scope="module")
def world(tiny_model_dir, char_tokenizer, tmp_path_factory):
    """What the rows start from; a row copies what it breaks into its own folder."""
    root = tmp_path_factory.mktemp("world")
    files = write_toy_jsonl(root)
    other = root / "other-base"
    make_tiny_llama(len(char_tokenizer), seed=1).save_pretrained(other)
    char_tokenizer.save_pretrained(other)
    adapters = [_lora_adapter(tiny_model_dir, root / f"epoch-{i}", char_tokenizer, seed=i) for i in (1, 2)]
    wide = root / "wide-base"  # another architecture: hidden size 48, not 32
    config = make_tiny_llama(len(char_tokenizer)).config
    config.hidden_size = 48
    AutoModelForCausalLM.from_config(config).save_pretrained(wide)
    char_tokenizer.save_pretrained(wide)
    run = root / "run"
    run.mkdir()
    sets = [f"model.name_or_path={tiny_model_dir}", f"data.train={files['train']}[:16]",
            f"data.tests={{test: {files['test']}}}", "data.monitor_size=6", "data.validation_size=6",
            "generation.max_new_tokens=4", "eval.bootstrap=100", "quiet=true"]
    (run / "config.yaml").write_text(dump_config(load_config(None, sets)))
    write_jsonl(run / "dynamics.jsonl", _dynamics_rows())
    assert main(["plot", str(run)]) == 0  # phases.json, selection.json and the figure
    return SimpleNamespace(root=root, model=tiny_model_dir, other=other, wide=wide, adapters=adapters, files=files,
                           run=run)


def _copy(src, dest):
    return shutil.copytree(src, dest) if src.is_dir() else shutil.copy(src, dest)


def _garble(path):
    path.write_text("{")


def _cut(path, keep=-64):
    path.write_bytes(path.read_bytes()[:keep])


def _tree(*folders):
    """Every file and folder under `folders` with size and modification time: what 'nothing written' compares."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for folder in folders for p in folder.rglob("*")}


def _model(w, file, how):
    """A copy of the tiny base with one file broken by `how`."""
    how(_copy(w.model, w.tmp / "model") / file)


def _adapter(w, file, how, i=0):
    how(_copy(w.adapters[i], w.tmp / f"epoch-{i + 1}") / file)


def _run(w, how=None):
    """A copy of the run folder; `how` breaks something in it."""
    _copy(w.run, w.tmp / "run")
    if how is not None:
        how(w.tmp / "run")


def _lines(edit):
    """Break dynamics.jsonl by editing its list of lines."""
    def how(run):
        lines = (run / "dynamics.jsonl").read_text().splitlines(keepends=True)
        (run / "dynamics.jsonl").write_text("".join(edit(lines)))
    return how


def _write(rel, text):
    def how(run):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    return how


def _evaluate(w, *extra, model=None, data=None, out=None):
    return ["evaluate", "--model", model or w.model, "--data", data or w.files["test"],
            "--out", out or w.tmp / "e.json", "-q", *extra]


def _run_cmd(w, *sets, out=None):
    return ["run", w.run / "config.yaml", "--out", out or w.tmp / "new", *[a for s in sets for a in ("--set", s)]]


def _merge(w, *extra, base=None, checkpoints=None):
    return ["merge", "--base", base or w.model, "--checkpoints", *(checkpoints or w.adapters),
            "--out", w.tmp / "merged", "-q", *extra]


def _checkpoint_in_run(w, name):
    """A copy of the run folder with the tiny base saved as its checkpoint `name`."""
    if not (w.tmp / "run").exists():
        _run(w)
    ckpt = _copy(w.model, w.tmp / "run" / "checkpoints" / name)
    (ckpt / "overmem.json").write_text(json.dumps({"epoch": float(name.split("-")[1]), "step": 2}))
    return ckpt


def _scan_trainer_folder(w, how):
    """A Trainer output folder with one full checkpoint, broken by `how`."""
    ckpt = _copy(w.model, w.tmp / "hf" / "checkpoint-5")
    (ckpt / "trainer_state.json").write_text('{"epoch": 1.0, "global_step": 5}')
    how(ckpt)


def _grade_cmd(w, *extra):
    return ["grade", "--data", w.files["test"], "--generations", w.tmp / "g.jsonl", "--out", w.tmp / "g.json", *extra]


def _row_value(index, field, value):
    """Set `field` of dynamics row `index` (0-based) to `value` (NaN and infinity written as Python's json does)."""
    def edit(lines):
        row = json.loads(lines[index])
        row[field] = value
        return [*lines[:index], json.dumps(row) + "\n", *lines[index + 1:]]
    return _lines(edit)


def _run_config_edit(w, old, new):
    cfg = w.tmp / "run" / "config.yaml"
    assert old in cfg.read_text()
    cfg.write_text(cfg.read_text().replace(old, new))


def _sleeping_interpreter(w):
    """An engine interpreter that never answers (it waits without reading its requests)."""
    script = w.tmp / "python"
    script.write_text("#!/bin/sh\nexec sleep 300\n")
    script.chmod(0o755)


def test_vllm_an_interpreter_wrapper_leaves_no_child_after_the_start_timeout(world, tmp_path, capsys):
    """An engine interpreter that is a shell script running Python without exec: when it does not
    answer in time, its child is killed with it (the engine runs in a process group of its own)."""
    marker = f"overmem-wrapped-{os.getpid()}"
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{sys.executable} -c 'import time; time.sleep(300)' {marker}\n")
    script.chmod(0o755)
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    args = _evaluate(w, "--set", "eval.backend=vllm", "--set", f"eval.vllm.python={script}",
                     "--set", "eval.vllm.start_timeout_s=2")
    assert _cli(args) == 1
    assert "did not start within 2 s" in capsys.readouterr().err

    def wrapped() -> list[str]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(entry.name)
            except OSError:
                continue
        return found

    deadline = time.monotonic() + 10
    while wrapped() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert wrapped() == [], "the wrapper's child outlived the start timeout"


def _bad_override(override, fragment, id):
    """A BAD_INPUT row: `overmem evaluate --set OVERRIDE` on the shared world, refused with exit 2."""
    return pytest.param(None, lambda w: _evaluate(w, "--set", override), 2, fragment, id=id)


BAD_INPUT = [
    # config files and --set
    _bad_override("train.lr=[", "override 'train.lr=[': the value is not valid YAML (expected the node content",
                  id="set: open list"),
    _bad_override("data.tests={", "override 'data.tests={': the value is not valid YAML", id="set: open mapping"),
    _bad_override("train.lr=\t", "the value is not valid YAML (found character '\\t' that cannot start any token",
                  id="set: tab"),
    _bad_override("=1", "override '=1': empty name in the key", id="set: empty key"),
    _bad_override("train.lr", "override 'train.lr': expected key.path=value", id="set: no value"),
    _bad_override("train.lr=.inf", "field 'train.lr': Input should be a finite number", id="float: infinity"),
    _bad_override("selection.ppl_band=.nan", "field 'selection.ppl_band': Input should be a finite number",
                  id="float: NaN"),
    _bad_override("phases.eps=.inf", "field 'phases.eps': Input should be a finite number", id="phase rule: infinity"),
    _bad_override("train.epochs=yes", "field 'train.epochs': Value error, expected a number, got true",
                  id="int: a boolean"),
    _bad_override("analysis.mia.size=true", "field 'analysis.mia.size': Value error, expected a number, got true",
                  id="analysis int: a boolean"),
    _bad_override("model.dtype=float8",
                  "field 'model.dtype': Input should be 'auto', 'float32', 'bfloat16' or 'float16'", id="literal"),
    pytest.param(None, lambda w: _evaluate(w, "--set", "eval.backend=vllm", "--set",
                                            f"eval.vllm.python={w.tmp}/no-python"), 1,
                 "error: eval.vllm.python: cannot run '{tmp}/no-python'", id="vllm: no such interpreter"),
    _bad_override("data.tests=[a]", "field 'data.tests': Input should be a valid dictionary", id="dict: a list"),
    pytest.param(lambda w: (w.tmp / "c.yaml").write_text("train:\n  lr: [1e-4\n"), lambda w: ["run", w.tmp / "c.yaml"],
                 2, "c.yaml: invalid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1",
                 id="config: invalid YAML"),
    pytest.param(lambda w: (w.tmp / "c.yaml").write_text("- a\n"), lambda w: ["run", w.tmp / "c.yaml"], 2,
                 "c.yaml: expected a mapping at the top level", id="config: a list"),
    pytest.param(lambda w: _run(w, _write("config.yaml", "train: [\n")), lambda w: _run_cmd(w, out=w.tmp / "run"), 2,
                 "run/config.yaml: invalid YAML: expected the node content", id="run: resume with a broken config.yaml"),
    pytest.param(None, lambda w: _run_cmd(w, "selection.valid_split=valid"), 2,
                 "selection.valid_split: 'valid' is not a tracked split; choose one of train, validation, test",
                 id="run: unknown validation split"),
    pytest.param(None, lambda w: _run_cmd(w, "phases.split=tset"), 2,
                 "phases.split: 'tset' is not a tracked split", id="run: unknown phase split"),
    pytest.param(None, lambda w: _run_cmd(w, "train.epochs=2", "merge=[[epoch-1, epoch-5]]"), 2,
                 "merge: 'epoch-5' in ['epoch-1', 'epoch-5'] is not a checkpoint this run saves (epoch-1 .. epoch-2)",
                 id="run: merge of a checkpoint never saved"),
    pytest.param(None, lambda w: _run_cmd(w, "merge=[[epoch-1, epoch-1]]"), 2,
                 "merge: ['epoch-1', 'epoch-1'] names a checkpoint twice", id="run: merge of one checkpoint twice"),
    pytest.param(lambda w: (w.tmp / "notes.txt").write_text("x"), lambda w: _run_cmd(w, out=w.tmp / "notes.txt"), 2,
                 "--out {tmp}/notes.txt: is a file; give a folder", id="run: --out is a file"),
    pytest.param(None, lambda w: ["demo", "--epochs", "0", "--out", w.tmp / "demo"], 2,
                 "argument --epochs: must be at least 1, got 0", id="demo: zero epochs"),
    pytest.param(None, lambda w: ["demo", "--set", "train.bogus=1", "--out", w.tmp / "demo"], 2,
                 "demo config: field 'train.bogus': Extra inputs are not permitted",
                 id="demo: bad --set, refused before the pretraining"),
    # data specs and data files
    pytest.param(None, lambda w: _evaluate(w, data=f"{w.files['test']}[5:2]"), 2,
                 "test.jsonl[5:2]: the slice selects no examples (of 8)", id="spec: empty slice [5:2]"),
    pytest.param(None, lambda w: _evaluate(w, data=f"{w.files['test']}[3:3]"), 2,
                 "test.jsonl[3:3]: the slice selects no examples", id="spec: empty slice [3:3]"),
    pytest.param(None, lambda w: _evaluate(w, data=f"{w.files['test']}[-1:-3]"), 2,
                 "test.jsonl[-1:-3]: the slice selects no examples", id="spec: empty negative slice"),
    pytest.param(None, lambda w: _evaluate(w, "--max-examples", "0"), 2,
                 "argument --max-examples: must be at least 1, got 0", id="evaluate: --max-examples 0"),
    pytest.param(lambda w: (w.tmp / "d.jsonl").write_bytes(b'{"question": "\xff"}\n'),
                 lambda w: _evaluate(w, data=w.tmp / "d.jsonl"), 2, "d.jsonl: not UTF-8 text (byte 14: invalid start byte)",
                 id="data: not UTF-8"),
    pytest.param(lambda w: (w.tmp / "d.csv").write_text("question,answer\nTom has 1,000 apples,#### 5\n"),
                 lambda w: _evaluate(w, data=w.tmp / "d.csv"), 2,
                 "d.csv line 2: 3 fields but the header has 2; quote fields that contain commas", id="csv: extra field"),
    pytest.param(lambda w: (w.tmp / "d.csv").write_text('question,answer\n"Tom has 1,#### 1\n'),
                 lambda w: _evaluate(w, data=w.tmp / "d.csv"), 2, "d.csv line 2: 1 fields but the header has 2",
                 id="csv: unclosed quote"),
    pytest.param(None, lambda w: _evaluate(w, "--data-dir", w.tmp / "nope", data="gsm8k:test"), 2,
                 "data folder {tmp}/nope (from data_dir) does not exist", id="data: --data-dir not found"),
    pytest.param(lambda w: (w.tmp / "d.jsonl").mkdir(), lambda w: _evaluate(w, data=w.tmp / "d.jsonl"), 2,
                 "d.jsonl is a folder; give a .jsonl, .json or .csv file", id="data: a folder"),
    # evaluate: output paths and unreadable model files
    pytest.param(lambda w: (w.tmp / "out").mkdir(), lambda w: _evaluate(w, out=w.tmp / "out"), 2,
                 "--out {tmp}/out: is a folder; give a file path", id="evaluate: --out is a folder"),
    pytest.param(lambda w: (w.tmp / "f").write_text("x"), lambda w: _evaluate(w, out=w.tmp / "f" / "e.json"), 2,
                 "{tmp}/f is a file, not a folder", id="evaluate: --out under a file"),
    pytest.param(lambda w: _model(w, "config.json", _garble), lambda w: _evaluate(w, model=w.tmp / "model"), 2,
                 "{tmp}/model: cannot load it (It looks like the config file at", id="model: broken config.json"),
    pytest.param(lambda w: _model(w, "model.safetensors", _cut), lambda w: _evaluate(w, model=w.tmp / "model"), 2,
                 "{tmp}/model/model.safetensors: truncated or corrupt weights", id="model: truncated weights"),
    pytest.param(lambda w: _model(w, "tokenizer.json", _garble), lambda w: _evaluate(w, model=w.tmp / "model"), 2,
                 "{tmp}/model: a JSON file is truncated or corrupt", id="model: broken tokenizer.json"),
    pytest.param(lambda w: _adapter(w, "adapter_model.safetensors", _cut),
                 lambda w: _evaluate(w, "--adapter", w.tmp / "epoch-1"), 2,
                 "{tmp}/epoch-1/adapter_model.safetensors: truncated or corrupt weights", id="adapter: truncated"),
    pytest.param(lambda w: _adapter(w, "adapter_config.json", _garble),
                 lambda w: _evaluate(w, "--adapter", w.tmp / "epoch-1"), 2,
                 "{tmp}/epoch-1/adapter_config.json line 1: not valid JSON", id="adapter: broken adapter_config.json"),
    pytest.param(None, lambda w: _evaluate(w, "--adapter", w.adapters[0], model=w.wide), 2,
                 "epoch-1/adapter_config.json: trained on base '{model}', but the base given is '{root}/wide-base' "
                 "({model} holds other weights)", id="adapter: over a base of other shapes"),
    pytest.param(lambda w: _adapter(w, "adapter_config.json", lambda p: p.write_text(p.read_text().replace(
                     str(w.model), "someone/not-on-this-machine"))),
                 lambda w: _evaluate(w, "--adapter", w.tmp / "epoch-1", model=w.wide), 2,
                 "epoch-1: the adapter does not fit the base {root}/wide-base (size mismatch for base_model.model.model."
                 "layers.0.self_attn.q_proj.lora_A.default.weight", id="adapter: recorded base unknown, other shapes"),
    # select and plot on a run folder
    pytest.param(lambda w: _run(w, _lines(lambda ls: [*ls[:-1], ls[-1][:40]])), lambda w: ["select", w.tmp / "run"],
                 2, "run/dynamics.jsonl line 12: incomplete last line (an interrupted write)",
                 id="select: torn last line"),
    pytest.param(lambda w: _run(w, _lines(lambda ls: [*ls[:-1], ls[-1][:40]])), lambda w: ["plot", w.tmp / "run"],
                 2, "run/dynamics.jsonl line 12: incomplete last line", id="plot: torn last line"),
    pytest.param(lambda w: _run(w, _lines(lambda ls: [*ls, "[1, 2]\n"])), lambda w: ["select", w.tmp / "run"], 2,
                 "run/dynamics.jsonl line 13: expected a JSON object, got list", id="select: row not an object"),
    pytest.param(lambda w: _run(w, _lines(lambda ls: [*ls, '{"checkpoint": "epoch-9"}\n'])),
                 lambda w: ["select", w.tmp / "run"], 2, "run/dynamics.jsonl: row 13 has no epoch, split, ppl",
                 id="select: row without its fields"),
    pytest.param(lambda w: _run(w, _write("config.yaml", "train: [\n")), lambda w: ["select", w.tmp / "run"], 2,
                 "run/config.yaml: invalid YAML: expected the node content, but found '<stream end>' at line 2",
                 id="select: broken config.yaml"),
    pytest.param(None, lambda w: ["select", w.run, "--band", "nan"], 2,
                 "argument --band: expected a finite number >= 0, got nan", id="select: --band nan"),
    pytest.param(None, lambda w: ["select", w.run, "--band", "-0.1"], 2,
                 "argument --band: expected a finite number >= 0, got -0.1", id="select: negative --band"),
    # scan
    pytest.param(lambda w: _scan_trainer_folder(w, lambda c: _garble(c / "trainer_state.json")),
                 lambda w: ["scan", w.tmp / "hf", "--config", w.run / "config.yaml"], 2,
                 "checkpoint-5/trainer_state.json line 1: not valid JSON", id="scan: broken trainer_state.json"),
    pytest.param(lambda w: _garble(_checkpoint_in_run(w, "epoch-1") / "overmem.json"), lambda w: ["scan", w.tmp / "run"],
                 2, "epoch-1/overmem.json line 1: not valid JSON", id="scan: broken overmem.json"),
    pytest.param(_run, lambda w: ["scan", w.tmp / "run", "--set", f"data.tests={{test: {w.files['train']}}}"], 2,
                 "run/config.yaml: the results in {tmp}/run were made with data.tests=",
                 id="scan: other data into a folder with results"),
    # an adapter applied to another base of the same shapes: it would load without error
    pytest.param(None, lambda w: _evaluate(w, "--adapter", w.adapters[0], model=w.other), 2,
                 "epoch-1/adapter_config.json: trained on base '{model}', but the base given is '{other}' ({model} "
                 "holds other weights); give the base the adapter was trained on", id="evaluate: adapter of another base"),
    pytest.param(lambda w: _copy(w.adapters[0], w.tmp / "hf" / "checkpoint-5"),
                 lambda w: ["scan", w.tmp / "hf", "--config", w.run / "config.yaml", "--set",
                            f"model.name_or_path={w.other}", "--out", w.tmp / "scan"], 2,
                 "checkpoint-5/adapter_config.json: trained on base '{model}', but the base given is '{other}' "
                 "({model} holds other weights); set model.name_or_path", id="scan: adapters of another base"),
    pytest.param(lambda w: _copy(w.adapters[0], _checkpoint_in_run(w, "epoch-1").parent / "epoch-2"),
                 lambda w: ["analyze", w.tmp / "run", "--checkpoints", "epoch-2", "--suite", "mia", "-q", "--set",
                            f"model.name_or_path={w.other}"], 2,
                 "epoch-2/adapter_config.json: trained on base '{model}', but the base given is '{other}'",
                 id="analyze: adapters of another base"),
    # merge
    pytest.param(None, lambda w: _merge(w, base=w.other), 2,
                 "epoch-1/adapter_config.json: trained on base '{model}', but the merge's base is '{other}'",
                 id="merge: adapters of another base of the same shapes"),
    pytest.param(lambda w: (w.tmp / "merged").mkdir(), _merge, 2,
                 "{tmp}/merged: already exists (pass --overwrite", id="merge: --out exists"),
    pytest.param(lambda w: (w.tmp / "merged").mkdir(), lambda w: _merge(w, "--overwrite"), 2,
                 "{tmp}/merged: exists and is not a merged model folder (no merge.json)",
                 id="merge: --overwrite of a folder that is no merge"),
    pytest.param(None, lambda w: _merge(w, checkpoints=[w.adapters[0], w.adapters[0]]), 2,
                 "epoch-1: listed twice", id="merge: a checkpoint twice"),
    pytest.param(lambda w: _adapter(w, "adapter_model.safetensors", _cut),
                 lambda w: _merge(w, checkpoints=[w.tmp / "epoch-1", w.adapters[1]]), 2,
                 "{tmp}/epoch-1/adapter_model.safetensors: not a readable safetensors file", id="merge: truncated adapter"),
    pytest.param(lambda w: _adapter(w, "adapter_config.json", _garble),
                 lambda w: _merge(w, checkpoints=[w.tmp / "epoch-1", w.adapters[1]]), 2,
                 "{tmp}/epoch-1/adapter_config.json line 1: not valid JSON", id="merge: broken adapter_config.json"),
    pytest.param(lambda w: _adapter(w, "adapter_config.json", lambda p: p.write_text('{"r": 2}')),
                 lambda w: _merge(w, checkpoints=[w.tmp / "epoch-1", w.adapters[1]]), 2,
                 "epoch-1/adapter_config.json: no lora_alpha; restore the file that was saved with the adapter",
                 id="merge: adapter_config.json without lora_alpha"),
    pytest.param(lambda w: _model(w, "config.json", _garble), lambda w: _merge(w, base=w.tmp / "model"), 2,
                 "{tmp}/model/config.json line 1: not valid JSON", id="merge: broken base config.json"),
    pytest.param(lambda w: _model(w, "model.safetensors", lambda p: _cut(p, 100)),
                 lambda w: _merge(w, base=w.tmp / "model"), 2,
                 "{tmp}/model/model.safetensors: not a readable safetensors file", id="merge: truncated base"),
    # analyze and report
    pytest.param(lambda w: _run(w, _write("analysis/calibration.json", "{")),
                 lambda w: ["analyze", w.tmp / "run", "--checkpoints", "epoch-0", "--suite", "calibration", "-q"], 2,
                 "run/analysis/calibration.json line 1: not valid JSON", id="analyze: broken NAME.json"),
    pytest.param(lambda w: _run(w, _write("analysis/calibration.json", "[]")),
                 lambda w: ["analyze", w.tmp / "run", "--checkpoints", "epoch-0", "--suite", "calibration", "-q"], 2,
                 "run/analysis/calibration.json: not an analysis file as overmem writes it",
                 id="analyze: NAME.json of another shape"),
    pytest.param(lambda w: (w.tmp / "page").mkdir(), lambda w: ["report", w.run, "--out", w.tmp / "page"], 2,
                 "--out {tmp}/page: is a folder; give a file path, e.g. {tmp}/page/report.html",
                 id="report: --out is a folder"),
    pytest.param(lambda w: _run(w, _write("timings.json", "[{")),
                 lambda w: ["report", w.tmp / "run", "--out", w.tmp / "r.html"], 2,
                 "run/timings.json line 1: not valid JSON", id="report: broken timings.json"),
    pytest.param(None, lambda w: ["report", w.run, "--examples", "-1"], 2,
                 "argument --examples: must be at least 0, got -1", id="report: negative --examples"),
    # silently wrong before: a result that looked fine, or nothing said
    pytest.param(None, lambda w: _grade_cmd(w, "--timeout", "9223372036854775807"), 2,
                 "argument --timeout: must be at most 3600, got 9223372036854775807", id="grade: --timeout huge"),
    pytest.param(lambda w: _run(w, _lines(lambda ls: [*ls[:-1], ls[-1][:40]])),
                 lambda w: ["report", w.tmp / "run", "--out", w.tmp / "r.html"], 2,
                 "run/dynamics.jsonl line 12: incomplete last line (an interrupted write)", id="report: torn last line"),
    pytest.param(lambda w: _run(w, _row_value(5, "ppl", float("nan"))),
                 lambda w: ["report", w.tmp / "run", "--out", w.tmp / "r.html"], 2,
                 "run/dynamics.jsonl line 6: ppl is nan; overmem writes a finite number >= 0 there (or null)",
                 id="report: NaN perplexity"),
    pytest.param(lambda w: _run(w, _row_value(2, "accuracy", -0.5)),
                 lambda w: ["report", w.tmp / "run", "--out", w.tmp / "r.html"], 2,
                 "run/dynamics.jsonl line 3: accuracy is -0.5", id="report: negative accuracy"),
    pytest.param(lambda w: _run(w, _row_value(5, "ppl", float("inf"))), lambda w: ["select", w.tmp / "run"], 2,
                 "run/dynamics.jsonl line 6: ppl is inf", id="select: infinite test perplexity"),
    pytest.param(lambda w: (_scan_trainer_folder(w, lambda c: None), (w.tmp / "hf" / "checkpoint-10").mkdir()),
                 lambda w: ["scan", w.tmp / "hf", "--config", w.run / "config.yaml", "--out", w.tmp / "scan"], 2,
                 "{tmp}/hf/checkpoint-10: a checkpoint folder without a model (config.json or adapter_config.json)",
                 id="scan: an empty checkpoint folder"),
    pytest.param(lambda w: (w.tmp / "c.yaml").write_text("train:\n  lr: 1.0e-4\n  epochs: 2\n  lr: 2.0e-4\n"),
                 lambda w: ["run", w.tmp / "c.yaml", "--out", w.tmp / "new"], 2,
                 "c.yaml: key 'lr' is given twice (lines 2 and 4); keep one", id="config: a key twice"),
    pytest.param(lambda w: (_checkpoint_in_run(w, "epoch-4"), _run_config_edit(w, "backend: hf", "backend: vllm")),
                 lambda w: ["scan", w.tmp / "run", "-q", "--set", "eval.backend=hf"], 2,
                 "run/config.yaml: the results in {tmp}/run were evaluated with eval.backend='vllm', not 'hf'",
                 id="scan: rows of another backend"),
    # hangs before
    pytest.param(_sleeping_interpreter,
                 lambda w: _evaluate(w, "--set", "eval.backend=vllm", "--set", f"eval.vllm.python={w.tmp}/python",
                                     "--set", "eval.vllm.start_timeout_s=2"), 1,
                 "error: the vLLM engine ({tmp}/python) did not start within 2 s", id="vllm: an engine that never answers"),
    _bad_override("analysis.judge.retries=1000000",
                  "field 'analysis.judge.retries': Input should be less than or equal to 10", id="judge: huge retries"),
    _bad_override("train.epochs=1000000000", "field 'train.epochs': Input should be less than or equal to 10000",
                  id="train: a billion epochs"),
    pytest.param(None, lambda w: ["select", w.run, "--set", "generation.max_new_tokens=1000000000"], 2,
                 "field 'generation.max_new_tokens': Input should be less than or equal to 1048576",
                 id="generation: a billion new tokens"),
    # tracebacks or unclear messages before
    pytest.param(None, lambda w: ["select", w.run, "--set", "eval.bootstrap=1000000000"], 2,
                 "field 'eval.bootstrap': Input should be less than or equal to 100000", id="bootstrap: a billion"),
    pytest.param(None, lambda w: _merge(w, "--weights", "1e308", "1e308"), 2,
                 "weights must be finite numbers between -100 and 100 (e.g. 0.5 0.5), got 1e+308 1e+308",
                 id="merge: weights 1e308"),
    pytest.param(lambda w: (w.tmp / "c.yaml").write_bytes(b"train:\n  lr: \xff\n"),
                 lambda w: ["run", w.tmp / "c.yaml", "--out", w.tmp / "new"], 2,
                 "{tmp}/c.yaml: not UTF-8 text (byte 13: invalid start byte); save it as UTF-8",
                 id="config: not UTF-8"),
    pytest.param(lambda w: (w.tmp / "g.jsonl").write_bytes(b'{"generation": "\xff"}\n'), _grade_cmd, 2,
                 "{tmp}/g.jsonl: not UTF-8 text (byte 16: invalid start byte)", id="grade: generations not UTF-8"),
    pytest.param(lambda w: _run(w, lambda run: (run / "dynamics.jsonl").write_bytes(b'{"ppl": "\xff"}\n')),
                 lambda w: ["select", w.tmp / "run"], 2, "run/dynamics.jsonl: not UTF-8 text (byte 9",
                 id="select: dynamics.jsonl not UTF-8"),
    pytest.param(lambda w: (w.tmp / "g.jsonl").mkdir(), _grade_cmd, 2,
                 "generations file {tmp}/g.jsonl is a folder, not a file", id="grade: generations file a folder"),
    pytest.param(lambda w: os.mkfifo(w.tmp / "g.jsonl"), _grade_cmd, 2,
                 "generations file {tmp}/g.jsonl is a FIFO (named pipe), not a file", id="grade: generations a FIFO"),
    pytest.param(lambda w: os.mkfifo(w.tmp / "d.jsonl"), lambda w: _evaluate(w, data=w.tmp / "d.jsonl"), 2,
                 "data file {tmp}/d.jsonl is a FIFO (named pipe), not a file", id="data: a FIFO"),
    pytest.param(lambda w: (w.tmp / "c.yaml").mkdir(), lambda w: ["run", w.tmp / "c.yaml", "--out", w.tmp / "new"], 2,
                 "config file {tmp}/c.yaml is a folder, not a file", id="config: a folder"),
    pytest.param(lambda w: (w.tmp / "notes").write_text("x"),
                 lambda w: _evaluate(w, "--data-dir", w.tmp / "notes", data="gsm8k:test"), 2,
                 "data folder {tmp}/notes (from data_dir) is not a folder", id="data: --data-dir is a file"),
    pytest.param(lambda w: (w.tmp / "notes").write_text("x"), lambda w: ["report", w.tmp / "notes"], 2,
                 "{tmp}/notes: run folder expected, but it is a file; give a folder", id="report: a file as the run"),
    pytest.param(lambda w: os.mkfifo(w.tmp / "notes"), lambda w: _merge(w, checkpoints=[w.tmp / "notes", w.adapters[1]]),
                 2, "{tmp}/notes: checkpoint folder expected, but it is a FIFO (named pipe)", id="merge: a FIFO checkpoint"),
    pytest.param(None, lambda w: _evaluate(w, "--set", "eval.backend=vllm", "--set", f"eval.vllm.python={sys.executable}"),
                 1, "install it with `EXTRAS=vllm bash scripts/setup.sh`", id="vllm: not installed",
                 marks=pytest.mark.skipif(not _missing("vllm"), reason="vLLM is installed here")),
    pytest.param(None, lambda w: _run_cmd(w, "train.seed=4294967296"), 2,
                 "field 'train.seed': Input should be less than or equal to 4294967295", id="seed: over 2**32 - 1"),
    _bad_override("data.seed=-1", "field 'data.seed': Input should be greater than or equal to 0",
                  id="seed: negative"),
]


def test_cli_csv_trailing_empty_columns_still_read(tmp_path):
    """The field-count check refuses shifted rows, not a spreadsheet's trailing empty columns."""
    data = tmp_path / "d.csv"
    data.write_text("question,answer,\nTom has 2 apples,#### 2,\n\nAnn has 3 pears,#### 3\n")
    assert [(e.question, e.answer) for e in load_file(data)] == [("Tom has 2 apples", "2"), ("Ann has 3 pears", "3")]


def _cli(argv):
    """Exit code of the command line (argparse's own exits included)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("setup, argv, code, fragment", BAD_INPUT)
def test_cli_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys, setup, argv, code, fragment):
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    if setup is not None:
        setup(w)
    args = argv(w)
    before = _tree(tmp_path, world.root)
    assert _cli(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    expected = fragment
    for key, value in (("{tmp}", tmp_path), ("{model}", world.model), ("{other}", world.other), ("{root}", world.root)):
        expected = expected.replace(key, str(value))
    assert expected in err[-1] and err[-1].startswith("overmem ") and "Traceback" not in "\n".join(err), err
    assert len([line for line in err if "error:" in line]) == 1
    assert _tree(tmp_path, world.root) == before


@pytest.mark.parametrize("fault, code, fragment", [
    (lambda mp: mp.setattr("overmem.results.tempfile.mkstemp", _raise(errno.EROFS)), 2,
     "run/selection.json: Read-only file system; make it writable or choose another output folder"),
    (lambda mp: mp.setattr("overmem.results.tempfile.mkstemp", _raise(errno.EACCES)), 2,
     "run/selection.json: Permission denied; make it writable or choose another output folder"),
    (lambda mp: mp.setattr("overmem.results.os.fsync", _raise(errno.ENOSPC)), 1,
     "run/selection.json: No space left on device; free space there (or write elsewhere with --out) and re-run "
     "the same command"),
], ids=["read-only file system", "no permission", "disk full"])
def test_cli_file_system_errors_name_the_file(world, tmp_path, capsys, monkeypatch, fault, code, fragment):
    """The write of selection.json fails: one line naming the file (not the temporary one) and what to do;
    exit 2 for a place that cannot be written, 1 for a full disk; the old file stays, no temporary file is left."""
    _copy(world.run, tmp_path / "run")
    before = _tree(tmp_path)
    fault(monkeypatch)
    assert _cli(["select", tmp_path / "run", "--band", "0.5"]) == code
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"overmem select: error: {tmp_path}/{fragment}"], err
    assert _tree(tmp_path) == before


def _raise(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


# ---- inputs a table row cannot set up: byte-order marks, refused reads, a full disk, the judge's waits,
# a failed vLLM scan, a run that lost its last checkpoint -------------------------------------------

_BOM = b"\xef\xbb\xbf"


def test_cli_a_byte_order_mark_is_read_as_utf8(world, tmp_path, capsys):
    """dynamics.jsonl, config.yaml, a data file and a generations file saved with a UTF-8 byte-order mark
    (as Windows editors do) are read as they would be without one (the mark was 'invalid JSON')."""
    run = _copy(world.run, tmp_path / "run")
    for name in ("dynamics.jsonl", "config.yaml"):
        (run / name).write_bytes(_BOM + (world.run / name).read_bytes())
    assert main(["select", str(run)]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    data = tmp_path / "test.jsonl"
    data.write_bytes(_BOM + world.files["test"].read_bytes())
    assert load_file(data) == load_file(world.files["test"])
    from overmem.grading import read_generations

    gens = tmp_path / "g.jsonl"
    gens.write_bytes(_BOM + b'{"id": "a", "generation": "#### 5"}\n')
    assert read_generations(gens) == [(1, {"id": "a", "generation": "#### 5"})]


def test_cli_an_unreadable_input_is_not_called_unwritable(world, tmp_path, capsys, monkeypatch):
    """A file the command may not read (mode 000, someone else's) was met with 'make it writable or
    choose another output folder'; now it is named as unreadable. (A refused open is simulated: the
    tests may run as root, whom permissions do not stop.)"""
    run = _copy(world.run, tmp_path / "run")
    open_ = Path.open

    def refuse(self, *args, **kwargs):
        if self.name == "dynamics.jsonl":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return open_(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    assert _cli(["select", run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"overmem select: error: {run}/dynamics.jsonl: unreadable (Permission denied); make it readable "
                   "(chmod +r) or give another file"], err


def test_cli_merge_on_a_full_disk_is_one_line_and_leaves_nothing(world, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own error type: it was a traceback; now exit 1 with one line
    naming --out, and the half-written folder is removed."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("overmem.merge_writing.save_file", full)
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    assert _cli(_merge(w)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"overmem merge: error: {tmp_path}/merged: No space left on device; free space there (or write "
                   "elsewhere with --out) and re-run the same command"], err
    assert list(tmp_path.iterdir()) == []


def test_judge_waits_between_attempts_are_capped(monkeypatch):
    """The waits doubled without end (retries=20: the last one 6 days); now each is at most 30 s and the
    settings refuse more than 10 retries (BAD_INPUT), so a dead endpoint costs minutes at most."""
    import socket

    from overmem.analysis import judge

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: every attempt is refused at once
    waits = []
    monkeypatch.setattr(judge.time, "sleep", waits.append)
    with pytest.raises(judge.JudgeError, match="after 11 attempt"):
        judge.JudgeClient(f"http://127.0.0.1:{port}/v1", "m", retries=10, backoff_s=1.0).complete("x")
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0]


def test_scan_whose_vllm_engine_failed_is_rerun_with_its_new_settings(world, tmp_path, capsys):
    """`scan --set eval.backend=vllm` fails (here: the engine's interpreter exits at once) after writing
    config.yaml; the rerun with Hugging Face evaluated every checkpoint but left config.yaml saying vllm.
    A config.yaml that no row was made with is now replaced by the rerun's."""
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    dead = tmp_path / "python"
    dead.write_text("#!/bin/sh\nexit 3\n")
    dead.chmod(0o755)
    argv = [str(a) for a in _scan_argv(w, tmp_path / "out")]
    assert main([*argv, "--set", "eval.backend=vllm", "--set", f"eval.vllm.python={dead}"]) == 1
    assert "the vLLM engine process died during 'start' (exit 3" in capsys.readouterr().err
    assert main(argv) == 0
    saved = load_config(tmp_path / "out" / "config.yaml")
    assert saved.eval.backend == "hf" and saved.eval.vllm.python is None
    assert {r["checkpoint"] for r in read_jsonl(tmp_path / "out" / "dynamics.jsonl")} == {
        "epoch-0", "checkpoint-5", "checkpoint-10"}


@pytest.mark.slow
def test_rerun_of_a_finished_run_without_its_last_checkpoint_says_so(tiny_model_dir, toy_jsonl, tmp_path, capsys):
    """A finished run loses its last checkpoint with its rows (deleted by hand, a failed copy): the rerun
    resumed the Trainer at its end, trained nothing, and finished without that epoch, exit 0. Now it stops
    before any work, naming the checkpoint and what to do."""
    out = tmp_path / "run"
    argv = _train_args(tiny_model_dir, toy_jsonl, out)
    assert main(argv) == 0
    shutil.rmtree(out / "checkpoints" / "epoch-2")
    shutil.rmtree(out / "samples" / "epoch-2")
    rows = [r for r in read_jsonl(out / "dynamics.jsonl") if r["checkpoint"] != "epoch-2"]
    write_jsonl(out / "dynamics.jsonl", rows)
    before = _tree(out)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"overmem run: error: {out}/checkpoints/epoch-2: missing, and not in {out}/dynamics.jsonl, but "
                   f"the Trainer's state in {out}/trainer_state is at epoch 2, so resuming cannot make it again; "
                   "restore the checkpoint, or start the run afresh in a new --out folder"], err
    assert _tree(out) == before


def test_cli_unreadable_result_file_is_computed_afresh(world, tmp_path, capsys):
    """selection.json and phases.json are computed from dynamics.jsonl: cut short, they are written
    again (with a note naming them) instead of stopping `select` and `plot` with a bare JSON error."""
    run = _copy(world.run, tmp_path / "run")
    _garble(run / "selection.json")
    assert main(["select", str(run)]) == 0
    assert f"note: {run}/selection.json is unreadable" in capsys.readouterr().err
    assert json.loads((run / "selection.json").read_text()) == json.loads((world.run / "selection.json").read_text())
    (run / "phases.json").write_text('{"split": 3}')
    assert main(["plot", str(run)]) == 0
    assert f"note: {run}/phases.json is unreadable" in capsys.readouterr().err
    assert json.loads((run / "phases.json").read_text()) == json.loads((world.run / "phases.json").read_text())


def test_cli_scan_reads_the_folders_own_config_and_writes_there(world, tmp_path):
    """`scan RUN` used the default config (another dataset and model) for a run folder, and `scan RUN
    --config RUN/config.yaml` wrote into the config's out_dir instead of RUN."""
    run = tmp_path / "run"
    _checkpoint_in_run(SimpleNamespace(**vars(world), tmp=tmp_path), "epoch-1")  # evaluated: in the dynamics
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("out_dir: null", f"out_dir: {tmp_path / 'elsewhere'}"))
    dynamics = (run / "dynamics.jsonl").read_text()
    (run / "phases.json").unlink()
    assert main(["scan", str(run), "-q"]) == 0
    assert (run / "phases.json").exists() and (run / "dynamics.jsonl").read_text() == dynamics
    (run / "phases.json").unlink()
    assert main(["scan", str(run), "--config", str(cfg), "-q"]) == 0
    assert (run / "phases.json").exists() and not (tmp_path / "elsewhere").exists()


def test_cli_scan_stops_at_a_corrupt_checkpoint_naming_its_file(world, tmp_path, capsys):
    """The checkpoints already evaluated stay; the unreadable one is named (it was a raw traceback)."""
    ckpt = _checkpoint_in_run(SimpleNamespace(**vars(world), tmp=tmp_path), "epoch-4")
    _cut(ckpt / "model.safetensors")
    dynamics = (tmp_path / "run" / "dynamics.jsonl").read_text()
    assert main(["scan", str(tmp_path / "run"), "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"overmem scan: error: {ckpt}/model.safetensors: truncated or corrupt weights (Error while deserializing "
        "header: incomplete metadata, file not fully covered); save or download them again")
    assert (tmp_path / "run" / "dynamics.jsonl").read_text() == dynamics


def test_cli_merge_onto_another_base_needs_force(world, tmp_path, capsys):
    """Adapters of one base merged onto another of the same shapes: refused (above); --force merges
    and merge.json says so."""
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    assert _cli(_merge(w, "--force", base=world.other)) == 0
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["forced"] is True


_SLOW_MERGE = """
import sys, time
from pathlib import Path
import overmem.merge as merge
from overmem.cli import main

def write_dense(folder, *args):
    (Path(folder) / "model.safetensors").write_bytes(b"half")
    time.sleep(300)

merge.write_dense = write_dense
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_cli_merge_sigkill_then_the_next_merge_cleans_up(world, tmp_path):
    """SIGKILL `overmem merge` while it writes: its temporary folder stays beside --out (no exception
    ran); the next merge into the same folder removes it and writes the merge."""
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    argv = [str(a) for a in _merge(w)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, *argv])
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".merged.tmp-*/model.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "the merge ended before it was killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".merged.tmp"]
    assert main(argv) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def _calibration(run_root, names):
    """A calibration analysis over a run with per-sample rows for checkpoints `names`."""
    from overmem.analysis.calibration import Calibration
    from overmem.analysis.base import Context

    run = RunDir(run_root)
    rows = [{"n_tokens": 5, "confidence": c, "correct": c > 0.5} for c in (0.2, 0.6, 0.9)]
    for name in names:
        write_jsonl(run.analysis_samples("calibration", name), rows)
    doc = {"checkpoints": {n: {} for n in names}, "settings": {"n_bins": 5},
           "samples": {n: f"analysis/calibration/{n}.jsonl" for n in names}}
    return Calibration(Context(run, load_config(None))), doc


def test_analysis_figure_is_redrawn_when_its_svg_is_missing(tmp_path):
    """A resume took a figure as drawn when its PNG was there; an SVG lost to an interrupted save
    was never drawn again. Names with dots (weighted merges) keep their whole name."""
    names = ["epoch-1", "merge(epoch-1:0.25,epoch-2:0.75)"]
    analysis, doc = _calibration(tmp_path, names)
    figures = analysis.figures(doc, fresh=set(names))
    assert figures == [f"analysis/calibration/{n}_reliability.png" for n in names]
    svg = tmp_path / figures[1].replace(".png", ".svg")
    svg.unlink()
    analysis.figures(doc, fresh=set())
    assert svg.is_file()


def test_analysis_figures_of_a_finished_run_are_redrawn_when_one_is_missing(tmp_path):
    from overmem.analysis.suite import _draw_figures

    analysis, doc = _calibration(tmp_path, ["epoch-1"])
    doc["figures"] = analysis.figures(doc, fresh={"epoch-1"})
    doc["figures_of"] = ["epoch-1"]
    doc["analysis"] = "calibration"
    svg = tmp_path / doc["figures"][0].replace(".png", ".svg")
    svg.unlink()
    _draw_figures(analysis.ctx, analysis, doc, fresh=set())
    assert svg.is_file()


def test_an_interrupted_figure_save_leaves_no_half_file(tmp_path, monkeypatch):
    """The SVG save fails half-way (a kill or a full disk): before, a truncated dynamics.svg stayed and
    counted as drawn; now the old figure (or none) stays and no temporary file is left."""
    from matplotlib.figure import Figure

    from overmem.plotting import plot_dynamics

    save = Figure.savefig

    def half(self, path, **kwargs):
        if kwargs.get("format") == "svg" or str(path).endswith(".svg"):
            Path(path).write_text("<svg")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(OSError, match="No space left on device"):
        plot_dynamics(_dynamics_rows(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamics.png"]


# ---- kills of scan and analyze at each kind of file write ------------------------------------
# The command runs in a subprocess that SIGKILLs itself at the n-th write of a file matching a
# pattern: "after" the file is complete, or "during" it (an atomic write's temporary file is
# written but not yet renamed; an appended row is half written). Re-running the same command must
# finish with the results of a command that was never killed, and leave no temporary file behind.

_KILLER = """
import fnmatch, os, signal, sys
from contextlib import contextmanager
import overmem.results as results

pattern, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = [0]
real_atomic_path, real_append = results.atomic_path, results.append_jsonl

def hit(path):
    if fnmatch.fnmatch(str(path), pattern):
        seen[0] += 1
        return seen[0] == nth
    return False

@contextmanager
def atomic_path(path):
    kill = hit(path)
    with real_atomic_path(path) as tmp:
        yield tmp
        if kill and when == "during":
            os.kill(os.getpid(), signal.SIGKILL)
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)

def append_jsonl(path, row):
    kill = hit(path)
    if kill and when == "during":
        import json
        line = json.dumps(row)
        with open(path, "a") as fh:
            fh.write(line[: len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real_append(path, row)
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)

results.atomic_path, results.append_jsonl = atomic_path, append_jsonl
from overmem.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _killed(argv, pattern, when, nth=1):
    """Run `overmem ARGV` until it kills itself at the chosen write; fails if it never got there."""
    done = subprocess.run([sys.executable, "-c", _KILLER, pattern, when, str(nth), *map(str, argv)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, f"not killed at {pattern} ({when}): {done.stderr[-2000:]}"


def _results(folder, *, skip=()):
    """Every result file under `folder` by relative path: JSON/JSONL parsed with timings left out,
    figures by presence (their bytes hold a date). Temporary files are listed too: there must be none."""
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if k not in ("seconds", "created")}
        return [clean(v) for v in obj] if isinstance(obj, list) else obj

    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if not p.is_file() or rel.startswith(skip):
            continue
        if p.suffix == ".jsonl":
            out[rel] = clean(read_jsonl(p, torn_ok=False))
        elif p.suffix == ".json":
            out[rel] = clean(json.loads(p.read_text()))
        else:
            out[rel] = p.suffix
    return out


def _scan_argv(w, out):
    hf = w.tmp / "hf"
    if not hf.exists():
        for step, src in ((5, w.model), (10, w.other)):
            ckpt = _copy(src, hf / f"checkpoint-{step}")
            (ckpt / "trainer_state.json").write_text(json.dumps({"epoch": step / 5, "global_step": step}))
    return ["scan", hf, "--config", w.run / "config.yaml", "--out", out, "-q"]


SCAN_KILLS = [
    ("*/samples/checkpoint-5/validation.jsonl", "after", 1),  # samples written, its dynamics row not
    ("*/samples/checkpoint-5/test.jsonl", "during", 1),  # temporary samples file left
    ("*/dynamics.jsonl", "during", 4),  # a torn dynamics row
    ("*/dynamics.jsonl", "after", 6),  # the second checkpoint's last row, before phases and selection
    ("*/phases.json", "during", 1),
    ("*/dynamics.png", "during", 1),  # the figure, half made
    ("*/report.html", "during", 1),
]


@pytest.mark.slow
def test_scan_killed_at_each_kind_of_write_then_rerun(world, tmp_path):
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    ref = tmp_path / "ref"
    assert main([str(a) for a in _scan_argv(w, ref)]) == 0
    expected = _results(ref, skip=("timings",))
    assert {"dynamics.jsonl", "phases.json", "selection.json", "report.html"} <= set(expected)
    for i, (pattern, when, nth) in enumerate(SCAN_KILLS):
        out = tmp_path / f"out{i}"
        _killed(_scan_argv(w, out), pattern, when, nth)
        assert main([str(a) for a in _scan_argv(w, out)]) == 0, (pattern, when)
        assert _results(out, skip=("timings",)) == expected, (pattern, when)


def _analyze_argv(run):
    return ["analyze", run, "--checkpoints", "epoch-0", "epoch-1", "--suite", "mia,calibration", "-q",
            "--set", "analysis.mia.size=5", "--set", "analysis.mia.ks=[0.2]", "--set", "analysis.calibration.size=3",
            "--set", "analysis.calibration.n_samples=2"]


ANALYZE_KILLS = [
    ("*/analysis/mia/epoch-0.jsonl", "after", 1),  # samples written, mia.json not
    ("*/analysis/mia.json", "during", 1),
    ("*/analysis/mia/epoch-1.jsonl", "during", 1),
    ("*/analysis/calibration.json", "after", 2),  # both checkpoints in, figures not drawn
    ("*/analysis/calibration*.svg", "during", 1),  # the PNG is there, its SVG half made
]


@pytest.mark.slow
def test_analyze_killed_at_each_kind_of_write_then_rerun(world, tmp_path):
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    _checkpoint_in_run(w, "epoch-1")
    ref = _copy(w.tmp / "run", tmp_path / "ref")
    assert main([str(a) for a in _analyze_argv(ref)]) == 0
    expected = _results(ref / "analysis")
    assert any(k.endswith(".svg") for k in expected) and "mia/epoch-1.jsonl" in expected
    for i, (pattern, when, nth) in enumerate(ANALYZE_KILLS):
        run = _copy(w.tmp / "run", tmp_path / f"run{i}")
        _killed(_analyze_argv(run), pattern, when, nth)
        assert main([str(a) for a in _analyze_argv(run)]) == 0, (pattern, when)
        assert _results(run / "analysis") == expected, (pattern, when)


@pytest.mark.skipif(not (DATA_DIR / "humaneval" / "HumanEval.jsonl").is_file(), reason="no local HumanEval copy")
def test_code_without_a_working_sandbox_fails_before_any_work(world, tmp_path, capsys, monkeypatch):
    """Code examples with tests need a sandbox: a machine where none runs is told so in one line
    (exit 1) before the model is loaded or anything is written, not at the first evaluation."""
    from overmem import sandbox

    def unavailable(*args, **kwargs):
        raise sandbox.SandboxUnavailable("no sandbox could run a program here: bwrap: not installed")

    monkeypatch.setattr(sandbox, "select_isolation", unavailable)
    out = tmp_path / "e.json"
    argv = ["evaluate", "--model", str(world.model), "--data", "humaneval:test[:2]", "--data-dir", str(DATA_DIR),
            "--out", str(out), "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["overmem evaluate: error: no sandbox could run a program here: bwrap: not installed"]
    assert list(tmp_path.iterdir()) == []


# ---- one writer per run folder; inputs never overwritten -------------------------------------
# A command that writes into a run folder holds RUN/.overmem.lock while it runs: a second one is
# refused before any work, naming the holder; a lock left by a killed command is taken over. An
# output path that would overwrite one of the command's own inputs is refused before any work.

_PAUSED = """
import os, sys, time
from pathlib import Path
import overmem.results as results

marks = Path(sys.argv[1])
real_append = results.append_jsonl

def append_jsonl(path, row):
    if path.name == "dynamics.jsonl" and not (marks / "paused").exists():
        (marks / "paused").touch()
        while not (marks / "go").exists():
            time.sleep(0.01)
    real_append(path, row)

results.append_jsonl = append_jsonl
from overmem.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _paused_scan(w, out):
    """`overmem scan` in a subprocess that stops at its first dynamics row until `go` exists."""
    marks = w.tmp / "marks"
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED, str(marks), *map(str, _scan_argv(w, out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (marks / "paused").exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"the scan ended early: {proc.stderr.read()}"
        time.sleep(0.01)
    return proc, marks


def _one_row_each(out):
    pairs = [(r["checkpoint"], r["split"]) for r in read_jsonl(out / "dynamics.jsonl")]
    assert sorted(pairs) == sorted({(c, s) for c in ("epoch-0", "checkpoint-5", "checkpoint-10")
                                    for s in ("train", "validation", "test")})


@pytest.mark.slow
def test_lock_a_second_scan_of_a_folder_is_refused_naming_the_first(world, tmp_path):
    """Two `overmem scan`s into one folder: both exited 0 and left two rows per (checkpoint, split).
    Now the second is refused (exit 2) while the first runs, naming its pid, and writes nothing."""
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    out = tmp_path / "out"
    first, marks = _paused_scan(w, out)
    before = _tree(out)
    second = subprocess.run([sys.executable, "-m", "overmem.cli", *map(str, _scan_argv(w, out))],
                            capture_output=True, text=True, timeout=600)
    (marks / "go").touch()
    assert first.wait(timeout=600) == 0, first.stderr.read()
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1, second.stderr
    assert err[0].startswith(f"overmem scan: error: {out}: in use by pid {first.pid} ") and "overmem scan" in err[0][30:]
    assert _tree(out) != before and not (out / ".overmem.lock").exists()
    _one_row_each(out)


@pytest.mark.slow
def test_lock_left_by_a_killed_scan_is_taken_over(world, tmp_path, capsys):
    """A scan SIGKILLed while it holds the folder leaves its lock; the next command takes it over
    with a note naming the dead holder, and finishes the results."""
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    out = tmp_path / "out"
    first, _ = _paused_scan(w, out)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert main([str(a) for a in _scan_argv(w, out)]) == 0
    err = capsys.readouterr().err
    assert f"note: {out}/.overmem.lock: taking over the lock of pid {first.pid} (overmem scan " in err, err
    assert not (out / ".overmem.lock").exists()
    _one_row_each(out)


def _merged(w, name, *weights):
    """An earlier merge of the two adapters at `name` (a folder with merge.json)."""
    argv = _merge(w, *(("--weights", *weights) if weights else ()))
    argv[argv.index("--out") + 1] = w.tmp / name
    assert _cli(argv) == 0


def _merge_into_own_input(w):
    _merged(w, "m1")
    _merged(w, "m2", "0.25", "0.75")
    return _merge(w, "--overwrite", base=w.model, checkpoints=[w.tmp / "m1", w.tmp / "m2"])


def _merged_around_inputs(w):
    """An earlier merge folder that holds the checkpoints merged now."""
    _merged(w, "p")
    for i, adapter in enumerate(w.adapters):
        _copy(adapter, w.tmp / "p" / f"epoch-{i + 1}")


def _out(argv, path):
    argv = list(argv)
    argv[argv.index("--out") + 1] = path
    return argv


def _grade(w, generations, out):
    return ["grade", "--data", w.files["test"], "--generations", generations, "--out", out]


def _generations(path):
    write_jsonl(path, [{"generation": "The answer is 1. #### 1"}] * 8)


KEPT_INPUTS = [
    pytest.param(lambda w: _generations(w.tmp / "g.jsonl"), lambda w: _grade(w, w.tmp / "g.jsonl", w.tmp / "g.jsonl"),
                 "--out {tmp}/g.jsonl: is the --generations file; give another path", id="grade: --out is the generations"),
    pytest.param(lambda w: _generations(w.tmp / "my.samples.jsonl"),
                 lambda w: _grade(w, w.tmp / "my.samples.jsonl", w.tmp / "my.json"),
                 "--out {tmp}/my.json: its per-example rows would go to {tmp}/my.samples.jsonl, the --generations file",
                 id="grade: the rows beside --out are the generations"),
    pytest.param(lambda w: (_generations(w.tmp / "g.jsonl"), _copy(w.files["test"], w.tmp / "d.jsonl")),
                 lambda w: ["grade", "--data", w.tmp / "d.jsonl", "--generations", w.tmp / "g.jsonl",
                            "--out", w.tmp / "d.jsonl"],
                 "--out {tmp}/d.jsonl: is the --data file", id="grade: --out is the data"),
    pytest.param(lambda w: _copy(w.files["test"], w.tmp / "d.jsonl"),
                 lambda w: _evaluate(w, data=w.tmp / "d.jsonl", out=w.tmp / "d.jsonl"),
                 "--out {tmp}/d.jsonl: is the --data file", id="evaluate: --out is the data"),
    pytest.param(lambda w: _model(w, "config.json", lambda p: None),
                 lambda w: _evaluate(w, model=w.tmp / "model", out=w.tmp / "model" / "config.json"),
                 "--out {tmp}/model/config.json: is a file of --model {tmp}/model", id="evaluate: --out in the model"),
    pytest.param(lambda w: _adapter(w, "adapter_config.json", lambda p: None),
                 lambda w: _evaluate(w, "--adapter", w.tmp / "epoch-1", out=w.tmp / "epoch-1" / "adapter_config.json"),
                 "--out {tmp}/epoch-1/adapter_config.json: is a file of --adapter {tmp}/epoch-1",
                 id="evaluate: --out in the adapter"),
    pytest.param(lambda w: _copy(w.run / "config.yaml", w.tmp / "c.yaml"),
                 lambda w: _evaluate(w, "--config", w.tmp / "c.yaml", out=w.tmp / "c.yaml"),
                 "--out {tmp}/c.yaml: is the --config file", id="evaluate: --out is the config"),
    pytest.param(lambda w: _model(w, "config.json", lambda p: None),
                 lambda w: _evaluate(w, "--adapter", w.tmp / "model"),
                 "--adapter {tmp}/model: not a PEFT adapter folder (no adapter_config.json); a full model is "
                 "evaluated as --model", id="evaluate: --adapter is a full checkpoint"),
    pytest.param(_merge_into_own_input, lambda w: _out(_merge(w, "--overwrite", checkpoints=[w.tmp / "m1", w.tmp / "m2"]),
                                                       w.tmp / "m1"),
                 "--out {tmp}/m1: is --checkpoints {tmp}/m1; write the merge elsewhere", id="merge: --out is an input"),
    pytest.param(_merged_around_inputs,
                 lambda w: _out(_merge(w, "--overwrite", checkpoints=[w.tmp / "p" / "epoch-1", w.tmp / "p" / "epoch-2"]),
                                w.tmp / "p"),
                 "--out {tmp}/p: holds --checkpoints {tmp}/p/epoch-1; write the merge elsewhere",
                 id="merge: --out holds the inputs"),
    pytest.param(lambda w: (_merge_into_own_input(w), _merged(w, "m3", "0.75", "0.25")),
                 lambda w: _out(_merge(w, "--overwrite", base=w.tmp / "m1", checkpoints=[w.tmp / "m2", w.tmp / "m3"]),
                                w.tmp / "m1"),
                 "--out {tmp}/m1: is --base {tmp}/m1; write the merge elsewhere", id="merge: --out is the base"),
    pytest.param(_run, lambda w: ["report", w.tmp / "run", "--out", w.tmp / "run" / "dynamics.jsonl"],
                 "--out {tmp}/run/dynamics.jsonl: is a result file of the run {tmp}/run that the report reads",
                 id="report: --out is a result file"),
    pytest.param(_run, lambda w: ["report", w.run, w.tmp / "run", "--out", w.tmp / "run" / "selection.json"],
                 "--out {tmp}/run/selection.json: is a result file of the run {tmp}/run that the report reads",
                 id="report: --out in the second run"),
]


@pytest.mark.parametrize("setup, argv, fragment", KEPT_INPUTS)
def test_inputs_are_never_overwritten_by_outputs(world, tmp_path, capsys, setup, argv, fragment):
    """Each was written over (or, for --adapter, the wrong model evaluated) with exit 0; now exit 2
    with one line naming the option and the input, and nothing written."""
    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    setup(w)
    capsys.readouterr()
    before = _tree(tmp_path, world.root)
    assert _cli(argv(w)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment.replace("{tmp}", str(tmp_path)) in err[0], err
    assert _tree(tmp_path, world.root) == before


@pytest.mark.slow
def test_lock_under_torchrun_rank_0_is_refused_and_no_rank_waits(world, tmp_path):
    """Under torchrun rank 0 alone takes the lock; refused, it says so and the other rank stops too
    (instead of waiting for rank 0 at the next collective)."""
    from overmem.runlock import RunLock
    from tests.test_distributed import _torchrun

    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    out = tmp_path / "out"
    lock = RunLock.acquire(out, "overmem scan (the test)")
    try:
        proc = _torchrun("-m", "overmem", *map(str, _scan_argv(w, out)))
    finally:
        lock.release()
    assert proc.returncode != 0
    assert f"overmem scan: error: {out}: in use by pid {os.getpid()} (overmem scan (the test))" in proc.stderr
    assert not out.exists()


LOCKED_OUT = [
    pytest.param(lambda w: _run_cmd(w, out=w.tmp / "run"), id="run"),
    pytest.param(lambda w: ["scan", w.tmp / "run", "-q"], id="scan"),
    pytest.param(lambda w: ["analyze", w.tmp / "run", "--checkpoints", "epoch-0", "--suite", "calibration", "-q"],
                 id="analyze"),
    pytest.param(lambda w: ["select", w.tmp / "run", "--band", "0.5"], id="select (a new selection)"),
    pytest.param(lambda w: ["plot", w.tmp / "run"], id="plot"),
    pytest.param(lambda w: ["report", w.tmp / "run"], id="report"),
    pytest.param(lambda w: ["demo", "--out", w.tmp / "run", "--epochs", "1", "--pretrain-steps", "1", "-q"], id="demo"),
    pytest.param(lambda w: _out(_merge(w), w.tmp / "run" / "checkpoints" / "merged"), id="merge into RUN/checkpoints"),
]


@pytest.mark.parametrize("argv", LOCKED_OUT)
def test_lock_every_command_that_writes_a_run_folder_is_refused_while_it_is_held(world, tmp_path, capsys, argv):
    from overmem.runlock import RunLock

    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    _checkpoint_in_run(w, "epoch-1")
    lock = RunLock.acquire(tmp_path / "run", "overmem test")
    try:
        before = _tree(tmp_path, world.root)
        assert _cli(argv(w)) == 2
        assert _tree(tmp_path, world.root) == before
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"overmem {argv(w)[0]}: error: {tmp_path}/run: in use by pid {os.getpid()} (overmem test), "
                             "since ") and err[0].endswith("; wait for it to finish, or write to another folder"), err


def test_lock_run_and_scan_called_from_python_take_the_lock_too(world, tmp_path):
    """`pipeline.run` and `pipeline.scan` (examples, notebooks) hold the folder's lock as the
    command line does; within one process a command that holds it calls them without a conflict."""
    from overmem import pipeline
    from overmem.config import ConfigError
    from overmem.runlock import RunLock, run_lock

    w = SimpleNamespace(**vars(world), tmp=tmp_path)
    _checkpoint_in_run(w, "epoch-1")
    out = tmp_path / "run"
    cfg = load_config(None, [f"model.name_or_path={world.model}", f"out_dir={out}", "quiet=true"])
    lock = RunLock.acquire(out, "another process")
    try:
        before = _tree(tmp_path, world.root)
        for call in (lambda: pipeline.run(cfg), lambda: pipeline.scan(out, cfg)):
            with pytest.raises(ConfigError, match=rf"^{out}: in use by pid {os.getpid()} \(another process\)"):
                call()
        assert _tree(tmp_path, world.root) == before
    finally:
        lock.release()
    with run_lock(out, "overmem scan"):  # as the command line holds it around the library call
        with run_lock(str(out) + "/", "overmem scan (the library)"):  # the same folder, spelt otherwise
            assert (out / ".overmem.lock").exists()
        assert (out / ".overmem.lock").exists()  # still held by the outer block
    assert not (out / ".overmem.lock").exists()


def test_lock_a_folder_mixed_before_the_lock_is_refused_by_select_and_plot(world, tmp_path, capsys):
    """Two scans at once left two rows per (checkpoint, split), and `select` chose among them; now
    `select` and `plot` name the second row and write nothing."""
    run = _copy(world.run, tmp_path / "run")
    rows = (run / "dynamics.jsonl").read_text().splitlines(keepends=True)
    (run / "dynamics.jsonl").write_text("".join(rows[:6] + rows[3:4] + rows[6:]))
    before = _tree(tmp_path)
    for command in ("select", "plot"):
        assert _cli([command, run, "--band", "0.5"] if command == "select" else [command, run]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"overmem {command}: error: {run}/dynamics.jsonl line 7: a second row for epoch-1 on train "
                       "(the first is line 4); delete the rows of one of the two evaluations"], err
    assert _tree(tmp_path) == before
