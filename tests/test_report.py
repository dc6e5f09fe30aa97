"""The HTML report: built from a tiny real run (with a merge and a hand-made analysis file),
self-contained, every section present, token losses stored (or a note saying how to get them),
several runs compared, and loaded in headless Chromium."""

import json
import re
import shutil

import pytest
import yaml

from overmem.cli import main
from overmem.report.build import analysis_body
from overmem.report.tokens import choose_checkpoints, choose_examples, sentence_spans
from overmem.results import read_jsonl, write_jsonl
from overmem.selection import Keep
from overmem.scoring import response_pieces
from tests.conftest import toy_examples, write_toy_jsonl

SECTIONS = ("summary", "dynamics", "selection", "tokens", "merges", "analysis-0", "timings", "setup")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A 2-epoch run of the tiny model with a merge of its two epochs, plus an analysis file."""
    tmp = tmp_path_factory.mktemp("report")
    files = write_toy_jsonl(tmp)
    sets = [
        f"model.name_or_path={tiny_model_dir}", f"data.train={files['train']}[:16]",
        f"data.tests={{test: {files['test']}}}", "data.monitor_size=6", "data.validation_size=6",
        "train.method=full", "train.epochs=2", "train.lr=5e-3", "train.batch_size=8", "train.micro_batch_size=4",
        "train.warmup_steps=0", "generation.max_new_tokens=24", "eval.bootstrap=200", "merge=[[epoch-1,epoch-2]]",
    ]
    run, cfg = tmp / "run", tmp / "config.yaml"
    cfg.write_text("quiet: true\n")
    assert main(["run", str(cfg), "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    write_analysis(run)
    (run / "keep.json").write_text(json.dumps({"onset": "epoch-2", "keep": "epoch-1"}))  # as the callback writes
    return run


def write_analysis(run):
    """An analysis file in the schema `overmem analyze` writes, with a PNG and an SVG figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [0.5, 0.9])
    (run / "analysis").mkdir(exist_ok=True)
    fig.savefig(run / "analysis" / "roc.png")
    fig.savefig(run / "analysis" / "roc.svg")
    (run / "analysis" / "mia.json").write_text(json.dumps({
        "analysis": "mia",
        "settings": {"members": 6, "attack": "min-k%++"},
        "checkpoints": {"epoch-1": {"auroc": 0.61, "tpr_at_5fpr": 0.1}, "epoch-2": {"auroc": 0.83}},
        "table": {"columns": ["checkpoint", "attack", "auroc"], "rows": [["epoch-2", "loss", 0.8125]]},
        "figures": ["analysis/roc.png", "analysis/roc.svg", "analysis/missing.png"],
    }))


def report_text(path):
    return path.read_text()


def test_run_writes_a_self_contained_report_with_every_section(tiny_run):
    assert "Token-level losses" in report_text(tiny_run / "report.html")  # written by `overmem run` itself
    assert main(["report", str(tiny_run)]) == 0  # now with the analysis file
    html = report_text(tiny_run / "report.html")
    # Nothing is fetched: no http(s) sources or links, no external scripts or style sheets.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<link" not in html and not re.search(r"<script[^>]+src", html)
    for name in SECTIONS:
        assert f'id="r0-{name}"' in html, name
    images = re.findall(r'<img[^>]+src="data:image/(png|svg\+xml);base64,', html)
    # dynamics, token signals, analysis PNG, analysis SVG
    assert images.count("png") == 3 and images.count("svg+xml") == 1
    assert 'alt="reference tokens: greedy agreement, entropy and rank' in html
    assert "analysis/missing.png: figure file not found" in html
    assert "min-k%++" in html and "0.8125" in html and "tpr_at_5fpr" in html  # settings, table, metrics
    assert 'class="recommended"' in html  # the selection table highlights its choice
    assert "<th>callback: checkpoint to keep</th><td>epoch-1</td>" in html
    assert "merge(epoch-1,epoch-2)" in html
    assert "Token losses stored in the samples files" in html
    for text in ("load data and model", "train", "transformers", "torch threads", "config.yaml"):
        assert text in html


