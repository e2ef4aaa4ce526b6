"""Generation with vLLM, when it is installed (``pip install honelm[vllm]``, CUDA only).

Nothing here imports vLLM at module import time: the backends import it when built, and a
machine without vLLM gets an ``ImportError`` that says how to install it (or to generate
with transformers instead). Both backends return the same
:class:`~honelm.generation.GenerationOutput` as the transformers backend and plug into
:func:`~honelm.generation.rollout`.

**Colocate** (``vllm_mode="colocate"``): :class:`VLLMColocateBackend` runs a ``vllm.LLM`` in the
training process, on the training GPU(s). After each optimizer step the trainer pushes the new
weights with :meth:`VLLMColocateBackend.load_weights`, which calls vLLM's public
``LLM.collective_rpc`` on a worker extension (``worker_extension_cls``) that feeds them to the
model's ``load_weights``. With ``enable_sleep_mode=True`` the engine frees its GPU memory
between generation phases (``LLM.sleep`` / ``LLM.wake_up``).

**Server** (``vllm_mode="server"``): :class:`VLLMServerBackend` talks to a separate
``vllm serve`` process over HTTP: completions through the OpenAI-compatible ``/v1/completions``
endpoint (token ids in, token ids and log-probs out), weights through vLLM's native weight
transfer API (``/init_weight_transfer_engine``, ``/update_weights``, with the tensors
broadcast over NCCL by ``NCCLWeightTransferEngine``). Start the server with::

    VLLM_SERVER_DEV_MODE=1 vllm serve Qwen/Qwen2.5-0.5B-Instruct \\
        --weight-transfer-config '{"backend": "nccl"}' --logprobs-mode processed_logprobs

Log-probs: vLLM is asked for ``processed_logprobs`` (the distribution after temperature and
the other sampling processors), the counterpart of the transformers backend's ``logps``.
``raw_logps`` are not available from vLLM.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from .outputs import GenerationOutput
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

VLLM_INSTALL_HINT = (
    "vLLM is not installed, and `use_vllm=True` needs it. Install it with `pip install honelm[vllm]` "
    "(vLLM runs on CUDA GPUs), or set `use_vllm=False` to generate with the in-process transformers backend."
)
_EXTENSION = "honelm.generation.vllm_backend.WeightSyncWorkerExtension"


def is_vllm_available() -> bool:
    """Whether the ``vllm`` package can be imported."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raise an ``ImportError`` naming ``pip install honelm[vllm]`` when vLLM is missing."""
    if not is_vllm_available():
        raise ImportError(VLLM_INSTALL_HINT)


def vllm_sampling_kwargs(sampling: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """The keyword arguments of ``vllm.SamplingParams`` (and of ``/v1/completions``) for ``sampling``."""
    return {
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k) if sampling.top_k else -1,
        "min_p": float(sampling.min_p or 0.0),
        "repetition_penalty": float(sampling.repetition_penalty),
        "max_tokens": int(max_tokens),
        "logprobs": 0,  # the sampled token's log-prob only
    }


