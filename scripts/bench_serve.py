"""Load-test `jaxlora serve` on 127.0.0.1 (bounded in count and time): throughput, time to first token and time per
output token, at several client counts and at a steady arrival rate, against the same server at --max-batch 1 and,
where it runs offline, `transformers serve --continuous-batching` on the same weights; then a shared 300-token
system prompt with and without prefix reuse.

Every server is its own fresh process, started with --warmup (every program compiled before it serves; the
persistent compile cache makes later starts quicker) and warmed with a few requests before it is measured.
Requests are streamed chat completions (a user message of 20-400 tokens of text decoded from random token ids,
answers of 16-128 tokens, greedy), all arriving at once and taken by N concurrent clients, or arriving one every
1/RATE seconds each on its own connection. An answer may end early at an EOS: throughput counts the tokens served.

    python scripts/bench_serve.py [--checkpoint checkpoints/smollm2-135m-instruct] [--requests 64] [--rate 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, env=None, limit: float = 600) -> subprocess.Popen:
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{command[:3]} exited: {log.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{command[:3]} did not come up in {limit:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def one(port: int, model: str, messages: list[dict], max_tokens: int, timeout: float) -> dict:
    """One streamed chat completion: TTFT, per-token time after the first, tokens."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    start_time = time.perf_counter()
    first = None
    chunks, usage = 0, None
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            choices = data.get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content") and first is None:
                first = time.perf_counter() - start_time
            if (choices[0].get("delta") or {}).get("content"):
                chunks += 1
            if data.get("usage"):
                usage = data["usage"]["completion_tokens"]
    total = time.perf_counter() - start_time
    first = total if first is None else first
    tokens = chunks if usage is None else usage  # a server without stream usage: one token per chunk
    return {"ttft": first, "tpot": (total - first) / max(tokens - 1, 1), "tokens": tokens}


def text_of(tokenizer, rng, count: int) -> str:
    """About `count` tokens of text: random token ids decoded."""
    return tokenizer.decode(rng.integers(100, tokenizer.vocab_size, count).tolist(), skip_special_tokens=True)


def workload(tokenizer, n: int, seed: int, system: str | None = None) -> list[tuple[list[dict], int]]:
    """n (messages, max_tokens): a user message of 20-400 tokens and 16-128 new tokens, or after a shared system
    message a user message of 10-40 tokens and 32 new tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if system is None:
            user = text_of(tokenizer, rng, int(rng.integers(20, 401)))
            out.append(([{"role": "user", "content": user}], int(rng.integers(16, 129))))
        else:
            user = text_of(tokenizer, rng, int(rng.integers(10, 41)))
            out.append(([{"role": "system", "content": system}, {"role": "user", "content": user}], 32))
    return out


def load(port: int, model: str, jobs, clients: int, timeout: float, rate: float | None = None) -> dict:
    """Run the jobs with `clients` concurrent clients, or (rate) each on its own connection, one every 1/rate s."""
    start_time = time.perf_counter()
    if rate is None:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda job: one(port, model, job[0], job[1], timeout), jobs))
    else:

        def at(i, job):
            time.sleep(max(0.0, start_time + i / rate - time.perf_counter()))
            return one(port, model, job[0], job[1], timeout)

        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(at, range(len(jobs)), jobs))
    wall = time.perf_counter() - start_time
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tokens"] > 1]
    served = sum(r["tokens"] for r in results)

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "clients": f"{rate:g} req/s" if rate else clients,
        "requests": len(jobs),
        "tokens": served,
        "tok_s": served / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "tpot_p50": pct(tpot, 50),
        "tpot_p99": pct(tpot, 99),
        "wall": wall,
    }


def jaxlora_server(checkpoint: str, port: int, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "jaxlora", "serve", checkpoint, "--port", str(port), "--max-len", "1024"]
    return start(command + ["--warmup", *flags], port, limit=1200)


def warm(port: int, model: str, tokenizer) -> None:
    """A few requests of the workloads' lengths (programs the warm-up did not reach, the HTTP path)."""
    rng = np.random.default_rng(99)
    for length in (10, 40, 200, 400):
        one(port, model, [{"role": "user", "content": text_of(tokenizer, rng, length)}], 8, 600)