def _embedded_pngs(html):
    import base64

    return [base64.b64decode(b) for b in re.findall(r'<img[^>]+src="data:image/png;base64,([^"]+)"', html)]


def test_figures_just_drawn_are_embedded_not_drawn_again(tiny_run, tmp_path, monkeypatch):
    """`overmem run` hands the report the figures its last step drew from the same rows: the page
    embeds those files byte for byte and draws nothing. Without them (`overmem report`) the
    figures are drawn afresh, PNG alone (the page embeds no SVG of them)."""
    from overmem.pipeline import write_run_report
    from overmem.report import build
    from overmem.results import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "analysis").rename(tmp_path / "analysis")  # its PNG aside: only the two figures are embedded
    drawn = [run / f"{n}.{x}" for n in ("dynamics", "signals") for x in ("png", "svg")]

    def refuse(*args, **kwargs):
        raise AssertionError("drawn again")

    with monkeypatch.context() as m:
        m.setattr(build, "plot_dynamics", refuse)
        m.setattr(build, "plot_signals", refuse)
        assert write_run_report(RunDir(run), drawn) == run / "report.html"
    pngs = _embedded_pngs(report_text(run / "report.html"))
    assert pngs == [(run / "dynamics.png").read_bytes(), (run / "signals.png").read_bytes()]

    formats = []
    for name in ("plot_dynamics", "plot_signals"):
        real = getattr(build, name)
        monkeypatch.setattr(build, name, lambda *a, _real=real, **k: formats.append(k["formats"]) or _real(*a, **k))
    assert main(["report", str(run)]) == 0
    assert formats == [("png",), ("png",)]
    assert len(_embedded_pngs(report_text(run / "report.html"))) == 2


def test_test_samples_store_token_losses_that_add_up(tiny_run, char_tokenizer):
    rows = read_jsonl(tiny_run / "samples" / "epoch-1" / "test.jsonl")
    refs = {e.question: e.response for e in toy_examples(8, "test", 100)}
    for r in rows:
        assert "".join(r["tokens"]) == refs[r["question"]]
        assert len(r["tokens"]) == len(r["token_nll"]) == r["n_tokens"]
        assert sum(r["token_nll"]) == pytest.approx(r["nll_sum"], abs=1e-4 * r["n_tokens"])
    assert "tokens" not in read_jsonl(tiny_run / "samples" / "epoch-1" / "validation.jsonl")[0]
    stages = {t["stage"] for t in json.loads((tiny_run / "timings.json").read_text())}
    assert {"load data and model", "train", "merge", "report"} <= stages
    assert json.loads((tiny_run / "environment.json").read_text())["versions"]["overmem"]


def test_token_view_says_how_to_get_losses_the_samples_lack(tiny_run, tmp_path):
    run = tmp_path / "old-run"
    shutil.copytree(tiny_run, run)
    for path in (run / "samples").glob("*/test.jsonl"):
        write_jsonl(path, [{k: v for k, v in r.items() if k not in ("tokens", "token_nll", "question")}
                           for r in read_jsonl(path)])
    assert main(["report", str(run), "--examples", "2", "-q"]) == 0
    html = report_text(run / "report.html")
    view = html.split('id="r0-tokens"')[1].split("</section>")[0]
    assert "do not store per-token losses" in view and "re-evaluate with token losses kept" in view
    assert f"overmem scan {run} --out NEW_FOLDER" in view
    assert 'class="tok"' not in view


