"""What no server, URL or file may do to a run (issue 23 and 24, the client and I/O side of ARR's judge, arXiv
2605.08354): each finding reproduced against tests/hostile_vlm.py or tests/fake_vlm.py on 127.0.0.1, then the
fixed behaviour.

- secrets: a password and a key in the judge URL reach none of config.json, a checkpoint's config.json, the config
  line, the judge-check line, the `stopped:` message (one test per place); the request URL keeps its query string;
  a 307 to another port is refused, not followed;
- bounded I/O: a drip (body or headers) ends at the request's deadline, a flood at max_response_bytes (one
  request, no retry), a re-ask quotes a bounded excerpt, a long reason is cut in the verdict and the results file;
  train.py's Config sets the client's timeout, retries, total time and size cap;
- every CLI survives every malformed reply (judge.py eval / ping, rubrics.py induce / prompt / select,
  train_judge.py eval, train.py): no traceback, its documented exit code, the failure counted and named;
- images and text: 16-bit grey and palette pixels converted right, truncated and oversized images refused naming
  the file, BOMs stripped, the prompt-encoding progress line; ping prints each order; position figures that
  nothing measured are null.

Run: python -m pytest tests/test_hostile.py -q   (about a minute on 2 cores; the train.py runs use the tiny FLUX)
"""
import base64
import io
import json
import logging
import time
import tracemalloc
from contextlib import redirect_stderr, redirect_stdout

import pytest
from PIL import Image

import data
import judge
import rubrics
import runtime
import train
import train_judge
import vlm_client
from fake_vlm import FakeVLM
from hostile_vlm import BODIES, MALFORMED, HostileVLM, answer
from judge_helpers import BLUE, RED, RUBRIC, solid
from train_helpers import demo_args
from vlm_client import ImageError, JudgeError, ReplyError, VLMClient

PASSWORD, KEY = "pw-9f2e", "SECRET%2B4c1"  # the key URL-encoded as users paste it; decoded: SECRET+4c1
HI = [{"role": "user", "content": "hi"}]


def secret_url(fake):
    return fake.url.replace("http://", f"http://judge:{PASSWORD}@") + f"?key={KEY}"


def leaks(text):
    """The spellings of the URL's secrets found in text (raw, decoded, re-encoded)."""
    return [s for s in (PASSWORD, "SECRET", "4c1") if s in text]


# ----- secrets: one test per place a run prints or writes the judge URL --------------------------------------------

@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, cache):
    """One training step against the fake judge at a URL holding a password and a key; what it printed and wrote."""
    tmp = tmp_path_factory.mktemp("secret_run")
    (tmp / "rubrics.txt").write_text("1. Redder is better.\n")
    with FakeVLM() as fake:
        argv = demo_args(tmp / "run", cache, "--max_steps", "1", "--judge_url", secret_url(fake), "--judge_model",
                         "fake-vl", "--rubrics", str(tmp / "rubrics.txt"))
        capture = io.StringIO()
        handler = logging.StreamHandler(capture)
        logging.getLogger().addHandler(handler)
        try:
            with redirect_stdout(capture), redirect_stderr(capture):
                code = train.main(argv)
        finally:
            logging.getLogger().removeHandler(handler)
        paths = list(fake.paths)
    return {"code": code, "out": capture.getvalue(), "run": tmp / "run", "paths": paths}


def test_the_request_url_keeps_its_query_string(secret_run):
    assert secret_run["code"] == 0, secret_run["out"][-3000:]
    assert secret_run["paths"] and set(secret_run["paths"]) == {f"/v1/chat/completions?key={KEY}"}


def test_no_secret_in_config_json(secret_run):
    text = (secret_run["run"] / "config.json").read_text()
    assert json.loads(text)["judge_url"].startswith("http://***@127.0.0.1:") and leaks(text) == []
    assert json.loads(text)["judge_url"].endswith("/v1?key=***")


def test_no_secret_in_a_checkpoints_config_json(secret_run):
    (ckpt,) = (secret_run["run"] / "checkpoints").iterdir()
    text = (ckpt / "config.json").read_text()
    assert "***@127.0.0.1" in text and leaks(text) == []


def test_no_secret_in_the_config_line(secret_run):
    (line,) = [line for line in secret_run["out"].splitlines() if line.startswith("config: ")]
    assert "judge_url=http://***@127.0.0.1:" in line and leaks(line) == []