def clean_weight_name(name: str) -> str:
    """A trained parameter's name as a checkpoint (and vLLM's ``load_weights``) spells it.

    Drops the prefixes of wrappers (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``,
    ``base_model.model.`` of PEFT) and PEFT's ``.base_layer`` infix.
    """
    for prefix in ("module.", "_orig_mod.", "base_model.model."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def _is_adapter_weight(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name or "original_module" in name


def named_weights_for_sync(model: Any) -> list[tuple[str, Any]]:
    """``(checkpoint name, tensor)`` for every weight of ``model`` to push to vLLM.

    LoRA adapter tensors are skipped: merge the adapters first (``model.merge_adapter()``)
    and unmerge after the push. Tensors sharded by FSDP / ZeRO-3 must be gathered by the
    caller.
    """
    return [
        (clean_weight_name(name), param.detach())
        for name, param in model.named_parameters()
        if not _is_adapter_weight(name)
    ]


def _generation_output(records: Iterable[tuple[Sequence[int], Sequence[float], bool]]) -> GenerationOutput:
    out = GenerationOutput([], [], [])
    for ids, logps, truncated in records:
        out.completion_ids.append([int(t) for t in ids])
        out.logps.append([float(v) for v in logps])
        out.truncated.append(bool(truncated))
    return out


def _limits(max_new_tokens: int | Sequence[int] | None, default: int, n: int) -> list[int]:
    if max_new_tokens is None:
        return [default] * n
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * n
    limits = [int(m) for m in max_new_tokens]
    if len(limits) != n:
        raise ValueError(f"generate: got {len(limits)} max_new_tokens values for {n} prompts; give one per prompt.")
    return limits


# ------------------------------------------------------------------------------- colocate


class WeightSyncWorkerExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``): loads pushed weights in place."""

    def honelm_load_weights(self, weights: list[tuple[str, Any]]) -> None:
        self.model_runner.model.load_weights(weights=weights)  # type: ignore[attr-defined]


class VLLMColocateBackend:
    """A ``vllm.LLM`` in the training process, sharing its GPU(s).

    Args:
        model: Model name or path that vLLM loads (the policy's starting point).
        sampling: Default :class:`SamplingParams`.
        max_completion_length: Default maximum number of generated tokens.
        gpu_memory_utilization: Fraction of GPU memory vLLM may take (leave room for training).
        tensor_parallel_size: GPUs per vLLM engine. With more than one, every rank of a
            tensor-parallel group must pass the same prompts (gather them first).
        max_model_len: Longest prompt + completion (``None``: the model's limit).
        dtype: Weights dtype (``"auto"``, ``"bfloat16"``, ...).
        enable_sleep_mode: Free vLLM's GPU memory between generation phases; call
            :meth:`sleep` after generating and :meth:`wake_up` before.
        seed: vLLM's sampling seed.
        llm_kwargs: Any further ``vllm.LLM`` arguments.

    Sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless already set) so the engine runs in this
    process and weights are handed over without copies.
    """

    def __init__(
        self,
        model: str,
        *,
        sampling: SamplingParams | None = None,
        max_completion_length: int = 256,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enable_sleep_mode: bool = False,
        seed: int = 0,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        self.sampling = sampling if sampling is not None else SamplingParams()
        self.max_completion_length = max_completion_length
        self.enable_sleep_mode = enable_sleep_mode
        kwargs: dict[str, Any] = {
            "model": model,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "seed": seed,
            "enable_sleep_mode": enable_sleep_mode,
            "worker_extension_cls": _EXTENSION,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if _engine_accepts(vllm, "logprobs_mode"):
            kwargs["logprobs_mode"] = "processed_logprobs"
        else:
            logger.warning(
                "This vLLM version has no `logprobs_mode`: the returned logps are of the raw logits, before "
                "temperature and truncation. Upgrade vLLM for log-probs of the distribution sampled from."
            )
        if _distributed_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs or {})
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int] | None = None,
        sampling: SamplingParams | None = None,
    ) -> GenerationOutput:
        """Complete each prompt once (see :meth:`TransformersBackend.generate`)."""
        sampling = sampling if sampling is not None else self.sampling
        limits = _limits(max_new_tokens, self.max_completion_length, len(prompt_ids))
        params = [self._vllm.SamplingParams(n=1, **vllm_sampling_kwargs(sampling, m)) for m in limits]
        requests = [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompt_ids]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return _generation_output(_from_request_output(o) for o in outputs)

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Copy new weights into the engine (checkpoint names, e.g. from
        :func:`named_weights_for_sync`) and drop the now stale prefix cache."""
        weights = [(clean_weight_name(name), tensor) for name, tensor in named_tensors]
        self.llm.collective_rpc("honelm_load_weights", args=(weights,))
        self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free vLLM's GPU memory (level 1: offload weights to CPU, drop the KV cache)."""
        if self.enable_sleep_mode:
            self.llm.sleep(level=level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take the GPU memory back (``tags``: ``["weights"]`` then ``["kv_cache"]`` to load
        weights before the KV cache is allocated)."""
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=list(tags)) if tags is not None else self.llm.wake_up()


def _engine_accepts(vllm: Any, name: str) -> bool:
    engine_args = getattr(vllm, "EngineArgs", None)
    if engine_args is None or not dataclasses.is_dataclass(engine_args):
        return False
    return name in {f.name for f in dataclasses.fields(engine_args)}


def _distributed_world_size() -> int:
    try:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    except Exception:  # pragma: no cover - torch without distributed support
        return 1


def _from_request_output(output: Any) -> tuple[list[int], list[float], bool]:
    """``(token ids, sampled-token log-probs, truncated)`` of one ``vllm.RequestOutput``."""
    completion = output.outputs[0]
    ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise RuntimeError(
            "vLLM returned no log-prob for some generated tokens; the backend asks for `logprobs=0` and needs "
            "one per token."
        )
    logps = [float(step[t].logprob) for t, step in zip(ids, completion.logprobs)]
    return ids, logps, completion.finish_reason == "length"


# --------------------------------------------------------------------------------- server


class VLLMServerError(RuntimeError):
    """A request to the vLLM server failed; the message names the URL and what to do."""


class VLLMServerBackend:
    """Generation on a separate ``vllm serve`` process, weights pushed after each step.

    Args:
        base_url: The server's address, e.g. ``"http://localhost:8000"``.
        model: The served model name (``None``: the first one ``/v1/models`` lists).
        sampling: Default :class:`SamplingParams`.
        max_completion_length: Default maximum number of generated tokens.
        timeout: Seconds to wait for one HTTP request.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        model: str | None = None,
        sampling: SamplingParams | None = None,
        max_completion_length: int = 256,
        timeout: float = 600.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.max_completion_length = max_completion_length
        self.timeout = timeout
        self.model = model if model is not None else self._served_model()
        self._group: Any = None

    # ---- HTTP ---------------------------------------------------------------------------------

    def _request(self, path: str, payload: dict[str, Any] | None = None, *, method: str = "POST") -> Any:
        url = f"{self.base_url}{path}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            hint = ""
            if exc.code == 404 and not path.startswith("/v1/"):
                hint = (
                    " This endpoint exists only when the server runs with VLLM_SERVER_DEV_MODE=1 and "
                    '--weight-transfer-config \'{"backend": "nccl"}\' (and a vLLM version with native weight transfer).'
                )
            raise VLLMServerError(f"vLLM server {method} {url} failed with HTTP {exc.code}: {detail}.{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise VLLMServerError(
                f"could not reach the vLLM server at {self.base_url} ({exc}). Start it with `vllm serve MODEL` "
                "(see honelm.generation.vllm_backend) or fix `base_url`."
            ) from None
        return json.loads(body) if body else None

    def _served_model(self) -> str:
        listing = self._request("/v1/models", method="GET")
        models = (listing or {}).get("data") or []
        if not models:
            raise VLLMServerError(f"the vLLM server at {self.base_url} serves no model (empty /v1/models).")
        return str(models[0]["id"])

    # ---- generation -----------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int] | None = None,
        sampling: SamplingParams | None = None,
    ) -> GenerationOutput:
        """Complete each prompt once through ``/v1/completions`` (one request per distinct limit)."""
        sampling = sampling if sampling is not None else self.sampling
        limits = _limits(max_new_tokens, self.max_completion_length, len(prompt_ids))
        records: list[tuple[list[int], list[float], bool] | None] = [None] * len(prompt_ids)
        for limit in sorted(set(limits)):
            rows = [i for i, m in enumerate(limits) if m == limit]
            payload = {
                "model": self.model,
                "prompt": [[int(t) for t in prompt_ids[i]] for i in rows],
                "n": 1,
                "return_tokens_as_token_ids": True,
                "return_token_ids": True,
                **vllm_sampling_kwargs(sampling, limit),
            }
            response = self._request("/v1/completions", payload)
            choices = sorted(response.get("choices", []), key=lambda c: c["index"])
            if len(choices) != len(rows):
                raise VLLMServerError(f"the vLLM server returned {len(choices)} completions for {len(rows)} prompts.")
            for row, choice in zip(rows, choices):
                records[row] = _from_choice(choice)
        return _generation_output(r for r in records if r is not None)

    # ---- weights ------------------------------------------------------------------------------

    def init_weight_sync(self, master_address: str | None = None, master_port: int | None = None) -> None:
        """Open the NCCL channel to the server's workers (once, before the first :meth:`load_weights`).

        The trainer is rank 0; the server's workers follow. Needs vLLM installed on the
        trainer side too (for ``NCCLWeightTransferEngine``) and a CUDA device.
        """
        require_vllm()
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        world = self._request("/get_world_size", method="GET")
        world_size = int(world["world_size"]) + 1
        master_address = master_address or _local_ip()
        master_port = master_port or _free_port()
        init_info = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": 1,
            "world_size": world_size,
        }
        errors: list[BaseException] = []
        remote = threading.Thread(
            target=self._post_capturing, args=("/init_weight_transfer_engine", {"init_info": init_info}, errors)
        )
        remote.start()
        self._group = NCCLWeightTransferEngine.trainer_init(
            {"master_address": master_address, "master_port": master_port, "world_size": world_size}
        )
        remote.join()
        if errors:
            raise errors[0]

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]], *, packed: bool = True) -> None:
        """Push new weights to the server: pause it, broadcast the tensors over NCCL while
        ``/update_weights`` receives them, reset its prefix cache, resume it."""
        if self._group is None:
            self.init_weight_sync()
        weights = [(clean_weight_name(name), tensor) for name, tensor in named_tensors]
        update_info = {
            "names": [name for name, _ in weights],
            "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in weights],
            "shapes": [list(t.shape) for _, t in weights],
            "packed": packed,
        }
        self._request("/pause")
        try:
            self._optional("/start_weight_update", {"is_checkpoint_format": True})
            errors: list[BaseException] = []
            receiver = threading.Thread(
                target=self._post_capturing, args=("/update_weights", {"update_info": update_info}, errors)
            )
            receiver.start()
            self._send(weights, packed)
            receiver.join()
            if errors:
                raise errors[0]
            self._optional("/finish_weight_update", {})
            self._optional("/reset_prefix_cache", None)
        finally:
            self._request("/resume")

    def _send(self, weights: list[tuple[str, Any]], packed: bool) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        NCCLWeightTransferEngine.trainer_send_weights(iter(weights), {"group": self._group, "packed": packed})

    def _post_capturing(self, path: str, payload: dict[str, Any], errors: list[BaseException]) -> None:
        try:
            self._request(path, payload)
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    def _optional(self, path: str, payload: dict[str, Any] | None) -> None:
        """POST to an endpoint that older vLLM versions lack (a 404 is fine)."""
        try:
            self._request(path, payload)
        except VLLMServerError as exc:
            if "HTTP 404" not in str(exc):
                raise

    def sleep(self, level: int = 1) -> None:
        """Ask the server to free its GPU memory (needs ``--enable-sleep-mode`` and dev mode)."""
        self._request(f"/sleep?level={int(level)}")

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Ask the server to take its GPU memory back."""
        query = "".join(f"&tags={t}" for t in tags or ()).lstrip("&")
        self._request("/wake_up" + (f"?{query}" if query else ""))


def _from_choice(choice: dict[str, Any]) -> tuple[list[int], list[float], bool]:
    """``(token ids, log-probs, truncated)`` of one ``/v1/completions`` choice."""
    logprobs = choice.get("logprobs") or {}
    values = logprobs.get("token_logprobs")
    if values is None:
        raise VLLMServerError("the vLLM server returned no `logprobs`; it must support `logprobs: 0`.")
    ids = choice.get("token_ids")
    if ids is None:
        tokens = logprobs.get("tokens") or []
        try:
            ids = [int(str(t).split("token_id:", 1)[1]) for t in tokens]
        except (IndexError, ValueError):
            raise VLLMServerError(
                "the vLLM server returned tokens as text, not ids; it must honour `return_tokens_as_token_ids`."
            ) from None
    if len(ids) != len(values):
        raise VLLMServerError(f"the vLLM server returned {len(ids)} tokens but {len(values)} log-probs.")
    return [int(t) for t in ids], [float(v) for v in values], choice.get("finish_reason") == "length"


def _local_ip() -> str:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
