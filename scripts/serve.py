#!/usr/bin/env python
"""Serve a BST model with `transformers serve`: OpenAI-compatible `/v1/completions` and `/v1/chat/completions`.

`transformers serve` (5.23) instantiates a model as `getattr(transformers, config.architectures[0])`, so a class that
lives outside Transformers fails there ("module 'transformers' has no attribute 'BSTForCausalLM'"), even with
`--trust-remote-code`. This launcher imports `modeling_bst` (which registers BST with the Auto classes), makes its
classes attributes of the `transformers` module in this process only, and then runs the unchanged `transformers
serve` command with the arguments it was given:

    python scripts/serve.py runs/quickstart --host 127.0.0.1 --port 8000
    python scripts/serve.py --help          # this launcher's options, then every option of `transformers serve`

It adds what a server open to more than one client needs and `transformers serve` leaves out (docs/serving.md):
a maximum of new tokens per request (`--max-new-tokens`), generation that stops when its client disconnects, when the
request runs past `--request-timeout` or when the server is asked to stop (SIGTERM, Ctrl-C), requests that
`generate()` would fail on answered with a 400 and the reason (not a bare 500), chat requests to a model without a
chat template answered with a 400 pointing to `/v1/completions`, `/v1/models` listing the served model on a machine
without a Hub cache, and the number of CPU threads decoding uses (`--decode-threads`).

The model argument is a folder (or Hub id) saved by scripts/train.py or `save_pretrained`; requests name it as their
`model`. Needs `pip install -e ".[serve]"` (FastAPI and Uvicorn through `transformers[serving]`, and the `openai`
client for docs/serving.md's examples).
"""

import argparse
import asyncio
import contextvars
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import transformers
from transformers import StoppingCriteria, StoppingCriteriaList

try:
    import modeling_bst
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import modeling_bst


# Without --max-new-tokens a request may ask for this many times the length the model was trained at (past it, the
# quality is unmeasured: docs/evaluation.md measures up to 16x); a config that records no training length gets
# FALLBACK_MAX_NEW_TOKENS.
TRAINING_LENGTHS_PER_REQUEST = 4
FALLBACK_MAX_NEW_TOKENS = 4096
# Request fields that set the number of new tokens, by endpoint: completions, chat completions, responses.
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def server_options_parser():
    parser = argparse.ArgumentParser(
        prog="scripts/serve.py",
        add_help=False,
        description="Options of this launcher; every other argument goes to `transformers serve` (listed below).",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"Most new tokens one request may ask for; a request asking for more gets a 400 that names the limit, "
        f"one that names no length gets at most this many. Default: {TRAINING_LENGTHS_PER_REQUEST}x the model's "
        f"training_length (config.json), or {FALLBACK_MAX_NEW_TOKENS} when the config records none.",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="Seconds after which a request's generation stops (counted from its arrival): a non-streamed request "
        "then gets a 504, a streamed one ends where it is. Default: 300.",
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=1,
        help="CPU threads of torch (torch.set_num_threads) for the whole server. Default 1: a decoding step is many "
        "small operations, and a second thread that waits for a busy core costs more than it saves "
        "(docs/serving.md has the measurement).",
    )
    return parser


def parse_server_options(argv):
    """Splits the command line into this launcher's options and the arguments for `transformers serve`."""
    parser = server_options_parser()
    options, serve_arguments = parser.parse_known_args(argv)
    if options.max_new_tokens is not None and options.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {options.max_new_tokens}.")
    if options.request_timeout <= 0:
        parser.error(f"--request-timeout must be positive, got {options.request_timeout}.")
    if options.decode_threads < 1:
        parser.error(f"--decode-threads must be at least 1, got {options.decode_threads}.")
    if "--help" in argv:
        parser.print_help()
        print()
    return options, serve_arguments


def attach_bst_to_transformers():
    """Make the BST classes attributes of the `transformers` module the server looks them up in. Importing the
    command line replaces `sys.modules["transformers"]` with a fresh module object, so this runs after that import
    and sets them on every module object the server may hold."""
    import transformers.cli.serving.model_manager as model_manager

    for module in {id(m): m for m in (sys.modules["transformers"], model_manager.transformers, transformers)}.values():
        for name in ("BSTConfig", "BSTModel", "BSTForCausalLM"):
            if name not in vars(module):
                setattr(module, name, getattr(modeling_bst, name))