def test_no_secret_in_the_judge_check_line(secret_run):
    (line,) = [line for line in secret_run["out"].splitlines() if line.startswith("judge check: ")]
    assert "http://***@127.0.0.1:" in line and "?key=***" in line and leaks(line) == []
    assert leaks(secret_run["out"]) == []  # nor anywhere else in what the run printed or logged


def test_no_secret_in_the_stopped_message(tmp_path, cache, capsys):
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    with FakeVLM() as fake:
        fake.script("401", "401")
        argv = demo_args(tmp_path / "run", cache, "--judge_url", secret_url(fake), "--judge_model", "fake-vl",
                         "--rubrics", str(tmp_path / "rubrics.txt"), "--judge_max_retries", "0")
        assert train.main(argv) == 1
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if line.startswith("stopped: ")]
    assert "judge check failed for http://***@127.0.0.1:" in line and "HTTP 401" in line
    assert leaks(captured.out + captured.err) == []


def test_secrets_are_masked_in_every_spelling():
    url = "http://u:p%40ss-word@h:1/v1?key=S%2FECRET-1&other=ok-val"
    text = (f"POST {url} failed; HTTPConnectionPool: url: /v1/chat/completions?key=S%2FECRET-1&other=ok-val; "
            "the key S/ECRET-1, encoded twice S%252FECRET-1, the password p@ss-word")
    masked = vlm_client.redact(text, vlm_client.url_secrets(url))
    assert vlm_client.public_url(url) == "http://***@h:1/v1?key=***&other=***"
    for secret in ("ECRET", "ss-word", "ok-val"):
        assert secret not in masked, masked
    assert "http://***@h:1/v1?key=***&other=***" in masked


def test_a_redirect_to_another_server_is_refused_not_followed():
    with HostileVLM("verdict") as elsewhere, HostileVLM("redirect", location=elsewhere.url + "/chat/completions") \
            as server:
        client = VLMClient(server.url.replace("http://", f"http://u:{PASSWORD}@"), "m", max_retries=2)
        with pytest.raises(JudgeError) as info:
            client.chat(HI)
        assert elsewhere.requests == 0 and server.requests == 1  # not re-posted there, not retried here
    message = str(info.value)
    assert "HTTP 307: a redirect to http://127.0.0.1:" in message and "not followed" in message
    assert PASSWORD not in message


# ----- bounded I/O -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["drip_body", "drip_headers"])
def test_a_drip_cannot_stretch_the_deadline(mode):
    """One byte every 0.3 s resets a per-read timeout forever; the request's deadline (timeout 1 s, total 1.5 s)
    still ends it (the unbounded client took 44 s for a 3 s / 10 s one)."""
    with HostileVLM(mode, interval=0.3) as server:
        client = VLMClient(server.url, "m", timeout=1.0, max_retries=3, max_total_time=1.5, backoff_base=0.01)
        started = time.monotonic()
        with pytest.raises(JudgeError, match="no complete answer within"):
            client.chat(HI)
        assert time.monotonic() - started < 4.0  # 1.5 s and the scheduler's slack; the drip alone takes ~60 s


def test_train_with_a_dripping_judge_stops_within_its_bounds(tmp_path, cache, capsys):
    """The run that hung (SIGKILL, no checkpoint): train.py's judge options bound the startup check's request."""
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    with HostileVLM("drip_body", interval=0.3) as server:
        argv = demo_args(tmp_path / "run", cache, "--judge_url", server.url, "--judge_model", "m", "--rubrics",
                         str(tmp_path / "rubrics.txt"), "--judge_timeout", "0.5", "--judge_max_total_time", "1")
        started = time.monotonic()
        assert train.main(argv) == 1
        assert time.monotonic() - started < 20  # the drip alone would take minutes
    err = capsys.readouterr().err
    assert "stopped: judge check failed" in err and "no complete answer within" in err


@pytest.mark.parametrize("chunked", [False, True])
def test_a_flood_is_refused_at_the_size_cap_once(chunked):
    with HostileVLM("huge", size=64 * 2 ** 20, chunked=chunked) as server:
        client = VLMClient(server.url, "m", max_retries=3, max_response_bytes=2 ** 20)
        tracemalloc.start()
        with pytest.raises(JudgeError, match="max_response_bytes=1048576"):
            client.chat(HI)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert server.requests == 1  # not retried: the same request would get the same flood
    assert peak < 8 * 2 ** 20  # about the cap, never the 64 MiB


