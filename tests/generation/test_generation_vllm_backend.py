"""The vLLM backends without vLLM: the missing-package message, the glue to vLLM's API (against a
stand-in ``vllm`` module) and the HTTP protocol of server mode (against a local fake server)."""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from honelm.generation import SamplingParams, is_vllm_available, named_weights_for_sync, rollout
from honelm.generation import vllm_backend as vb
from honelm.testing import tiny_model, tiny_tokenizer


def test_importing_generation_never_imports_vllm():
    code = "import sys, honelm.generation as g; g.VLLMServerBackend; g.rollout; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(is_vllm_available(), reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install_it():
    with pytest.raises(ImportError, match=r"pip install honelm\[vllm\]"):
        vb.VLLMColocateBackend("Qwen/Qwen2.5-0.5B")
    with pytest.raises(ImportError, match="use_vllm=False"):
        vb.require_vllm()


def test_sampling_params_map_to_vllm_names():
    kwargs = vb.vllm_sampling_kwargs(
        SamplingParams(temperature=0.7, top_p=0.9, top_k=None, min_p=None, repetition_penalty=1.1), 32
    )
    assert kwargs == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.1,
        "max_tokens": 32,
        "logprobs": 0,
    }
    assert vb.vllm_sampling_kwargs(SamplingParams(top_k=5, min_p=0.1), 8)["top_k"] == 5


def test_weight_names_are_checkpoint_names_even_under_peft():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model("qwen2")
    expected = {name for name, _ in model.named_parameters()}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    names = [name for name, _ in named_weights_for_sync(peft_model)]
    assert set(names) == expected and len(names) == len(expected)
    assert (
        vb.clean_weight_name("module._orig_mod.model.layers.0.mlp.up_proj.weight")
        == "model.layers.0.mlp.up_proj.weight"
    )


# ---------------------------------------------------------------------- colocate (stand-in)


class _FakeLLM:
    instances: list[_FakeLLM] = []

    def __init__(self, **kwargs):
        self.kwargs, self.rpc, self.events = kwargs, [], []
        _FakeLLM.instances.append(self)

    def generate(self, requests, sampling_params, use_tqdm):
        outs = []
        for req, sp in zip(requests, sampling_params):
            ids = [t + 1 for t in req["prompt_token_ids"]][: sp.kwargs["max_tokens"]]
            logprobs = [
                {t: SimpleNamespace(logprob=-0.5 * (j + 1)), 99: SimpleNamespace(logprob=-9.0)}
                for j, t in enumerate(ids)
            ]
            finish = "length" if len(ids) == sp.kwargs["max_tokens"] else "stop"
            outs.append(
                SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, logprobs=logprobs, finish_reason=finish)])
            )
        return outs

    def collective_rpc(self, method, args=()):
        self.rpc.append((method, args))

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    def sleep(self, level):
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tags))


@pytest.fixture
def fake_vllm(monkeypatch):
    from dataclasses import dataclass

    @dataclass
    class EngineArgs:
        model: str = ""
        logprobs_mode: str = "raw_logprobs"

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(kwargs=kw)
    module.EngineArgs = EngineArgs
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    _FakeLLM.instances.clear()
    return module


def test_colocate_builds_the_engine_and_converts_outputs(fake_vllm):
    backend = vb.VLLMColocateBackend(
        "my/model", sampling=SamplingParams(temperature=0.9), max_completion_length=3, enable_sleep_mode=True
    )
    llm = _FakeLLM.instances[0]
    assert llm.kwargs["worker_extension_cls"] == "honelm.generation.vllm_backend.WeightSyncWorkerExtension"
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs" and llm.kwargs["model"] == "my/model"
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    out = backend.generate([[1, 2, 3, 4], [7]], max_new_tokens=[3, 5])
    assert out.completion_ids == [[2, 3, 4], [8]]
    assert out.logps == [[-0.5, -1.0, -1.5], [-0.5]]
    assert out.truncated == [True, False]


def test_colocate_loads_weights_through_collective_rpc(fake_vllm):
    backend = vb.VLLMColocateBackend("my/model", enable_sleep_mode=True)
    w = torch.ones(2)
    backend.wake_up(["weights"])
    backend.load_weights([("module.model.embed_tokens.weight", w)])
    backend.wake_up(["kv_cache"])
    backend.sleep()
    llm = _FakeLLM.instances[0]
    ((method, (weights,)),) = llm.rpc
    assert method == "honelm_load_weights" and weights[0][0] == "model.embed_tokens.weight" and weights[0][1] is w
    assert llm.events == [("wake_up", ["weights"]), "reset_prefix_cache", ("wake_up", ["kv_cache"]), "sleep1"]


def test_worker_extension_feeds_the_model_loader():
    received = []
    worker = vb.WeightSyncWorkerExtension()
    worker.model_runner = SimpleNamespace(model=SimpleNamespace(load_weights=lambda weights: received.extend(weights)))
    worker.honelm_load_weights([("a", 1)])
    assert received == [("a", 1)]


