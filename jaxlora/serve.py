"""`jaxlora serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `jaxlora[serve]` extra) over the
continuous-batching engine (`jaxlora.engine`).

One thread owns the engine: HTTP handlers hand it commands (submit, cancel) through a queue and receive each
request's events on their own asyncio queue, so a slow client never holds the engine and the engine never waits
for a client. Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events, `[DONE]` last), GET /v1/models, GET /health. Bad requests get OpenAI-style error JSON with status 400; a
full queue 503 with Retry-After; a client that goes away mid-stream has its request cancelled at once.
"""

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from jaxlora.engine import TOP_LOGPROBS, Engine, Event, TokenLogprob
from jaxlora.errors import UsageError
from jaxlora.sampling import Sampling
from jaxlora.text import chat_ids

log = logging.getLogger("jaxlora.serve")

MAX_PROMPTS = 64  # prompts one completions request may carry (each with its own n choices)
MAX_STOPS = 16  # stop strings one request may give (OpenAI takes 4; lm-evaluation-harness may send more)
SAMPLING_FIELDS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
KNOWN_FIELDS = {
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "seed",
    "stop",
    "n",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "echo",
    *SAMPLING_FIELDS,
}


class BadRequest(Exception):
    """A request the server refuses with 400 (its message goes to the client)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Job:
    """One engine request as the server follows it."""

    engine_id: int = -1
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class EngineThread:
    """The engine behind a command queue, stepped by its own thread while there is work."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.commands: queue.Queue = queue.Queue()
        self.jobs: dict[int, tuple[Job, asyncio.AbstractEventLoop]] = {}
        self.thread = threading.Thread(target=self._run, name="jaxlora-engine", daemon=True)
        self.thread.start()

    def pending(self) -> int:
        return len(self.engine.waiting) + self.commands.qsize()

    def submit(self, job: Job, loop, prompt: list[int], max_tokens: int, **options) -> None:
        self.commands.put(("submit", job, loop, prompt, max_tokens, options))

    def cancel(self, job: Job) -> None:
        self.commands.put(("cancel", job))

    def prompt_logprobs(self, loop, prompt: list[int], k: int) -> asyncio.Future:
        """The prompt's own token log-probabilities (`Engine.prompt_logprobs`), computed on the engine's thread."""
        future = loop.create_future()
        self.commands.put(("score", future, loop, prompt, k))
        return future

    def _run(self) -> None:
        while True:
            try:
                self._turn()
            except Exception as e:  # noqa: BLE001 (a bug must not leave the engine dead: fail what was in flight)
                log.exception("engine step failed")
                for job, loop in self.jobs.values():
                    loop.call_soon_threadsafe(job.events.put_nowait, e)
                for engine_id in list(self.jobs):
                    self.engine.cancel(engine_id)
                self.jobs.clear()

    def _turn(self) -> None:
        """Take the queued commands (waiting for one when the engine is idle), then step once."""
        block = self.engine.idle
        try:
            while True:
                self._handle(self.commands.get(block=block))
                block = False
        except queue.Empty:
            pass
        if not self.engine.idle:
            for event in self.engine.step():
                job, loop = self.jobs[event.id]
                if event.finished:
                    del self.jobs[event.id]
                loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _handle(self, command) -> None:
        if command[0] == "score":
            _, future, loop, prompt, k = command
            try:
                result = self.engine.prompt_logprobs(prompt, k)
            except Exception as e:  # noqa: BLE001 (handed to the request, which answers for it)
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
            return
        if command[0] == "submit":
            _, job, loop, prompt, max_tokens, options = command
            try:
                job.engine_id = self.engine.submit(prompt, max_tokens, **options)
            except UsageError as e:  # checked before submitting; anything left is still the request's fault
                loop.call_soon_threadsafe(job.events.put_nowait, e)
                return
            self.jobs[job.engine_id] = (job, loop)
        else:
            job = command[1]
            if job.engine_id >= 0 and self.engine.cancel(job.engine_id):
                self.jobs.pop(job.engine_id, None)


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():  # the request may have gone away
        future.set_exception(error) if error is not None else future.set_result(result)


