"""A fake OpenAI service on 127.0.0.1 for tests: the subset of the API the `openai` backend uses, over real HTTP.

Endpoints: `POST /v1/files` (multipart upload), `POST /v1/fine_tuning/jobs`, `GET /v1/fine_tuning/jobs[?metadata[k]=v]`,
`GET /v1/fine_tuning/jobs/{id}`, `POST /v1/completions` (echo + logprobs). Fine-tuning and log-probabilities are
computed by a `LocalBackend` (jobs trained one at a time on a worker thread), so the client code runs for real.

Switches: `rate_limit(n)` answers the next n requests with 429 (`retry-after-ms: 10`); `fail_next_jobs = n` makes
the next n jobs fail; `hold()` / `release()` keep jobs `running` without training (a slow job).
`counts` counts requests by kind (`files.create`, `jobs.create`, `jobs.retrieve`, `jobs.list`, `completions`, `429`).
"""

from __future__ import annotations

import collections
import email.parser
import email.policy
import json
import queue
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from llm_attr.backends.base import records_from_chat_jsonl
from llm_attr.backends.local import LocalBackend


class FakeOpenAIServer:
    """`with FakeOpenAIServer(backend) as server:` ... `server.base_url` is `http://127.0.0.1:PORT/v1`."""

    def __init__(self, backend: LocalBackend, *, base_learning_rate: float = 3e-4):
        self.backend = backend
        self.base_learning_rate = base_learning_rate
        self.files: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.models: dict[str, str] = {}  # fine-tuned model name -> local model id (adapter directory)
        self.counts: collections.Counter[str] = collections.Counter()
        self.fail_next_jobs = 0
        self._rate_limited = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()
        self._stopping = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._threads = [threading.Thread(target=self._httpd.serve_forever, daemon=True),
                         threading.Thread(target=self._worker, daemon=True)]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        # torch ops run on the worker and handler threads: with several intra-op threads per caller on a small CPU
        # they oversubscribe it (10-30x slower); one thread while the server runs
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        torch.set_num_threads(self._torch_threads)
        self._stopping = True
        self._released.set()
        self._queue.put(None)
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ switches

    def rate_limit(self, n: int) -> None:
        """Answer the next `n` requests with HTTP 429."""
        with self._lock:
            self._rate_limited = n

    def hold(self) -> None:
        """Slow jobs: they stay `running` (untrained) until `release()`."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def cancel(self, job_id: str) -> None:
        """Cancel a job that has not finished (the worker skips it)."""
        job = self.jobs[job_id]
        if job["status"] in ("queued", "running", "validating_files"):
            job.update(status="cancelled", finished_at=int(time.time()))

    def _take_rate_limit(self) -> bool:
        with self._lock:
            if self._rate_limited > 0:
                self._rate_limited -= 1
                self.counts["429"] += 1
                return True
            return False

    # ------------------------------------------------------------------ jobs

    def _worker(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            job = self.jobs[job_id]
            if job["status"] == "cancelled":
                continue
            job["status"] = "running"
            self._released.wait()
            if self._stopping:
                return
            if job["status"] == "cancelled":
                continue
            if job.pop("_fail"):
                job.update(status="failed", finished_at=int(time.time()),
                           error={"code": "invalid_training_file", "message": "injected failure", "param": None})
                continue
            try:
                hp = job["hyperparameters"]
                local_hp = {"epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
                            "learning_rate": self.base_learning_rate * hp["learning_rate_multiplier"]}
                records = records_from_chat_jsonl(self.files[job["training_file"]].decode(), id_prefix=job_id)
                local_job = self.backend.submit_finetune(job["model"], records, local_hp, job["seed"], tag=job_id)
                model_id = self.backend.wait(local_job)
            except Exception as e:  # reported through the job, as a service would
                job.update(status="failed", error={"code": "server_error", "message": str(e), "param": None})
                continue
            name = f"ft:{job['model']}:llm-attr:{job_id}"
            self.models[name] = model_id
            job.update(status="succeeded", fine_tuned_model=name, finished_at=int(time.time()),
                       trained_tokens=sum(len(r.response_text()) for r in records))

    def create_job(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body.get("training_file") not in self.files:
            return 400, _error(f"file {body.get('training_file')!r} not found", "invalid_request_error")
        method = body.get("method") or {}
        hp = dict((method.get("supervised") or {}).get("hyperparameters") or body.get("hyperparameters") or {})
        hp = {"n_epochs": 1 if hp.get("n_epochs", "auto") == "auto" else int(hp["n_epochs"]),
              "batch_size": 16 if hp.get("batch_size", "auto") == "auto" else int(hp["batch_size"]),
              "learning_rate_multiplier": 1.0 if hp.get("learning_rate_multiplier", "auto") == "auto"
              else float(hp["learning_rate_multiplier"])}
        with self._lock:
            job_id = f"ftjob-{len(self.jobs) + 1:04d}"
            fail = self.fail_next_jobs > 0
            self.fail_next_jobs -= int(fail)
            self.counts["jobs.create"] += 1
            job = {"id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "model": body["model"],
                   "fine_tuned_model": None, "organization_id": "org-fake", "result_files": [], "status": "queued",
                   "training_file": body["training_file"], "validation_file": None, "hyperparameters": hp,
                   "seed": int(body.get("seed") or 0), "trained_tokens": None, "error": None, "finished_at": None,
                   "metadata": body.get("metadata"), "method": {"type": "supervised"}, "_fail": fail}
            self.jobs[job_id] = job
        self._queue.put(job_id)
        return 200, _public(job)

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def completions(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        model_id = self.models.get(body.get("model"))
        if model_id is None:
            return 404, _error(f"The model {body.get('model')!r} does not exist", "invalid_request_error")
        if not body.get("echo") or body.get("logprobs") is None:
            return 400, _error("this fake service only answers echo=true with logprobs", "invalid_request_error")
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        max_tokens = int(body.get("max_tokens") or 0)
        choices, n_tokens = [], 0
        with self.backend.use_model(model_id) as (model, tokenizer):
            for index, text in enumerate(prompts):
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                ids = enc["input_ids"]
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                token_logprobs: list[float | None] = [None] + [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
                offsets = [int(s) for s, _ in enc["offset_mapping"]]
                tokens = [tokenizer.decode([i]) for i in ids]
                out_text = text
                if max_tokens > 0:  # one greedy token after the echo (what a real service appends)
                    nxt = int(logp[-1].argmax())
                    piece = tokenizer.decode([nxt])
                    tokens.append(piece)
                    token_logprobs.append(logp[-1, nxt].item())
                    offsets.append(len(text))
                    out_text = text + piece
                n_tokens += len(ids)
                choices.append({"index": index, "text": out_text, "finish_reason": "length", "logprobs": {
                    "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": None, "text_offset": offsets}})
        self.counts["completions"] += 1
        return 200, {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                     "model": body["model"], "choices": choices,
                     "usage": {"prompt_tokens": n_tokens, "completion_tokens": len(prompts) * min(max_tokens, 1),
                               "total_tokens": n_tokens + len(prompts) * min(max_tokens, 1)}}


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def _error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            blob = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(blob)

        def _route(self, method: str) -> None:
            body = self._body() if method == "POST" else b""
            if server._take_rate_limit():
                self._send(429, _error("Rate limit reached (injected)", "requests", "rate_limit_exceeded"),
                           {"retry-after-ms": "10"})
                return
            url = urllib.parse.urlsplit(self.path)
            path = url.path.rstrip("/")
            try:
                if method == "POST" and path == "/v1/files":
                    self._send(*self._upload(body))
                elif method == "POST" and path == "/v1/fine_tuning/jobs":
                    self._send(*server.create_job(json.loads(body)))
                elif method == "GET" and path == "/v1/fine_tuning/jobs":
                    server.counts["jobs.list"] += 1
                    query = urllib.parse.parse_qs(url.query)
                    wanted = {k[len("metadata["):-1]: v[0] for k, v in query.items() if k.startswith("metadata[")}
                    data = [_public(j) for j in reversed(list(server.jobs.values()))
                            if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
                    self._send(200, {"object": "list", "data": data, "has_more": False})
                elif method == "GET" and path.startswith("/v1/fine_tuning/jobs/"):
                    server.counts["jobs.retrieve"] += 1
                    job = server.jobs.get(path.rsplit("/", 1)[1])
                    if job is None:
                        self._send(404, _error("job not found", "invalid_request_error"))
                    else:
                        self._send(200, _public(job))
                elif method == "POST" and path == "/v1/completions":
                    self._send(*server.completions(json.loads(body)))
                else:
                    self._send(404, _error(f"no route {method} {path}", "invalid_request_error"))
            except Exception as e:  # a bug in the fake: a 500 the client will report
                self._send(500, _error(f"{type(e).__name__}: {e}", "server_error"))

        def _upload(self, body: bytes) -> tuple[int, dict[str, Any]]:
            head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
            fields: dict[str, tuple[str | None, bytes]] = {}
            for part in message.iter_parts():
                fields[part.get_param("name", header="content-disposition")] = (
                    part.get_filename(), part.get_payload(decode=True))
            if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"fine-tune":
                return 400, _error("expected multipart fields file and purpose=fine-tune", "invalid_request_error")
            filename, content = fields["file"]
            try:
                records_from_chat_jsonl(content.decode())
            except Exception as e:
                return 400, _error(f"invalid training file: {e}", "invalid_request_error")
            with server._lock:
                file_id = f"file-{len(server.files) + 1:04d}"
                server.files[file_id] = content
                server.counts["files.create"] += 1
            return 200, {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                         "filename": filename, "purpose": "fine-tune", "status": "processed"}

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def do_GET(self) -> None:  # noqa: N802
            self._route("GET")

    return Handler
