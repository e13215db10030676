"""A `jaxlora serve` process on 127.0.0.1 for the tests: started on a free port, waited for, stopped with
SIGTERM, with the official openai client pointed at it."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, *flags):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "jaxlora", "serve", str(checkpoint), "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stderr.read()[-3000:])
            try:
                self.health()
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError("the server did not come up in 2 minutes")
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=120)

    def health(self) -> dict:
        with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
            return json.loads(r.read())

    def post(self, path: str, data: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(self.base + path, data, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err