def test_a_reask_quotes_a_bounded_excerpt_of_the_bad_answer():
    with FakeVLM(handler=lambda body: "no verdict here " * 20000) as fake:
        verdict = judge.Judge(VLMClient(fake.url, "m", max_retries=0), RUBRIC, swap=False).compare(
            "red", [solid(BLUE), solid(RED)])
        assert verdict.rank is None and "unusable reply after 3 attempt(s)" in verdict.error
        assert len(verdict.error) < 1000
        for body in fake.requests[1:]:
            shown = body["messages"][-2]
            assert shown["role"] == "assistant" and len(shown["content"]) < vlm_client.REASK_CHARS + 40


def test_a_long_reason_is_cut_in_the_verdict_and_the_results_file(tmp_path, images):
    pairs = pair_file(tmp_path, images, n=1)
    with HostileVLM("verdict", reason="because " * 200000) as server:  # a valid verdict with a 1.6 MB reason
        client = VLMClient(server.url, "m", max_retries=0)
        with judge.Judge(client, RUBRIC, swap=False) as the_judge:  # it always answers [1, 2]
            summary = judge.evaluate(the_judge, data.load_pairs(pairs), out=tmp_path / "results.jsonl")
    assert summary["accuracy"] == 1.0
    header, record = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert header[judge.RESULTS_HEADER] == 1
    assert record["reason"].startswith("because because") and record["reason"].endswith("[1600000 characters]")
    assert (tmp_path / "results.jsonl").stat().st_size < 4 * judge.REASON_CHARS


def test_a_huge_error_message_is_quoted_bounded():
    with HostileVLM("body", body=json.dumps({"error": {"message": "overloaded " * 100000}}).encode()) as server:
        with pytest.raises(ReplyError) as info:
            VLMClient(server.url, "m", max_retries=0).chat(HI)  # a 200 without choices, only an error envelope
    assert "response has no choices: overloaded overloaded" in str(info.value) and len(str(info.value)) < 500


def test_train_config_sets_the_clients_bounds(tmp_path):
    (tmp_path / "r.txt").write_text("1. Redder is better.\n")
    cfg = train.make_config(["--model", "m", "--judge_url", "http://x/v1", "--rubrics", str(tmp_path / "r.txt"),
                             "--prompts", str(tmp_path / "r.txt"), "--judge_timeout", "7", "--judge_max_retries",
                             "1", "--judge_max_total_time", "9", "--judge_max_response_bytes", "4096"])
    the_judge, _ = runtime.make_judge(cfg, None, "1. Redder.", "t2i")
    client = the_judge.client
    assert (client.timeout, client.max_retries, client.max_total_time, client.max_response_bytes) == (7, 1, 9, 4096)
    the_judge.close()


# ----- malformed replies: the client names them, every CLI counts them ---------------------------------------------

@pytest.mark.parametrize("name", sorted(BODIES))
def test_every_malformed_reply_is_a_named_reply_or_judge_error(name):
    with HostileVLM("body", body=BODIES[name]) as server:
        client = VLMClient(server.url, "m", max_retries=0)
        try:
            text = client.chat(HI)
        except ReplyError as exc:  # re-asked by ask_json, then a counted failure
            assert "malformed reply" in str(exc) or "no choices" in str(exc) or "empty answer" in str(exc)
        except JudgeError as exc:  # the body is not JSON at all
            assert "not JSON" in str(exc) and len(str(exc)) < 600
        else:  # the answer text itself is garbage: extract_json finds no object, and says so
            assert name == "answer_nested"
            with pytest.raises(ReplyError, match="no JSON object"):
                vlm_client.extract_json(text)
    assert name in MALFORMED or name in ("not_json", "deep_json", "answer_nested")


def pair_file(tmp_path, images, n=2):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"red {i}", "path1": str(images / "red.png"),
                                          "path2": str(images / "blue.png")}) for i in range(n)))
    return path