def test_phases_and_selection_a_run_lacks_are_derived(tiny_run, tmp_path):
    run = tmp_path / "callback-like"
    shutil.copytree(tiny_run, run)
    (run / "phases.json").unlink()
    (run / "selection.json").unlink()
    assert main(["report", str(run), "-q"]) == 0
    html = report_text(run / "report.html")
    for name in ("summary", "dynamics", "selection", "tokens"):
        assert f'id="r0-{name}"' in html, name
    assert json.loads((tiny_run / "phases.json").read_text())["summary"] in html.replace("&#x27;", "'")
    assert not (run / "phases.json").exists()  # the report only reads


def test_example_option_and_unknown_example(tiny_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(tiny_run), "--out", str(out), "--example", "test/5"]) == 0
    assert re.search(r'data-example="([^"]+)"', out.read_text()).group(1) == "test/5"
    assert main(["report", str(tiny_run), "--out", str(out), "--example", "nope"]) == 2
    assert "example 'nope'" in capsys.readouterr().err


def test_several_runs_are_overlaid_and_compared(tiny_run, tmp_path):
    other = tmp_path / "mar-run"
    shutil.copytree(tiny_run, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["train"].update(loss="mar", lr=1e-3)
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "compare.html"
    assert main(["report", str(tiny_run), str(other), "--out", str(out)]) == 0
    html = out.read_text()
    assert 'id="comparison"' in html and 'id="r0-summary"' in html and 'id="r1-summary"' in html
    assert "runs differ in training loss" in html
    table = html.split('id="comparison"')[1].split("</table>")[0]
    assert "<td>mar</td>" in table and "<td>ce</td>" in table and "<td>0.001</td>" in table
    assert len(re.findall(r"<img", html)) == 1 + 2 * 4  # overlay + each run's dynamics, signals and 2 analysis figures


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_analysis_rendering_skips_absent_parts(tmp_path):
    only_table = analysis_body(tmp_path, {"analysis": "ood", "table": {"columns": ["a", "b"], "rows": [[1, 2.5]]}})
    assert "<table>" in only_table and "settings" not in only_table and "<img" not in only_table
    per_ckpt = analysis_body(tmp_path, {"checkpoints": {"epoch-1": {"auroc": 0.6}, "epoch-2": {"auroc": 0.8}}})
    assert "<h4>Per checkpoint</h4>" in per_ckpt and "<td>auroc</td><td>0.6</td><td>0.8</td>" in per_ckpt
    outside = analysis_body(tmp_path / "run", {"figures": ["../secret.png"]})
    assert "outside the run folder" in outside
    assert "no settings, table or figures" in analysis_body(tmp_path, {"analysis": "empty"})


def test_sentence_spans_and_sentence_perplexity():
    tokens = ["He", " has", " 3", ".", "5", " kg", ".", " ", "Then", "\n", "####", " 4"]
    spans = sentence_spans(tokens)
    assert ["".join(tokens[a:b]) for a, b in spans] == ["He has 3.5 kg. ", "Then\n", "#### 4"]
    assert sentence_spans([]) == []


def phase_row(name, ppl, label):
    return {"checkpoint": name, "ppl": ppl, "label": label}


def test_checkpoint_pair_is_the_one_to_keep_and_the_last_over_memorized():
    cps = [phase_row("epoch-0", 9, "low_accuracy"), phase_row("epoch-1", 2.0, "healthy"),
           phase_row("epoch-2", 1.8, "healthy"), phase_row("epoch-3", 3.0, "over_memorized"),
           phase_row("epoch-4", 4.0, "over_memorized"), phase_row("epoch-5", 4.5, "overfitting")]
    keep = Keep(checkpoint="epoch-1", split="validation", reason="highest validation accuracy ...")
    pair = choose_checkpoints({"split": "test", "checkpoints": cps}, keep)
    assert (pair.early, pair.late) == ("epoch-1", "epoch-4") and "the checkpoint to keep (highest" in pair.why
    pair = choose_checkpoints({"split": "test", "checkpoints": cps}, None)  # no rule to read: the lowest ppl
    assert (pair.early, pair.late) == ("epoch-2", "epoch-4")
    falling = [phase_row("epoch-0", 9, "low_accuracy"), phase_row("epoch-1", 3, "low_accuracy")]
    pair = choose_checkpoints({"split": "test", "checkpoints": falling}, keep)
    assert (pair.early, pair.late) == ("epoch-0", "epoch-1") and "never rose" in pair.why
    rising = [phase_row("epoch-0", 2, "healthy"), phase_row("epoch-1", 2.5, "healthy")]
    pair = choose_checkpoints({"split": "test", "checkpoints": rising}, keep)
    assert (pair.early, pair.late) == ("epoch-0", "epoch-1") and "No over-memorized checkpoint follows" in pair.why
    assert choose_checkpoints({"split": "test", "checkpoints": falling[:1]}, keep) is None


def test_examples_both_correct_first_then_largest_ppl_rise():
    a = {"x": {"ppl": 2.0, "correct": True}, "y": {"ppl": 2.0, "correct": True}, "z": {"ppl": 1.0, "correct": False}}
    b = {"x": {"ppl": 3.0, "correct": True}, "y": {"ppl": 5.0, "correct": True}, "z": {"ppl": 9.0, "correct": True}}
    assert choose_examples(a, b, 3) == ["y", "x", "z"]
    assert choose_examples(a, b, 2, first="z") == ["z", "y"]


def test_response_pieces_rebuild_the_text_with_a_bpe_tokenizer(char_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "Le café coûte 3.50 € 🙂  ok\n#### 7"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text, "the cost is 12 dollars"] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe = PreTrainedTokenizerFast(tokenizer_object=tk)
    n = len(bpe(text, add_special_tokens=False)["input_ids"])
    assert "".join(response_pieces(bpe, text, n)) == text
    assert len(response_pieces(bpe, text, n - 2)) == n - 2
    assert "".join(response_pieces(char_tokenizer, text[:10], 4)) == text[:4]


# ---- in a real browser -------------------------------------------------------------------------


def _chrome():
    """Headless Chromium through selenium, or a skip saying what is missing."""
    missing = [b for b in ("chromium", "chromedriver") if not shutil.which(b)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def test_report_in_headless_chromium(tiny_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    assert main(["report", str(tiny_run), "--examples", "3"]) == 0
    driver = _chrome()
    try:
        driver.get((tiny_run / "report.html").resolve().as_uri())
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        figures = driver.find_elements(By.CSS_SELECTOR, "img, svg")
        assert len(figures) == 4  # dynamics, token signals, 2 analysis figures
        for fig in figures:
            w, h = driver.execute_script(
                "var e = arguments[0]; if (e.tagName.toLowerCase() === 'img') return [e.naturalWidth, e.naturalHeight];"
                "var b = e.getBoundingClientRect(); return [b.width, b.height];", fig)
            assert w > 0 and h > 0
        def visible():
            shown = [e for e in driver.find_elements(By.CSS_SELECTOR, ".token-example") if e.is_displayed()]
            assert len(shown) == 1
            return shown[0].get_attribute("data-example"), shown[0].text
        select = Select(driver.find_element(By.CSS_SELECTOR, "select.example-select"))
        assert len(select.options) == 3
        first_id, first_text = visible()
        select.select_by_index(2)
        second_id, second_text = visible()
        assert second_id == select.options[2].get_attribute("value") != first_id
        assert second_text != first_text and "reference perplexity" in second_text
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(height + 50, 12000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()


def test_a_torn_samples_file_is_named_not_read_short(tiny_run, tmp_path, capsys):
    """A samples file whose last line was cut (edited, or copied while written) is an error naming
    the file and line; the token view is not drawn from one example fewer, and the report stays as it was."""
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = (run / "report.html").read_bytes()
    for path in run.glob("samples/*/test.jsonl"):
        path.write_text(path.read_text()[:-20])
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(r"samples/epoch-\d/test.jsonl line \d+: incomplete last line", err) and len(err.splitlines()) == 1
    assert (run / "report.html").read_bytes() == before
