"""Load-test `jaxlora serve` on 127.0.0.1 (bounded in count and time): throughput, time to first token and time per
output token, at several client counts, against the same server at --max-batch 1 and, where it runs offline,
`transformers serve --continuous-batching` on the same weights; then a shared 300-token system prompt with and
without prefix reuse.

Every server is its own fresh process; each is warmed up (its programs compiled) before it is measured. Requests
are streamed completions over token-id prompts (20-400 tokens, answers of 16-128 tokens, greedy), all arriving at
once and taken by N concurrent clients. An answer may end early at an EOS: throughput counts the tokens served.

    python scripts/bench_serve.py [--checkpoint checkpoints/smollm2-135m-instruct] [--requests 64]
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


def one(port: int, model: str, prompt, max_tokens: int, timeout: float) -> dict:
    """One streamed completion: TTFT, per-token time after the first, tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    start_time = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0].get("text") and first is None:
                first = time.perf_counter() - start_time
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    total = time.perf_counter() - start_time
    first = total if first is None else first
    return {"ttft": first, "tpot": (total - first) / max(tokens - 1, 1), "tokens": tokens}


def workload(n: int, vocab: int, seed: int, system: list[int] | None = None) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if system is None:
            prompt = rng.integers(100, vocab, int(rng.integers(20, 401))).tolist()
            out.append((prompt, int(rng.integers(16, 129))))
        else:
            out.append((system + rng.integers(100, vocab, int(rng.integers(10, 40))).tolist(), 32))
    return out


def load(port: int, model: str, jobs, clients: int, timeout: float) -> dict:
    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda job: one(port, model, job[0], job[1], timeout), jobs))
    wall = time.perf_counter() - start_time
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tokens"] > 1]
    served = sum(r["tokens"] for r in results)

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "clients": clients,
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
    command = [sys.executable, "-m", "jaxlora", "serve", checkpoint, "--port", str(port), "--max-len", "1024", *flags]
    return start(command, port)


def warm(port: int, model: str, vocab: int) -> None:
    """Compile every prompt bucket the workloads reach, and the decode chunk."""
    rng = np.random.default_rng(99)
    for length in (10, 20, 40, 100, 200, 400):
        one(port, model, rng.integers(100, vocab, length).tolist(), 8, 600)


def run_side(name: str, port: int, model: str, vocab: int, args, clients_list) -> list[dict]:
    warm(port, model, vocab)
    rows = []
    for clients in clients_list:
        row = load(port, model, workload(args.requests, vocab, seed=clients), clients, args.timeout)
        row["server"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "smollm2-135m-instruct"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per request at most")
    parser.add_argument("--skip", default="", help="comma-separated sides to skip: batch1, transformers, prefix")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    clients_list = [int(c) for c in args.clients.split(",")]
    config = json.loads((Path(args.checkpoint) / "config.json").read_text())
    vocab = config.get("model", config)["vocab_size"]
    print(f"cores: {os.cpu_count()}; {args.requests} requests per row; checkpoint {args.checkpoint}", flush=True)
    rows = []
    for name, flags in [(f"jaxlora --max-batch {args.max_batch}", ["--max-batch", str(args.max_batch)])] + (
        [] if "batch1" in skip else [("jaxlora --max-batch 1", ["--max-batch", "1"])]
    ):
        port = free_port()
        proc = jaxlora_server(args.checkpoint, port, *flags)
        try:
            rows += run_side(name, port, "m", vocab, args, clients_list)
        finally:
            stop(proc)
    if "transformers" not in skip:
        rows += transformers_side(args, vocab, clients_list)
    if "prefix" not in skip:
        rows += prefix_rows(args, vocab)
    print("\n| server | clients | output tok/s | TTFT p50 / p99 (s) | time per output token p50 / p99 (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
            f"{1000 * r['tpot_p50']:.0f} / {1000 * r['tpot_p99']:.0f} |"
        )


def prefix_rows(args, vocab: int) -> list[dict]:
    """16 requests at 4 clients sharing a 300-token system prompt, with and without prefix reuse."""
    system = np.random.default_rng(7).integers(100, vocab, 300).tolist()
    rows = []
    for name, flags in [
        ("shared 300-token prefix, reuse on", []),
        ("shared 300-token prefix, reuse off", ["--no-prefix-cache"]),
    ]:
        port = free_port()
        proc = jaxlora_server(args.checkpoint, port, "--max-batch", str(args.max_batch), *flags)
        try:
            warm(port, "m", vocab)
            one(port, "m", system + [200, 201], 4, 600)  # the shared blocks cached (or not), buckets compiled
            row = load(port, "m", workload(16, vocab, seed=5, system=system), 4, args.timeout)
            row["server"] = name
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            stop(proc)
    return rows


def transformers_side(args, vocab: int, clients_list) -> list[dict]:
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
            return run_side(
                "transformers serve --continuous-batching", port, str(folder / "hf"), vocab, args, clients_list
            )
        except Exception as e:  # noqa: BLE001 (report why the comparison is missing, keep the other rows)
            print(f"transformers serve failed under load: {type(e).__name__}: {e}", flush=True)
            return []
        finally:
            stop(proc)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
