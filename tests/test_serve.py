"""scripts/serve.py: `transformers serve` with a BST, queried with the `openai` client on 127.0.0.1.

Skipped unless the serving extras are installed (`pip install -e ".[serve]"`: FastAPI/Uvicorn through
`transformers[serving]`, and `openai`). One server process for the module; completions are compared with greedy
`model.generate()` on the same folder.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_config

from modeling_bst import BSTForCausalLM


pytest.importorskip("fastapi", reason="serving extras not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="serving extras not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[serve]')")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "to be, or not"
TRAINING_LENGTH = 8
DEFAULT_LIMIT = 4 * TRAINING_LENGTH  # scripts/serve.py's default maximum of new tokens: 4x the training length
LONG_LIMIT = 10**8
REQUEST_TIMEOUT = 8


def character_tokenizer():
    """One token per character and a decoder that fuses them back: decoded text never splits a character, so a
    streamed completion can be compared with a non-streamed one exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = "abcdefghijklmnopqrstuvwxyz .,"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_model(folder, training_length):
    """A tiny BST and the character tokenizer in `folder`. No end-of-sequence token in the generation config, so
    that a request generates exactly as many tokens as it may."""
    tokenizer = character_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=None, training_length=training_length)
    model = BSTForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@contextmanager
def running_server(folder, *options):
    """scripts/serve.py on a free port of 127.0.0.1, on a machine without a Hub cache; yields (port, process, path of
    its log)."""
    port = free_port()
    hub_cache = os.path.join(os.path.dirname(folder), "no-hub-cache")
    environment = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub_cache}
    command = [sys.executable, os.path.join(REPO_ROOT, "scripts", "serve.py"), str(folder), *options]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log_path = f"{folder}-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=os.path.dirname(folder), env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as log:
                    pytest.fail(f"the server did not come up:\n{log.read()[-4000:]}")
            time.sleep(0.5)
        yield port, process, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(port, path, body, timeout=60):
    """POSTs `body` as JSON; returns (HTTP status, decoded JSON answer). Raises TimeoutError past `timeout`, after
    closing the connection as a client that gives up does."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "bst"
    model, tokenizer = save_model(folder, TRAINING_LENGTH)
    return str(folder), model, tokenizer


@pytest.fixture(scope="module")
def server(served_folder):
    """The launcher with its default options."""
    folder, model, tokenizer = served_folder
    with running_server(folder) as (port, _, log_path):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed", timeout=120, max_retries=0)
        yield client, folder, model, tokenizer, port, log_path


@pytest.fixture(scope="module")
def long_request_server(served_folder):
    """The launcher with a maximum of new tokens no test reaches and a short request timeout."""
    folder, _, _ = served_folder
    options = ("--max-new-tokens", str(LONG_LIMIT), "--request-timeout", str(REQUEST_TIMEOUT), "--decode-threads", "2")
    with running_server(folder, *options) as (port, _, log_path):
        yield folder, port, log_path


def greedy_completion(model, tokenizer, prompt, max_new_tokens):
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def test_completion_is_greedy_generate(server):
    client, folder, model, tokenizer, *_ = server
    response = client.completions.create(model=folder, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = greedy_completion(model, tokenizer, PROMPT, 12)
    assert len(expected) > 0
    assert response.choices[0].text == expected


def test_streamed_completion_matches(server):
    client, folder, model, tokenizer, *_ = server
    chunks = client.completions.create(model=folder, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len([piece for piece in pieces if piece]) > 1  # really streamed, piece by piece
    assert "".join(pieces) == greedy_completion(model, tokenizer, PROMPT, 12)


def test_max_tokens_above_the_limit_is_refused_with_the_limit(server):
    *_, port, _ = server
    for max_tokens in (DEFAULT_LIMIT + 1, 10**9):
        status, answer = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": max_tokens})
        assert status == 400
        assert f"at most {DEFAULT_LIMIT} per request" in answer["detail"]
        assert "--max-new-tokens" in answer["detail"]
    status, answer = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": DEFAULT_LIMIT})
    assert status == 200
    assert answer["usage"]["completion_tokens"] == DEFAULT_LIMIT


def test_request_naming_no_length_stops_at_the_limit(server):
    *_, port, _ = server
    status, answer = post(port, "/v1/completions", {"prompt": PROMPT})  # transformers serve's own default: 1024
    assert status == 200
    assert answer["usage"]["completion_tokens"] == DEFAULT_LIMIT
    assert answer["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"prompt": ""}, "prompt is missing or empty"),
        ({}, "prompt is missing or empty"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
        ({"prompt": PROMPT, "max_tokens": -3}, "max_tokens must be a positive integer, got -3"),
        ({"prompt": PROMPT, "n": 3}, "n=3: this server returns one choice per request"),
        ({"prompt": PROMPT, "temperature": -1}, "temperature must be a number >= 0"),
    ],
)
def test_invalid_request_gets_a_400_with_the_reason(server, fields, reason):
    _, folder, *_, port, _ = server
    status, answer = post(port, "/v1/completions", {"model": folder, **fields})
    assert status == 400
    assert reason in answer["detail"]


def test_generate_errors_reach_the_client_as_400(server):
    """An error generate() raises about its input comes back with its message, not as a bare 500."""
    *_, port, _ = server
    status, answer = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "frequency_penalty": -2})
    assert status == 400
    assert answer["detail"] == "`penalty` has to be a strictly positive float, but is -1.0"


def test_chat_without_a_chat_template_points_to_completions(server):
    client, folder, *_ = server
    with pytest.raises(openai.BadRequestError) as refusal:
        client.chat.completions.create(model=folder, messages=[{"role": "user", "content": PROMPT}], max_tokens=4)
    assert refusal.value.status_code == 400
    assert refusal.value.response.json()["detail"] == (
        f"{folder} has no chat template (it was not trained for chat): send a plain prompt to /v1/completions instead."
    )


def test_models_lists_the_served_folder_without_a_hub_cache(server):
    client, folder, *_ = server
    assert [model.id for model in client.models.list()] == [folder]


def test_max_new_tokens_option_sets_the_limit(long_request_server):
    _, port, _ = long_request_server
    status, answer = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": LONG_LIMIT + 1})
    assert status == 400
    assert f"at most {LONG_LIMIT} per request" in answer["detail"]
    status, answer = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": DEFAULT_LIMIT + 5})
    assert status == 200
    assert answer["usage"]["completion_tokens"] == DEFAULT_LIMIT + 5


def test_client_that_gives_up_frees_the_server(long_request_server):
    """A client that leaves stops its generation: the next request is answered at once, not after 10**8 tokens."""
    _, port, _ = long_request_server
    with pytest.raises(TimeoutError):
        post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": LONG_LIMIT}, timeout=1)
    started = time.monotonic()
    status, answer = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4}, timeout=REQUEST_TIMEOUT - 1)
    assert status == 200
    assert answer["usage"]["completion_tokens"] == 4
    assert time.monotonic() - started < REQUEST_TIMEOUT - 1


def test_request_past_the_timeout_gets_a_504(long_request_server):
    _, port, _ = long_request_server
    started = time.monotonic()
    status, answer = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": LONG_LIMIT}, timeout=60)
    assert status == 504
    assert f"request timeout of {REQUEST_TIMEOUT} s" in answer["detail"]
    assert REQUEST_TIMEOUT <= time.monotonic() - started < REQUEST_TIMEOUT + 30


def test_sigterm_stops_a_generation_in_flight(tmp_path):
    """SIGTERM while a streamed request generates (its client still reading): the server ends the generation and
    exits, instead of waiting for the request to finish."""
    folder = str(tmp_path / "bst")
    save_model(folder, training_length=LONG_LIMIT)  # default maximum of new tokens: 4 x 10**8
    with running_server(folder) as (port, process, _):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"prompt": PROMPT, "max_tokens": LONG_LIMIT, "stream": True}
        connection.request(
            "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # generating
        reader = threading.Thread(target=response.read, daemon=True)  # a client that keeps reading
        reader.start()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not exit within 20 s of SIGTERM")
        connection.close()


def test_decoding_threads(server, long_request_server):
    """One CPU thread unless --decode-threads says otherwise (docs/serving.md: 2 threads decode several times slower
    on a busy 2-core machine)."""
    *_, default_log = server
    *_, two_threads_log = long_request_server
    with open(default_log) as log:
        assert "torch computes on 1 CPU thread(s)" in log.read()
    with open(two_threads_log) as log:
        assert "torch computes on 2 CPU thread(s)" in log.read()
