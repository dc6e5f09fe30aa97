"""The LLM-judge win rate against a scripted OpenAI-compatible server started by the test: win
rate against a hand count, position randomisation, retries, errors, and `overmem analyze --suite
judge` end to end on a tiny model."""

import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from overmem.analysis.judge import (
    DEFAULT_PROMPT,
    JudgeClient,
    JudgeError,
    check_prompt,
    chat_completions_url,
    judge_win_rate,
    model_position,
    parse_verdict,
    without_credentials,
)
from overmem.cli import main
from overmem.config import ConfigError
from overmem.data.example import Example
from tests.conftest import hand_made_run


class ScriptedJudge:
    """What the server does: `script` is a list of actions consumed one per request (then "judge"):
    "judge" answers like a judge that prefers the response containing GOOD and otherwise always says
    B (a position-biased judge); "503"/"404" answer that status; "not-json", "no-choices" answer a
    malformed body; "slow" waits 2 s before judging."""

    def __init__(self):
        self.script: list[str] = []
        self.requests: list[dict] = []

    def reply(self, prompt: str) -> str:
        a = prompt.split("### Response A:\n", 1)[1].split("\n\n### Response B:\n", 1)[0]
        return "A" if "GOOD" in a else ("B" if "GOOD" in prompt else "**B**")


@pytest.fixture()
def judge_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    judge = ScriptedJudge()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def _send(self, status, body):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            action = judge.script.pop(0) if judge.script else "judge"
            if action in ("503", "404"):
                return self._send(int(action), json.dumps({"error": f"scripted {action}"}))
            if action == "not-json":
                return self._send(200, "<html>gateway</html>")
            if action == "no-choices":
                return self._send(200, json.dumps({"object": "error", "message": "model not loaded"}))
            if action == "slow":
                time.sleep(2)
            content = judge.reply(body["messages"][0]["content"])
            self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}))

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a client that timed out and left: expected
            pass

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    judge.endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield judge
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def examples_and_generations(n_good=6, n_bad=4):
    examples = [Example(f"ex/{i}", f"Instruction {i}", f"Reference {i}.", f"Reference {i}.", "open")
                for i in range(n_good + n_bad)]
    generations = [f"GOOD answer {i}" for i in range(n_good)] + [f"weak answer {i}" for i in range(n_bad)]
    return examples, generations


def expected_position(example_id, seed):
    return "A" if random.Random(f"{seed}:{example_id}").random() < 0.5 else "B"


def test_win_rate_against_a_hand_count(judge_server):
    examples, generations = examples_and_generations()
    client = JudgeClient(judge_server.endpoint, "judge-model", backoff_s=0)
    result = judge_win_rate(client, examples, generations, seed=3, n_boot=200)
    positions = [expected_position(ex.id, 3) for ex in examples]
    # The 6 GOOD answers win wherever they are shown; the 4 weak ones win only when shown as B,
    # which this judge always picks when neither response is GOOD.
    wins = 6 + sum(p == "B" for p in positions[6:])
    m = result.metrics
    assert (m["wins"], m["n"], m["n_invalid"]) == (wins, 10, 0)
    assert m["win_rate"] == pytest.approx(wins / 10)
    assert m["win_rate_ci_low"] <= m["win_rate"] <= m["win_rate_ci_high"]
    as_a = [i for i, p in enumerate(positions) if p == "A"]
    assert m["win_rate_as_a"] == pytest.approx(sum(i < 6 for i in as_a) / len(as_a))  # weak answers never win as A
    assert m["mean_chars"] == pytest.approx(sum(map(len, generations)) / 10)
    assert m["mean_chars_reference"] == pytest.approx(sum(len(ex.response) for ex in examples) / 10)
    # Each request put the model's answer where the row says, and the reference in the other slot.
    for row, request, ex, text in zip(result.rows, judge_server.requests, examples, generations):
        prompt = request["body"]["messages"][0]["content"]
        a, b = (text, ex.response) if row["model_position"] == "A" else (ex.response, text)
        assert prompt == DEFAULT_PROMPT.format(instruction=ex.question, response_a=a, response_b=b)
        assert row["win"] == (row["verdict"] == row["model_position"]) and row["attempts"] == 1
    assert [r["model_position"] for r in result.rows] == positions
    body = judge_server.requests[0]
    assert body["path"] == "/v1/chat/completions" and body["auth"] is None
    assert body["body"]["model"] == "judge-model" and body["body"]["temperature"] == 0