# ------------------------------------------------------------------------ server (fake HTTP)


class _Handler(BaseHTTPRequestHandler):
    log: list[tuple[str, dict | None]] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def _reply(self, status, payload=None):
        body = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        _Handler.log.append((self.path, None))
        if self.path == "/v1/models":
            self._reply(200, {"data": [{"id": "served-model"}]})
        elif self.path == "/get_world_size":
            self._reply(200, {"world_size": 1})
        else:
            self._reply(404, {"detail": "Not Found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length)) if length else None
        _Handler.log.append((self.path, payload))
        if self.path == "/v1/completions":
            choices = []
            for i, prompt in enumerate(payload["prompt"]):
                ids = [t + 100 for t in prompt][: payload["max_tokens"]]
                choices.append(
                    {
                        "index": i,
                        "text": "...",
                        "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [-0.1] * len(ids)},
                        "finish_reason": "length" if len(ids) == payload["max_tokens"] else "stop",
                    }
                )
            self._reply(200, {"choices": list(reversed(choices))})  # order must not matter
        elif self.path in (
            "/pause",
            "/resume",
            "/update_weights",
            "/init_weight_transfer_engine",
            "/reset_prefix_cache",
        ):
            self._reply(200, {})
        else:
            self._reply(404, {"detail": "Not Found"})


@pytest.fixture
def server():
    _Handler.log = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_server_generation_protocol(server):
    backend = vb.VLLMServerBackend(server, sampling=SamplingParams(temperature=0.5, top_k=4), max_completion_length=2)
    assert backend.model == "served-model"
    out = backend.generate([[1, 2, 3], [4], [5, 6]], max_new_tokens=[2, 2, 5])
    assert out.completion_ids == [[101, 102], [104], [105, 106]]
    assert out.logps == [[-0.1, -0.1], [-0.1], [-0.1, -0.1]]
    assert out.truncated == [True, False, False]
    requests = [p for path, p in _Handler.log if path == "/v1/completions"]
    assert [r["max_tokens"] for r in requests] == [2, 5]  # one request per distinct limit
    first = requests[0]
    assert first["prompt"] == [[1, 2, 3], [4]] and first["model"] == "served-model"
    assert first["temperature"] == 0.5 and first["top_k"] == 4 and first["logprobs"] == 0
    assert first["return_tokens_as_token_ids"] is True


def test_server_rollout_end_to_end(server):
    tok = tiny_tokenizer()
    backend = vb.VLLMServerBackend(server, max_completion_length=4)
    out = rollout(backend, ["Hello"], tok, num_generations=2)
    assert len(out) == 2 and out.completion_ids[0] == [t + 100 for t in tok("Hello")["input_ids"]][:4]


def test_server_weight_push_sequence(server, monkeypatch):
    backend = vb.VLLMServerBackend(server)
    backend._group = object()  # as after init_weight_sync
    sent = []
    monkeypatch.setattr(backend, "_send", lambda weights, packed: sent.append((weights, packed)))
    w = torch.zeros(3, 4, dtype=torch.bfloat16)
    backend.load_weights([("base_model.model.lm_head.weight", w)])
    paths = [p for p, _ in _Handler.log if p not in ("/v1/models",)]
    assert paths == [
        "/pause",
        "/start_weight_update",
        "/update_weights",
        "/finish_weight_update",
        "/reset_prefix_cache",
        "/resume",
    ]
    (update,) = [p for path, p in _Handler.log if path == "/update_weights"]
    assert update == {
        "update_info": {"names": ["lm_head.weight"], "dtype_names": ["bfloat16"], "shapes": [[3, 4]], "packed": True}
    }
    assert sent[0][0][0][0] == "lm_head.weight" and sent[0][0][0][1] is w


def test_server_resumes_even_when_the_push_fails(server, monkeypatch):
    backend = vb.VLLMServerBackend(server)
    backend._group = object()

    def boom(weights, packed):
        raise RuntimeError("NCCL went away")

    monkeypatch.setattr(backend, "_send", boom)
    with pytest.raises(RuntimeError, match="NCCL went away"):
        backend.load_weights([("w", torch.zeros(1))])
    assert _Handler.log[-1][0] == "/resume"


def test_server_errors_say_what_to_do(server):
    with pytest.raises(vb.VLLMServerError, match="could not reach the vLLM server"):
        vb.VLLMServerBackend("http://127.0.0.1:9", model="m", timeout=2).generate([[1]])
    backend = vb.VLLMServerBackend(server)
    with pytest.raises(vb.VLLMServerError, match="VLLM_SERVER_DEV_MODE=1"):
        backend.sleep()
    with pytest.raises(vb.VLLMServerError, match="tokens as text"):
        vb._from_choice({"logprobs": {"tokens": ["hello"], "token_logprobs": [-1.0]}})