class TextTail:
    """A choice's text as its tokens arrive: new text once it is whole (no half UTF-8 character), cut at the first
    stop string (text that could still become one is held back)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, tokens: list[int], final: bool) -> str:
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped, final = text[:at], True, True
        if not final:
            if text.endswith("\ufffd"):
                return ""
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        new = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += new
        return new


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _number(body: dict, name: str, default, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    return kind(value)


def logprobs_wanted(body: dict, chat: bool) -> int | None:
    """How many alternatives a request wants with each token's log-probability, or None for no log-probs.
    Completions: `logprobs` is that count; chat: `logprobs` is a switch and `top_logprobs` the count."""
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise BadRequest(f"logprobs must be true or false for chat, got {wanted!r}", "logprobs")
        top = _number(body, "top_logprobs", 0, int)
        if top and not wanted:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        count = top if wanted else None
    else:
        if body.get("top_logprobs") is not None:
            raise BadRequest("top_logprobs is a chat field: completions take logprobs=N", "top_logprobs")
        count = _number(body, "logprobs", None, int)
    if count is not None and not 0 <= count <= TOP_LOGPROBS:
        raise BadRequest(f"the number of log-probs must be in 0..{TOP_LOGPROBS}, got {count}", "logprobs")
    return count


def parse_options(body: dict, prompt_len: int, context: int) -> tuple[int, int, dict, list[str]]:
    """(n, max_tokens, engine options, stop strings) from a request body, or BadRequest naming the field.
    max_tokens may be 0 only with `echo` (the prompt's log-probs alone)."""
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", unknown[0])
    for name in ("presence_penalty", "frequency_penalty"):  # accepted as 0 (clients send it), never ignored
        if _number(body, name, 0.0):
            raise BadRequest(f"{name} is not supported (use repetition_penalty)", name)
    n = _number(body, "n", 1, int)
    if not 1 <= n <= 16:
        raise BadRequest(f"n must be in 1..16, got {n}", "n")
    limit = context - prompt_len
    if limit < 1:
        raise BadRequest(f"the prompt ({prompt_len} tokens) leaves no room in the context of {context}", "messages")
    max_tokens = _number(body, "max_completion_tokens", None, int) or _number(body, "max_tokens", None, int)
    max_tokens = min(limit, 256) if max_tokens is None else max_tokens
    least = 0 if body.get("echo") else 1
    if not least <= max_tokens <= limit:
        raise BadRequest(f"max_tokens must be in {least}..{limit} for this prompt, got {max_tokens}", "max_tokens")
    values = {
        name: _number(body, name, default, int if name == "top_k" else float)
        for name, default in SAMPLING_FIELDS.items()
    }
    sampling = Sampling(**values)
    try:
        sampling.per_row(1)
    except UsageError as e:
        raise BadRequest(str(e)) from None
    seed = _number(body, "seed", 0, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
        raise BadRequest(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    return n, max_tokens, dict(sampling=sampling, seed=seed), stop


def create_app(engine: Engine, tokenizer, model_name: str, eos_token_ids=(), max_queue: int = 256):
    """The FastAPI app serving `engine` (its model's tokenizer for text in and out)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="jaxlora")
    runner = EngineThread(engine, max_queue)
    stop_ids = tuple(int(t) for t in eos_token_ids)
    context = engine.max_len

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc):
        return _error(400, f"invalid request: {exc.errors()[0].get('msg', 'bad input')}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": runner.pending()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "jaxlora"}]}

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def ids_of(prompt) -> list[int] | None:
        """One completions prompt (a string or token ids) -> token ids, or None if it is neither."""
        if isinstance(prompt, str) and prompt:
            return list(tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if min(prompt) < 0 or max(prompt) >= engine.config.vocab_size:
                raise BadRequest("token ids must be in the vocabulary", "prompt")
            return prompt
        return None

    def prompts_of(body: dict, chat: bool) -> list[list[int]]:
        """The request's prompts as token ids: chat has one; completions one or several (a list of strings or of
        token-id lists), each answered by its own n choices."""
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages must be a non-empty list", "messages")
            for m in messages:
                if (
                    not isinstance(m, dict)
                    or not isinstance(m.get("role"), str)
                    or not isinstance(m.get("content"), str)
                ):
                    raise BadRequest("each message needs a string role and a string content", "messages")
            try:
                return [chat_ids(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])]
            except UsageError as e:
                raise BadRequest(str(e), "messages") from None
        prompt = body.get("prompt")
        one = ids_of(prompt)
        if one is not None:
            return [one]
        if isinstance(prompt, list) and prompt and len(prompt) <= MAX_PROMPTS:
            several = [ids_of(p) for p in prompt]
            if all(ids is not None for ids in several):
                return several
        raise BadRequest(
            f"prompt must be a non-empty string, a list of token ids, or a list of up to {MAX_PROMPTS} of either",
            "prompt",
        )

    def piece(token: int) -> str:
        return tokenizer.decode([token])

    def completion_logprobs(entries: list[TokenLogprob | None], tokens: list[int], offset: int) -> dict:
        """OpenAI's completions `logprobs` object for tokens (their text starting at character `offset`)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(tokens, entries, strict=True):
            text = piece(token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            out["token_logprobs"].append(None if entry is None else entry.logprob)
            out["top_logprobs"].append(None if entry is None else {piece(t): lp for t, lp in entry.top})
        return out

    def chat_logprobs(entries: list[TokenLogprob], tokens: list[int]) -> dict:
        """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""

        def item(token, logprob):
            text = piece(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**item(token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                for token, e in zip(tokens, entries, strict=True)
            ]
        }

    async def handle(request: Request, chat: bool):
        started = time.perf_counter()
        try:
            body = await body_of(request)
            prompts = prompts_of(body, chat)
            top = logprobs_wanted(body, chat)
            echo = bool(body.get("echo"))
            if echo and (chat or body.get("stream")):
                raise BadRequest("echo is for completions that are not streamed", "echo")
            parsed = [parse_options(body, len(prompt), context) for prompt in prompts]
        except BadRequest as e:
            return _error(400, str(e), e.param)
        n, _, options, stop = parsed[0]
        max_tokens = min(m for _, m, _, _ in parsed)  # the same unless defaulted: then what every prompt allows
        if runner.pending() + n * len(prompts) > max_queue:
            return JSONResponse(
                {"error": {"message": "the server is busy", "type": "server_busy", "param": None, "code": None}},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        echoed: list = [None] * len(prompts)
        if echo:  # the prompts' own log-probs first (they need no slot)
            try:
                for p, prompt in enumerate(prompts):
                    echoed[p] = await runner.prompt_logprobs(loop, prompt, top or 0) if top is not None else None
            except UsageError as e:
                return _error(400, str(e))
        # Choice i answers prompt i // n.
        jobs = []
        if max_tokens:
            for prompt in prompts:
                for j in range(n):
                    job = Job()
                    choice_options = dict(options, seed=options["seed"] + j, logprobs=top)
                    runner.submit(job, loop, prompt, max_tokens, stop_token_ids=stop_ids, **choice_options)
                    jobs.append(job)
        count = n * len(prompts)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        tails = [TextTail(tokenizer, stop) for _ in range(count)]
        counts = [0] * count
        first_token = [None]

        def usage():
            completion = sum(counts)
            prompt_tokens = sum(len(p) for p in prompts)
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            }

        def log_done():
            elapsed = time.perf_counter() - started
            ttft = (first_token[0] or elapsed) * 1000
            log.info(
                "%s prompt=%d completion=%d ttft=%.0fms %.1f tok/s",
                rid,
                sum(len(p) for p in prompts),
                sum(counts),
                ttft,
                sum(counts) / max(elapsed, 1e-9),
            )

        async def events_of(i: int):
            """(new text, new tokens, their log-probs, finish reason or None) per engine event of choice i."""
            job, tail = jobs[i], tails[i]
            while True:
                event = await job.events.get()
                if isinstance(event, UsageError):
                    raise BadRequest(str(event))
                if isinstance(event, Exception):
                    raise RuntimeError(f"the engine failed: {event}")
                assert isinstance(event, Event)
                if first_token[0] is None:
                    first_token[0] = time.perf_counter() - started
                counts[i] += len(event.tokens)
                text = tail.add(event.tokens, event.finished)
                if tail.stopped and not event.finished:
                    runner.cancel(job)
                    yield text, event.tokens, event.logprobs, "stop"
                    return
                reason = None
                if event.finished:
                    reason = "stop" if event.finish_reason == "stop" or tail.stopped else "length"
                yield text, event.tokens, event.logprobs, reason
                if event.finished:
                    return

        def logprobs_of(tokens, entries, offset=0):
            if top is None:
                return None
            return chat_logprobs(entries, tokens) if chat else completion_logprobs(entries, tokens, offset)

        def choice_chunk(i: int, text: str, tokens, entries, reason):
            logprobs = logprobs_of(tokens, entries) if tokens else None
            if chat:
                delta = {"content": text} if text else {}
                return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}

        if not body.get("stream"):
            texts, reasons = [""] * count, [None] * count
            tokens, entries = [[] for _ in range(count)], [[] for _ in range(count)]
            try:
                for i in range(len(jobs)):
                    async for text, new, scores, reason in events_of(i):
                        texts[i] += text
                        tokens[i] += new
                        entries[i] += scores or []
                        reasons[i] = reason
            except BadRequest as e:
                return _error(400, str(e))
            finally:
                for job in jobs:
                    runner.cancel(job)
            log_done()
            choices = []
            for i in range(count):
                prompt, text = prompts[i // n], texts[i]
                logprobs = logprobs_of(tokens[i], entries[i])
                if chat:
                    message = {"role": "assistant", "content": text}
                    choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reasons[i]})
                    continue
                if echo:
                    prompt_text = tokenizer.decode(prompt)
                    if top is not None:
                        before = completion_logprobs(echoed[i // n], prompt, 0)
                        after = completion_logprobs(entries[i], tokens[i], len(prompt_text))
                        logprobs = {key: before[key] + after[key] for key in before}
                    text = prompt_text + text
                reason = reasons[i] or "length"  # max_tokens 0: the prompt alone
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
            return {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": usage(),
            }

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def sse(choices, with_usage=False):
            data = {"id": rid, "object": chunk_kind, "created": created, "model": model_name, "choices": choices}
            if with_usage:
                data["usage"] = usage()
            return f"data: {json.dumps(data)}\n\n"

        async def stream():
            merged: asyncio.Queue = asyncio.Queue()

            async def pump(i):
                try:
                    async for text, new, scores, reason in events_of(i):
                        await merged.put((i, text, new, scores, reason))
                except BadRequest as e:
                    await merged.put((i, e, [], None, "error"))

            tasks = [asyncio.create_task(pump(i)) for i in range(len(jobs))]
            try:
                if chat:
                    yield sse(
                        [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            for i in range(count)
                        ]
                    )
                open_choices = len(jobs)
                while open_choices:
                    i, text, new, scores, reason = await merged.get()
                    if reason == "error":
                        error = {"error": {"message": str(text), "type": "invalid_request_error"}}
                        yield f"data: {json.dumps(error)}\n\n"
                        break
                    if text or reason or (top is not None and new):
                        yield sse([choice_chunk(i, text, new, scores, reason)])
                    if reason:
                        open_choices -= 1
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield sse([], with_usage=True)
                yield "data: [DONE]\n\n"
                log_done()
            finally:  # the client went away or everything ended: nothing keeps a slot
                for task in tasks:
                    task.cancel()
                for job in jobs:
                    runner.cancel(job)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    app.state.runner = runner
    return app


def serve(
    model,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_len: int | None = None,
    max_queue: int = 256,
    block_size: int = 16,
    name: str | None = None,
    prefix_cache: bool = True,
    warmup: bool = False,
) -> None:
    """Serve a loaded `jaxlora.Model` until SIGTERM/Ctrl-C (in-flight requests drain first). warmup: compile
    every engine program before taking requests (`Engine.warmup`), so none compiles mid-serving."""
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serving needs FastAPI and uvicorn: pip install 'jaxlora[serve]'") from None
    if model.tokenizer is None:
        raise UsageError(f"{model.path} has no tokenizer: the server speaks text")
    engine = Engine(
        model.params,
        model.config,
        max_batch=max_batch,
        max_len=max_len,
        block_size=block_size,
        prefix_cache=prefix_cache,
    )
    if not log.handlers:  # one line per request on stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if warmup:
        started = time.perf_counter()
        count = engine.warmup()
        log.info("warm-up: %d programs in %.1f s", count, time.perf_counter() - started)
    app = create_app(engine, model.tokenizer, name or model.path.name, model.eos_token_ids, max_queue)
    uvicorn.run(app, host=host, port=port, log_level="warning")