def run_side(name: str, port: int, model: str, tokenizer, args, clients_list, rate=None) -> list[dict]:
    warm(port, model, tokenizer)
    rows = []
    for clients in clients_list + ([None] if rate else []):
        jobs = workload(tokenizer, args.requests, seed=clients or 0)
        row = load(port, model, jobs, clients or 0, args.timeout, None if clients else rate)
        row["server"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "smollm2-135m-instruct"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second of the steady-rate rows (0: none)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per request at most")
    parser.add_argument("--skip", default="", help="comma-separated sides to skip: batch1, transformers, prefix")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    clients_list = [int(c) for c in args.clients.split(",")]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(args.checkpoint) / "tokenizer")
    print(f"cores: {os.cpu_count()}; {args.requests} requests per row; checkpoint {args.checkpoint}", flush=True)
    rows = []
    # --max-batch 1 and transformers serve: the most clients only (the targets compare there), and the rate.
    most = [max(clients_list)]
    sides = [(f"jaxlora --max-batch {args.max_batch}", ["--max-batch", str(args.max_batch)], clients_list)]
    if "batch1" not in skip:
        sides.append(("jaxlora --max-batch 1", ["--max-batch", "1"], most))
    for name, flags, clients in sides:
        port = free_port()
        proc = jaxlora_server(args.checkpoint, port, *flags)
        try:
            rows += run_side(name, port, "m", tokenizer, args, clients, args.rate)
        finally:
            stop(proc)
    if "transformers" not in skip:
        rows += transformers_side(args, tokenizer, most)
    if "prefix" not in skip:
        rows += prefix_rows(args, tokenizer)
    print("\n| server | clients | output tok/s | TTFT p50 / p99 (s) | time per output token p50 / p99 (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
            f"{1000 * r['tpot_p50']:.0f} / {1000 * r['tpot_p99']:.0f} |"
        )
    by = {(r["server"], r["clients"]): r for r in rows}
    ours = by.get((sides[0][0], max(clients_list)))
    for other in ("jaxlora --max-batch 1", "transformers serve --continuous-batching"):
        if ours and (other, max(clients_list)) in by:
            ratio = ours["tok_s"] / by[(other, max(clients_list))]["tok_s"]
            print(f"throughput at {max(clients_list)} clients: {ratio:.2f}x {other}")
    on, off = by.get(("shared 300-token prefix, reuse on", 4)), by.get(("shared 300-token prefix, reuse off", 4))
    if on and off:
        print(f"TTFT p50 with a shared prefix: {off['ttft_p50'] / on['ttft_p50']:.2f}x lower with reuse")


def prefix_rows(args, tokenizer) -> list[dict]:
    """16 requests at 4 clients sharing a 300-token system prompt, with and without prefix reuse."""
    system = text_of(tokenizer, np.random.default_rng(7), 300)
    rows = []
    for name, flags in [
        ("shared 300-token prefix, reuse on", []),
        ("shared 300-token prefix, reuse off", ["--no-prefix-cache"]),
    ]:
        port = free_port()
        proc = jaxlora_server(args.checkpoint, port, "--max-batch", str(args.max_batch), *flags)
        try:
            warm(port, "m", tokenizer)
            first = [{"role": "system", "content": system}, {"role": "user", "content": "Hello."}]
            one(port, "m", first, 4, 600)  # the shared blocks cached (or not)
            row = load(port, "m", workload(tokenizer, 16, seed=5, system=system), 4, args.timeout)
            row["server"] = name
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            stop(proc)
    return rows


def transformers_side(args, tokenizer, clients_list) -> list[dict]:
    """`transformers serve --continuous-batching` on the same weights (exported to an HF folder), or why not."""
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-hf-"))
    try:
        subprocess.run(
            [sys.executable, "-m", "jaxlora", "export", "hf", args.checkpoint, str(folder / "hf")],
            check=True,
            capture_output=True,
        )
        port = free_port()
        binary = Path(sys.executable).with_name("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        command = [str(binary), "serve", str(folder / "hf"), "--continuous-batching", "--port", str(port)]
        try:
            proc = start(command, port, env=env, limit=300)
        except RuntimeError as e:
            print(f"transformers serve did not run: {e}", flush=True)
            return []
        try:
            name = "transformers serve --continuous-batching"
            return run_side(name, port, str(folder / "hf"), tokenizer, args, clients_list, args.rate)
        except Exception as e:  # noqa: BLE001 (report why the comparison is missing, keep the other rows)
            print(f"transformers serve failed under load: {type(e).__name__}: {e}", flush=True)
            return []
        finally:
            stop(proc)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
