#!/usr/bin/env python
"""Samples a person can read: a BST folder generating through `pipeline("text-generation")` and through
scripts/serve.py, greedy and sampled, from a prompt of a few words and from a long real document.

Prompts (each plain and, when the tokenizer has a chat template, as a chat):
- `short`: `--short_prompt` (plain) and `--short_question` (chat);
- `long`: a section of the Python Language Reference that ships with CPython (`pydoc_data.topics`, `--long_topic`),
  cut at the last paragraph that ends before `--long_prompt_tokens` tokens, then a question about its last section.
  Real English technical text, offline on every machine.

Greedy (`do_sample=False`) and sampled (`--temperature`, `--top_p`, `torch.manual_seed(--seed)` before each call).
Then one greedy chat request to scripts/serve.py (`/v1/chat/completions`) with the short question, started on a free
port of 127.0.0.1 and stopped afterwards.

    PYTHONPATH=$PWD python scripts/experiments/generation_samples.py --model /work/cache/smollm2-bst-w1024-prev-sinks \\
        --output docs/results/smollm2_w1024_sinks_samples.json

Writes the samples (prompt head and tail, settings, output, seconds) to `--output` and prints them as markdown.
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import pipeline

import modeling_bst  # noqa: F401  (registers the "bst" model type)


REPO_ROOT = Path(__file__).resolve().parent.parent.parent
LONG_QUESTION = "What does the last section of the document above describe? Answer in two sentences."


def long_document(tokenizer, topic: str, max_tokens: int) -> str:
    """The Language Reference section `topic`, cut after the last paragraph that ends within `max_tokens` tokens."""
    from pydoc_data.topics import topics

    if topic not in topics:
        raise ValueError(f"--long_topic {topic!r} is not a pydoc_data topic; the longest are 'compound', 'types'.")
    paragraphs = topics[topic].split("\n\n")
    kept, count = [], 0
    for paragraph in paragraphs:
        count += len(tokenizer("\n\n" + paragraph, add_special_tokens=False).input_ids)
        if count > max_tokens:
            break
        kept.append(paragraph)
    if count <= max_tokens:
        raise ValueError(f"--long_topic {topic!r} has fewer than {max_tokens} tokens; pick a longer one or ask fewer.")
    return "\n\n".join(kept)


def generation_settings(mode: str, args) -> dict:
    if mode == "greedy":
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}


def run_pipeline(generator, prompt, mode: str, max_new_tokens: int, args) -> dict:
    """One pipeline call; `prompt` is a string or a list of chat messages."""
    settings = generation_settings(mode, args)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    output = generator(prompt, max_new_tokens=max_new_tokens, return_full_text=False, **settings)
    seconds = time.perf_counter() - started
    generated = output[0]["generated_text"]
    if isinstance(generated, list):  # a chat: the new assistant message
        generated = generated[-1]["content"]
    return {"mode": mode, "settings": {**settings, "max_new_tokens": max_new_tokens, "seed": args.seed},
            "output": generated, "seconds": round(seconds, 1)}


def prompt_record(tokenizer, prompt) -> dict:
    """The prompt as shown in the results: whole when short, its first and last 300 characters when long."""
    text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                                add_generation_prompt=True)
    tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    if len(text) <= 800:
        return {"prompt": text, "prompt_tokens": tokens}
    return {"prompt_head": text[:300], "prompt_tail": text[-300:], "prompt_tokens": tokens}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def served_chat_sample(model: str, question: str, max_tokens: int) -> dict:
    """Starts scripts/serve.py with `model` on a free local port, sends one greedy chat request, stops the server."""
    port = free_port()
    command = [sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), model, "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu"]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not port_answers(port, "/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"scripts/serve.py did not come up:\n{server.stderr.read()[-3000:]}")
            time.sleep(1)
        body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "temperature": 0}
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"scripts/serve.py answered {response.status}: {answer}")
        return {"endpoint": "/v1/chat/completions", "request": body, "output": answer["choices"][0]["message"]["content"],
                "finish_reason": answer["choices"][0].get("finish_reason"),
                "seconds": round(time.perf_counter() - started, 1)}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def port_answers(port: int, path: str) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False


def markdown(results: dict) -> str:
    lines = []
    for sample in results["samples"]:
        shown = sample.get("prompt") or f"{sample['prompt_head']} [...] {sample['prompt_tail']}"
        lines += [f"**{sample['name']}, {sample['mode']}** ({sample['prompt_tokens']:,} prompt tokens, "
                  f"{sample['seconds']} s)", "", "```text", shown.strip(), "```", "", "Output:", "", "```text",
                  sample["output"].strip(), "```", ""]
    if results.get("served"):
        served = results["served"]
        lines += [f"**scripts/serve.py, {served['endpoint']}, temperature 0** ({served['seconds']} s)", "", "```text",
                  served["request"]["messages"][0]["content"], "```", "", "Output:", "", "```text",
                  served["output"].strip(), "```", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", required=True, help="The model folder.")
    add("--short_prompt", default="The capital of France is")
    add("--short_question", default="Write three sentences about the sea.")
    add("--long_topic", default="compound", help="pydoc_data topic of the long prompt.")
    add("--long_prompt_tokens", type=int, default=10000, help="Most tokens of the long document.")
    add("--short_new_tokens", type=int, default=60)
    add("--long_new_tokens", type=int, default=60)
    add("--temperature", type=float, default=0.7)
    add("--top_p", type=float, default=0.9)
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1,
        help="torch CPU threads (a decoding step is many small operations; docs/serving.md measures 1 as best).")
    add("--skip_long", action="store_true", help="Only the short prompts.")
    add("--skip_serve", action="store_true", help="No request through scripts/serve.py.")
    add("--output", required=True, help="JSON file to write.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = pipeline("text-generation", model=args.model, dtype=torch.float32)
    tokenizer = generator.tokenizer
    has_chat = tokenizer.chat_template is not None
    prompts = [("short, plain", args.short_prompt, args.short_new_tokens)]
    if has_chat:
        prompts.append(("short, chat", [{"role": "user", "content": args.short_question}], args.short_new_tokens))
    if not args.skip_long:
        document = long_document(tokenizer, args.long_topic, args.long_prompt_tokens)
        prompts.append(("long, plain", f"{document}\n\nQuestion: {LONG_QUESTION}\nAnswer:", args.long_new_tokens))
        if has_chat:
            prompts.append(("long, chat", [{"role": "user", "content": f"{document}\n\n{LONG_QUESTION}"}],
                            args.long_new_tokens))
    samples = []
    for name, prompt, new_tokens in prompts:
        for mode in ("greedy", "sampled"):
            sample = {"name": name, **prompt_record(tokenizer, prompt)}
            sample.update(run_pipeline(generator, prompt, mode, new_tokens, args))
            print(f"[{name}, {mode}, {sample['seconds']} s] {sample['output']!r}", flush=True)
            samples.append(sample)
    results = {
        "command": "python scripts/experiments/generation_samples.py " + " ".join(argv or sys.argv[1:]),
        "model": str(args.model),
        "long_document": None if args.skip_long else f"pydoc_data.topics[{args.long_topic!r}] (CPython "
        f"{sys.version.split()[0]}), cut to at most {args.long_prompt_tokens} tokens at a paragraph end",
        "samples": samples,
    }
    if has_chat and not args.skip_serve:
        results["served"] = served_chat_sample(args.model, args.short_question, args.short_new_tokens)
        print(f"[served] {results['served']['output']!r}", flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