def cli_runs(tmp_path, images, url):
    """(name, callable -> exit code, the code its documentation gives when every reply is unusable)."""
    pairs, rubric_file = pair_file(tmp_path, images), tmp_path / "rubrics.txt"
    rubric_file.write_text("1. Redder is better.\n")
    client = ["--base_url", url, "--model", "m", "--max_retries", "0"]
    return [
        ("judge eval", lambda: judge.main(["eval", "--data", str(pairs), "--rubrics", str(rubric_file), *client]), 1),
        ("judge ping", lambda: judge.main(["ping", *client]), 1),
        ("rubrics induce", lambda: rubrics.main(["induce", "--data", str(pairs), "--out", str(tmp_path / "i.txt"),
                                                 *client]), 1),
        ("rubrics prompt", lambda: rubrics.main(["prompt", "--data", str(pairs), "--out", str(tmp_path / "p.json"),
                                                 *client]), 1),
        ("rubrics select", lambda: rubrics.main(["select", "--data", str(pairs), "--rubrics", str(rubric_file),
                                                 "--top_n", "1", "--out", str(tmp_path / "s.txt"), *client]), 2),
        ("train_judge eval", lambda: train_judge.main(["eval", "--data", str(pairs), *client]), 1),
    ]


@pytest.mark.parametrize("cli", ["judge eval", "judge ping", "rubrics induce", "rubrics prompt", "rubrics select",
                                 "train_judge eval"])
def test_every_cli_survives_every_malformed_reply(cli, tmp_path, images, capsys):
    with HostileVLM("cycle") as server:  # each request gets the next malformed shape
        (run, expected), = [(run, code) for name, run, code in cli_runs(tmp_path, images, server.url) if name == cli]
        assert run() == expected
        assert server.requests >= 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    text = captured.err + captured.out
    assert any(word in text for word in ("malformed reply", "not JSON", "no choices", "no JSON object")), text[-2000:]


def test_train_survives_a_malformed_reply(tmp_path, cache, capsys):
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    with HostileVLM("body", body=BODIES["choices_of_strings"]) as server:
        argv = demo_args(tmp_path / "run", cache, "--judge_url", server.url, "--judge_model", "m", "--rubrics",
                         str(tmp_path / "rubrics.txt"), "--judge_max_retries", "0")
        assert train.main(argv) == 1  # the startup judge check fails, named
    err = capsys.readouterr().err
    assert "stopped: judge check failed" in err and "malformed reply: choices is a list of str" in err
    assert "Traceback" not in err


# ----- images and text ---------------------------------------------------------------------------------------------

def grey16(path, value):
    Image.frombytes("I;16", (8, 8), int(value).to_bytes(2, "little") * 64).save(path)
    return path


def test_a_16_bit_grey_source_keeps_its_grey(tmp_path):
    path = grey16(tmp_path / "grey16.png", 32768)
    assert Image.open(path).mode == "I;16" and Image.open(path).convert("RGB").getpixel((0, 0)) == (255,) * 3
    assert data.open_source(data.Item("p", str(path))).getpixel((3, 3)) == (128, 128, 128)
    sent = vlm_client.encode_image(str(path))  # the judge gets 8-bit pixels, not a file its server turns white
    decoded = Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1])))
    assert decoded.convert("RGB").getpixel((0, 0)) == (128, 128, 128)


def test_a_palette_image_keeps_its_colours_and_transparency(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)  # index 0 (red) is transparent
    rgb = data.open_source(data.Item("p", str(tmp_path / "p.png")))
    assert rgb.getpixel((0, 0)) == (0, 255, 0) and rgb.getpixel((1, 1)) == (255, 255, 255)


def test_a_truncated_image_is_a_data_error_naming_the_file(tmp_path):
    solid(RED, (64, 64)).save(tmp_path / "whole.png")
    raw = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "edits.jsonl").write_text(json.dumps({"source_image": "cut.png", "instruction": "redder"}))
    with pytest.raises(data.DataError, match=r"edits.jsonl:1: cannot read source_image .*cut.png"):
        data.load_prompts(tmp_path / "edits.jsonl", "edit", "prompts")
    with pytest.raises(ImageError, match="cut.png: not a readable image"):
        vlm_client.encode_image(str(tmp_path / "cut.png"))  # not sent to the server as it is
    with pytest.raises(data.DataError, match="cut.png"):
        data.open_source(data.Item("redder", str(tmp_path / "cut.png")))


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(2 ** 30)  # 1 GiB, sparse: costs no disk
    tracemalloc.start()
    with pytest.raises(ImageError, match="1073741824 bytes, over the"):
        vlm_client.encode_image(str(huge))
    with pytest.raises(data.DataError, match="over the"):
        data.check_image(huge, "edits.jsonl:1")
    assert tracemalloc.get_traced_memory()[1] < 2 ** 20
    tracemalloc.stop()