@dataclass
class RequestState:
    """What generation needs to know about the HTTP request it serves. `client_gone` is set from the event loop and
    read by the inference thread."""

    arrival: float = field(default_factory=time.monotonic)
    client_gone: threading.Event = field(default_factory=threading.Event)
    names_length: bool = False


CURRENT_REQUEST = contextvars.ContextVar("CURRENT_REQUEST")
SHUTTING_DOWN = threading.Event()


class WatchForDisconnect:
    """ASGI middleware: gives every request a `RequestState` and sets its `client_gone` when the client disconnects.
    Uvicorn only notices a closed connection while someone waits on `receive()`, which nothing does while a
    non-streamed request generates; so once the request body has been read, a task waits there."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = RequestState()
        CURRENT_REQUEST.set(request)
        body_read = asyncio.Event()

        async def receive_and_note_the_end_of_the_body():
            message = await receive()
            if message["type"] == "http.disconnect":
                request.client_gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def wait_for_disconnect():
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            request.client_gone.set()

        watcher = asyncio.create_task(wait_for_disconnect())
        try:
            await self.app(scope, receive_and_note_the_end_of_the_body, send)
        finally:
            watcher.cancel()


class StopWhenRequestEnds(StoppingCriteria):
    """Ends `generate()` once the client has gone, the request has run past its deadline, or the server stops."""

    def __init__(self, request, deadline):
        self.request = request
        self.deadline = deadline
        self.timed_out = False

    def __call__(self, input_ids, scores, **kwargs):
        self.timed_out = time.monotonic() > self.deadline
        stop = self.timed_out or self.request.client_gone.is_set() or SHUTTING_DOWN.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def max_new_tokens_limit(model, options):
    if options.max_new_tokens is not None:
        return options.max_new_tokens
    training_length = getattr(model.config, "training_length", None)
    return TRAINING_LENGTHS_PER_REQUEST * training_length if training_length else FALLBACK_MAX_NEW_TOKENS


def refuse_invalid_fields(handler, body):
    """The request fields `transformers serve` passes on unchecked, and generate() would fail on (a 500) or ignore."""
    from fastapi import HTTPException
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler

    for name in LENGTH_FIELDS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HTTPException(status_code=400, detail=f"{name} must be a positive integer, got {value!r}.")
    if body.get("n") not in (None, 1):
        raise HTTPException(
            status_code=400,
            detail=f"n={body['n']!r}: this server returns one choice per request; send {body['n']!r} requests "
            "instead (with a different seed each for different samples).",
        )
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
        raise HTTPException(
            status_code=400, detail=f"temperature must be a number >= 0 (0: greedy decoding), got {temperature!r}."
        )
    if isinstance(handler, CompletionHandler) and body.get("prompt") in (None, ""):
        raise HTTPException(
            status_code=400, detail="prompt is missing or empty: /v1/completions continues a non-empty `prompt`."
        )
    if isinstance(handler, ChatCompletionHandler) and not body.get("messages"):
        raise HTTPException(
            status_code=400, detail="messages is missing or empty: /v1/chat/completions answers a list of messages."
        )
    CURRENT_REQUEST.get().names_length = any(body.get(name) is not None for name in LENGTH_FIELDS) or (
        body.get("generation_config") is not None
    )


def limit_generation(model, inputs, generation_config, options):
    """Applies the server's maximum of new tokens to `generation_config` (a 400 when the request asked for more) and
    returns `inputs` with the stopping criterion that ends generation with its request."""
    from fastapi import HTTPException

    request = CURRENT_REQUEST.get()
    limit = max_new_tokens_limit(model, options)
    if generation_config.max_new_tokens is None:  # a `generation_config` field that sets max_length instead
        generation_config.max_length = min(generation_config.max_length, inputs["input_ids"].shape[-1] + limit)
    elif generation_config.max_new_tokens > limit:
        if request.names_length:
            raise HTTPException(
                status_code=400,
                detail=f"{generation_config.max_new_tokens} new tokens asked for; this server generates at most "
                f"{limit} per request (scripts/serve.py --max-new-tokens).",
            )
        generation_config.max_new_tokens = limit
    stop = StopWhenRequestEnds(request, deadline=request.arrival + options.request_timeout)
    return {**inputs, "stopping_criteria": StoppingCriteriaList([stop])}, stop


def guard_requests(options):
    """Hooks the checks above into the unchanged `transformers serve`: request validation, the model resolution of
    the chat endpoints, the two generation entry points, the model list, the app (disconnects) and uvicorn's signal
    handler (shutdown)."""
    import uvicorn
    from fastapi import HTTPException
    from huggingface_hub.errors import CacheNotFound
    from transformers.cli.serving import server
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.utils import BaseHandler, GenerateManager

    validate_request = BaseHandler._validate_request

    def validate_request_and_our_fields(self, body):
        validate_request(self, body)
        refuse_invalid_fields(self, body)

    BaseHandler._validate_request = validate_request_and_our_fields

    resolve_model = BaseHandler._resolve_model

    def resolve_model_with_chat_template(self, body):
        model_id, model, processor = resolve_model(self, body)
        if getattr(processor, "chat_template", None) is None:
            raise HTTPException(
                status_code=400,
                detail=f"{body['model']} has no chat template (it was not trained for chat): send a plain prompt to "
                "/v1/completions instead.",
            )
        return model_id, model, processor

    ChatCompletionHandler._resolve_model = resolve_model_with_chat_template
    ResponseHandler._resolve_model = resolve_model_with_chat_template

    generate_streaming = GenerateManager.generate_streaming
    generate_non_streaming = GenerateManager.generate_non_streaming

    def limited_generate_streaming(self, model, processor, inputs, generation_config, *args, **kwargs):
        inputs, _ = limit_generation(model, inputs, generation_config, options)
        return generate_streaming(self, model, processor, inputs, generation_config, *args, **kwargs)

    async def limited_generate_non_streaming(self, model, processor, inputs, generation_config, *args, **kwargs):
        inputs, stop = limit_generation(model, inputs, generation_config, options)
        try:
            result = await generate_non_streaming(self, model, processor, inputs, generation_config, *args, **kwargs)
        except ValueError as error:  # the model's and generate()'s errors about their input
            raise HTTPException(status_code=400, detail=str(error)) from error
        if stop.timed_out:
            raise HTTPException(
                status_code=504,
                detail=f"generation ran past this server's request timeout of {options.request_timeout:g} s "
                "(scripts/serve.py --request-timeout); ask for fewer tokens.",
            )
        return result

    GenerateManager.generate_streaming = limited_generate_streaming
    GenerateManager.generate_non_streaming = limited_generate_non_streaming

    list_cached_models = ModelManager.get_gen_models

    def served_and_cached_models(self, cache_dir=None):
        """The loaded models (the one given on the command line first), then those of the Hub cache, if there is
        one: `transformers serve` lists only the latter and fails (CacheNotFound) where there is none."""
        models = []
        for key in self.loaded_models:
            name = key.removesuffix("@main")
            created = int(os.path.getmtime(name)) if os.path.exists(name) else 0
            models.append({"id": name, "object": "model", "created": created, "owned_by": "local"})
        try:
            cached = list_cached_models(cache_dir)
        except CacheNotFound:
            cached = []
        return models + [entry for entry in cached if entry["id"] not in {model["id"] for model in models}]

    ModelManager.get_gen_models = served_and_cached_models

    build_server = server.build_server

    def build_server_watching_for_disconnects(*args, **kwargs):
        app = build_server(*args, **kwargs)
        app.add_middleware(WatchForDisconnect)
        return app

    server.build_server = build_server_watching_for_disconnects

    handle_exit = uvicorn.Server.handle_exit

    def stop_generation_and_exit(self, sig, frame):
        # Uvicorn waits for the requests in flight before it exits: end their generation first.
        SHUTTING_DOWN.set()
        handle_exit(self, sig, frame)

    uvicorn.Server.handle_exit = stop_generation_and_exit


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    options, serve_arguments = parse_server_options(argv)
    torch.set_num_threads(options.decode_threads)
    print(f"scripts/serve.py: torch computes on {torch.get_num_threads()} CPU thread(s) (--decode-threads)", flush=True)
    # The `transformers` command line itself, minus its update check (a network call), with `serve` as the command.
    from transformers.cli.transformers import app

    attach_bst_to_transformers()
    guard_requests(options)
    app(args=["serve", *serve_arguments], prog_name="transformers")


if __name__ == "__main__":
    main()