def test_all_wins_give_a_degenerate_interval(judge_server):
    examples, generations = examples_and_generations(n_good=5, n_bad=0)
    m = judge_win_rate(JudgeClient(judge_server.endpoint, "m"), examples, generations, n_boot=100).metrics
    assert (m["win_rate"], m["win_rate_ci_low"], m["win_rate_ci_high"]) == (1.0, 1.0, 1.0)


def test_position_randomisation():
    ids = [f"alpaca/{i}" for i in range(400)]
    positions = [model_position(i, 0) for i in ids]
    assert positions == [expected_position(i, 0) for i in ids]  # seeded per example, stable
    assert 0.42 < positions.count("A") / 400 < 0.58
    assert positions != [model_position(i, 1) for i in ids]  # another seed, another draw


@pytest.mark.parametrize(("reply", "verdict"), [
    ("A", "A"), ("B", "B"), (" **B**\n", "B"), ("(A).", "A"), ("'B'", "B"), ("Response A", "A"),
    ("Output B is better.", "B"), ("I prefer response (B) because it is concise.", "B"),
    ("Response A and Response B are equally good", None), ("a", None), ("Both", None), ("", None),
    ("A better answer would cite sources.", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_invalid_verdicts_are_counted_not_scored(judge_server, monkeypatch):
    examples, generations = examples_and_generations(n_good=2, n_bad=2)
    replies = iter(["A", "no idea", "B", "Both are fine"])
    monkeypatch.setattr(judge_server, "reply", lambda prompt: next(replies))
    result = judge_win_rate(JudgeClient(judge_server.endpoint, "m"), examples, generations, seed=0, n_boot=50)
    positions = [expected_position(ex.id, 0) for ex in examples]
    wins = (positions[0] == "A") + (positions[2] == "B")
    assert (result.metrics["n"], result.metrics["n_invalid"], result.metrics["wins"]) == (2, 2, wins)
    assert result.metrics["win_rate"] == pytest.approx(wins / 2)
    assert [r["verdict"] for r in result.rows] == ["A", None, "B", None]


def test_retries_then_success(judge_server):
    judge_server.script = ["503", "503"]
    client = JudgeClient(judge_server.endpoint, "m", retries=2, backoff_s=0)
    assert client.complete("... ### Response A:\nGOOD\n\n### Response B:\nx") == ("A", 3)
    assert len(judge_server.requests) == 3


def test_retries_exhausted(judge_server):
    judge_server.script = ["503", "503", "503"]
    client = JudgeClient(judge_server.endpoint, "m", retries=1, backoff_s=0)
    with pytest.raises(JudgeError, match=r"judge endpoint http://127\.0\.0\.1:\d+/v1/chat/completions: HTTP 503 .*"
                                         r"scripted 503.*after 2 attempt"):
        client.complete("x")
    assert len(judge_server.requests) == 2


def test_http_error_is_not_retried(judge_server):
    judge_server.script = ["404"]
    with pytest.raises(JudgeError, match=r"/v1/chat/completions: HTTP 404 .*check analysis\.judge\.endpoint"):
        JudgeClient(judge_server.endpoint, "m", retries=3, backoff_s=0).complete("x")
    assert len(judge_server.requests) == 1


@pytest.mark.parametrize(("action", "message"), [
    ("not-json", r"malformed response \(not JSON\): '<html>gateway</html>'"),
    ("no-choices", r"malformed response \(no choices\[0\]\.message\.content\): .*model not loaded"),
])
def test_malformed_responses(judge_server, action, message):
    judge_server.script = [action]
    with pytest.raises(JudgeError, match=rf"judge endpoint {judge_server.endpoint}/chat/completions: {message}"):
        JudgeClient(judge_server.endpoint, "m", backoff_s=0).complete("x")


def test_timeout_is_retried_then_reported(judge_server):
    judge_server.script = ["slow", "slow"]
    client = JudgeClient(judge_server.endpoint, "m", timeout_s=0.3, retries=1, backoff_s=0)
    with pytest.raises(JudgeError, match=r"no answer within 0\.3 s .*after 2 attempt"):
        client.complete("x")


def test_connection_refused(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = JudgeClient(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff_s=0)
    with pytest.raises(JudgeError, match=rf"judge endpoint http://127\.0\.0\.1:{port}/v1/chat/completions: "
                                         r"connection refused; is the server running.*after 2 attempt"):
        client.complete("x")
    assert isinstance(JudgeError("x"), OSError)  # the CLI reports it in one line, exit code 1


def test_urls_and_prompt_checks():
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    assert without_credentials("https://me:pw@h.example:8443/v1") == "https://h.example:8443/v1"
    assert without_credentials("http://h:8000/v1") == "http://h:8000/v1"
    check_prompt(DEFAULT_PROMPT)
    with pytest.raises(ConfigError, match=r"uses \['instruction', 'response_a'\]; it must use exactly"):
        check_prompt("{instruction} {response_a}")
    with pytest.raises(ConfigError, match="literal braces"):
        check_prompt("{instruction} {response_a} {response_b} {")


# ---------------------------------------------------------------------------------------------
# End to end: `overmem analyze --suite judge`


@pytest.fixture()
def alpaca_run(tmp_path, tiny_model_dir, char_tokenizer):
    """A run folder as `overmem run` leaves it, on Alpaca-format data, with one checkpoint."""
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}."}) + "\n"
                            for i in range(6)))
    return hand_made_run(tmp_path / "run", tiny_model_dir, char_tokenizer, train=f"{data}[:4]",
                         tests={"test": str(data)}, max_new_tokens=5, accuracies={"epoch-0": None, "epoch-1": None})


def test_analyze_suite_judge_end_to_end(alpaca_run, judge_server, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-123")
    args = ["analyze", str(alpaca_run), "--checkpoints", "epoch-0", "epoch-1", "--suite", "judge", "-q",
            "--set", f"analysis.judge.endpoint={judge_server.endpoint}", "--set", "analysis.judge.model=judge-7b",
            "--set", "analysis.judge.api_key_env=JUDGE_KEY", "--set", "analysis.judge.size=4"]
    assert main(args) == 0
    assert "win rate" in capsys.readouterr().out
    doc = json.loads((alpaca_run / "analysis" / "judge.json").read_text())
    s = doc["settings"]
    assert (s["model"], s["api_key_env"], s["prompt"]) == ("judge-7b", "JUDGE_KEY", DEFAULT_PROMPT)
    assert s["endpoint"] == f"{judge_server.endpoint}/chat/completions" and s["size"] == 4
    for ckpt in ("epoch-0", "epoch-1"):
        rows = [json.loads(line) for line in (alpaca_run / doc["samples"][ckpt]).read_text().splitlines()]
        m = doc["checkpoints"][ckpt]
        # The tiny model never writes GOOD: it wins exactly where it is shown as B (hand count from the rows).
        assert len(rows) == m["n"] == 4
        assert m["wins"] == sum(r["model_position"] == "B" for r in rows)
        assert m["win_rate"] == pytest.approx(m["wins"] / 4)
        assert all(r["reference"] == f"{r['id'].split('/')[-1]}." for r in rows)
    assert len(judge_server.requests) == 8 and {r["auth"] for r in judge_server.requests} == {"Bearer sk-secret-123"}
    # The key is sent, never written.
    for path in alpaca_run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml"):
            assert "sk-secret-123" not in path.read_text()


def test_analyze_judge_needs_an_endpoint(alpaca_run, capsys, monkeypatch):
    assert main(["analyze", str(alpaca_run), "--checkpoints", "epoch-1", "--suite", "judge", "-q"]) == 2
    assert "analysis.judge.endpoint: not set" in capsys.readouterr().err
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    assert main(["analyze", str(alpaca_run), "--checkpoints", "epoch-1", "--suite", "judge", "-q",
                 "--set", "analysis.judge.endpoint=http://127.0.0.1:9/v1", "--set", "analysis.judge.model=m",
                 "--set", "analysis.judge.api_key_env=NO_SUCH_KEY"]) == 2
    assert "environment variable NO_SUCH_KEY is not set" in capsys.readouterr().err
    assert not (alpaca_run / "analysis" / "judge.json").exists()

    # No server: one line naming the endpoint, exit code 1, nothing written for the checkpoint.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["analyze", str(alpaca_run), "--checkpoints", "epoch-1", "--suite", "judge", "-q",
                 "--set", f"analysis.judge.endpoint=http://127.0.0.1:{port}/v1", "--set", "analysis.judge.model=m",
                 "--set", "analysis.judge.retries=0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"overmem analyze: error: judge endpoint http://127.0.0.1:{port}/v1/chat/completions: "
                          "connection refused"), err  # not blamed on a path, as a file-system error would be
    assert not (alpaca_run / "analysis" / "judge.json").exists()
    assert not (alpaca_run / "analysis" / "judge" / "epoch-1.jsonl").exists()