def test_byte_order_marks_are_stripped(tmp_path, images):
    (tmp_path / "prompts.txt").write_bytes("\ufeffa red apple\na blue car\n".encode())
    assert [i.prompt for i in data.load_prompts(tmp_path / "prompts.txt", "t2i", "prompts")] == ["a red apple",
                                                                                              "a blue car"]
    pairs = pair_file(tmp_path, images)
    pairs.write_bytes(b"\xef\xbb\xbf" + pairs.read_bytes())
    assert [item.prompt for item in data.load_pairs(pairs)] == ["red 0", "red 1"]


def test_long_prompt_warnings_are_summarised(capfd):
    import policy
    logger = logging.getLogger("diffusers.pipelines.flux.pipeline_flux")
    logger.addFilter(policy.LONG_PROMPTS)  # what FlowLoraPolicy does for its pipeline's logger
    record = logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "The following part of your input was "
                               "truncated because CLIP can only handle sequences up to 77 tokens: %s",
                               ("word " * 2200,), None)
    assert logger.filter(record)
    message = record.getMessage()
    assert message.startswith("The following part") and "... [11000 characters]" in message and len(message) < 250


def test_encoding_progress_is_printed_for_long_work(capsys):
    now = iter([0.0, 1.0, 11.0, 12.0, 23.0, 24.0])
    progress = runtime.Progress("prompts: encoded", every=10.0, clock=lambda: next(now))
    for done in range(1, 6):
        progress(done, 100_000)
    lines = capsys.readouterr().out.splitlines()
    # a line at 11 s (2 done: 2 / 11 per s) and at 23 s (4 done), none in between
    assert lines == [f"prompts: encoded 2/100000 (0.2/s, about {99998 * 11 / 2:.0f} s left)",
                     f"prompts: encoded 4/100000 (0.2/s, about {99996 * 23 / 4:.0f} s left)"]


# ----- ping and the summary ----------------------------------------------------------------------------------------

def test_ping_prints_each_order_as_it_goes_with_a_small_budget(fake, capsys):
    assert judge.main(["ping", "--base_url", fake.url, "--model", "fake-model", "--api_key_env", "UNSET_KEY"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[ping]")]
    assert [line.split(":")[0] for line in lines] == ["[ping] order 1/2 (candidates shown as [1, 2])",
                                                      "[ping] order 1/2", "[ping] order 2/2 (candidates shown as "
                                                      "[2, 1])", "[ping] order 2/2"]
    assert "rank [1, 2] after 1 request(s)" in lines[1] and "rank [1, 2] after 2 request(s)" in lines[3]
    assert {body["max_tokens"] for body in fake.requests} == {judge.PING_MAX_TOKENS}


def test_position_figures_are_null_when_nothing_was_measured(tmp_path, images, capsys):
    with HostileVLM("body", body=BODIES["not_json"]) as server:
        pairs, rubric_file = pair_file(tmp_path, images), tmp_path / "rubrics.txt"
        rubric_file.write_text("1. Redder.\n")
        assert judge.main(["eval", "--data", str(pairs), "--rubrics", str(rubric_file), "--base_url", server.url,
                           "--model", "m", "--max_retries", "0"]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["failure_rate"] == 1.0 and summary["accuracy"] == 0.0
    assert summary["accuracy_first"] is None and summary["accuracy_second"] is None
    assert summary["position_gap"] is None
    ((count, reason),) = summary["failure_reasons"]
    assert count == 2 and "HTTP 200 but the body is not JSON" in reason and "502 Bad Gateway" in reason


def test_a_malformed_answer_is_quoted_in_the_failure_reason(fake, tmp_path, images, capsys):
    fake.handler = lambda body: "I cannot decide between these two lovely pictures, sorry about that."
    rubric_file = tmp_path / "rubrics.txt"
    rubric_file.write_text("1. Redder.\n")
    assert judge.main(["eval", "--data", str(pair_file(tmp_path, images)), "--rubrics", str(rubric_file),
                       "--base_url", fake.url, "--model", "m"]) == 1
    ((count, reason),) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["failure_reasons"]
    assert count == 2 and "(first: 'I cannot decide between these two lovely" in reason


def test_an_answer_too_deep_for_the_parser_is_a_reply_error():
    with pytest.raises(ReplyError, match="no JSON object"):
        vlm_client.extract_json("[" * 100000 + "]" * 100000)
    assert vlm_client.extract_text(json.loads(answer("ok"))) == "ok"
