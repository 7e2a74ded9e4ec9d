"""scripts/serve.py: `transformers serve` with a BST, queried with the `openai` client on 127.0.0.1.

Skipped unless the serving extras are installed (`pip install -e ".[serve]"`: FastAPI/Uvicorn through
`transformers[serving]`, and `openai`). One server process for the module; completions are compared with greedy
`model.generate()` on the same folder.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import tiny_config

from modeling_bst import BSTForCausalLM


pytest.importorskip("fastapi", reason="serving extras not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="serving extras not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[serve]')")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "to be, or not"


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "bst"
    tokenizer = character_tokenizer()
    torch.manual_seed(0)
    model = BSTForCausalLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    port = free_port()
    environment = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, os.path.join(REPO_ROOT, "scripts", "serve.py"), str(folder)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log_path = folder.parent / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=folder.parent, env=environment, stdout=log, stderr=subprocess.STDOUT)
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
                pytest.fail(f"the server did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed", timeout=120)
        yield client, str(folder), model, tokenizer
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def greedy_completion(model, tokenizer, prompt, max_new_tokens):
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=1)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def test_completion_is_greedy_generate(server):
    client, folder, model, tokenizer = server
    response = client.completions.create(model=folder, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = greedy_completion(model, tokenizer, PROMPT, 12)
    assert len(expected) > 0
    assert response.choices[0].text == expected


def test_streamed_completion_matches(server):
    client, folder, model, tokenizer = server
    chunks = client.completions.create(model=folder, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len([piece for piece in pieces if piece]) > 1  # really streamed, piece by piece
    assert "".join(pieces) == greedy_completion(model, tokenizer, PROMPT, 12)
