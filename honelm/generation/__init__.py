"""Rollouts for online RL: generation backends, sampling, multi-turn tool use.

    from honelm.generation import SamplingParams, TransformersBackend, rollout

    backend = TransformersBackend(model, tokenizer, SamplingParams(temperature=1.0, top_p=0.95),
                                  max_completion_length=256)
    out = rollout(backend, prompts, tokenizer, num_generations=8, tools=[my_tool])
    out.completions                      # what reward functions receive
    out.to_tensors(tokenizer.pad_token_id)   # completion_ids, completion_mask, logps, tool_mask, ...

Backends (all return a :class:`GenerationOutput` from ``generate(prompt_ids, max_new_tokens=...)``):

- :class:`TransformersBackend`: the model being trained, in process (default).
- :class:`VLLMColocateBackend` / :class:`VLLMServerBackend`: vLLM in the training process or
  behind ``vllm serve`` (only when vLLM is installed: ``pip install honelm[vllm]``).

Names are imported on first use: ``import honelm.generation`` stays cheap and never imports vLLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module that defines it.
_EXPORTS: dict[str, str] = {
    # sampling
    "SamplingParams": "honelm.generation.sampling",
    "process_logits": "honelm.generation.sampling",
    "sample_next_token": "honelm.generation.sampling",
    # outputs
    "GenerationOutput": "honelm.generation.outputs",
    "RolloutOutput": "honelm.generation.outputs",
    # backends
    "TransformersBackend": "honelm.generation.transformers_backend",
    "VLLMColocateBackend": "honelm.generation.vllm_backend",
    "VLLMServerBackend": "honelm.generation.vllm_backend",
    "is_vllm_available": "honelm.generation.vllm_backend",
    "named_weights_for_sync": "honelm.generation.vllm_backend",
    # rollouts
    "RolloutBackend": "honelm.generation.rollouts",
    "RolloutFunc": "honelm.generation.rollouts",
    "prepare_prompts": "honelm.generation.rollouts",
    "rollout": "honelm.generation.rollouts",
    "rollout_from_dict": "honelm.generation.rollouts",
    # tools
    "ToolCall": "honelm.generation.tools",
    "ToolResult": "honelm.generation.tools",
    "execute_tool_calls": "honelm.generation.tools",
    "is_error_result": "honelm.generation.tools",
    "parse_tool_calls": "honelm.generation.tools",
    "tool_schema": "honelm.generation.tools",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'honelm.generation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from .outputs import GenerationOutput, RolloutOutput
    from .rollouts import RolloutBackend, RolloutFunc, prepare_prompts, rollout, rollout_from_dict
    from .sampling import SamplingParams, process_logits, sample_next_token
    from .tools import ToolCall, ToolResult, execute_tool_calls, is_error_result, parse_tool_calls, tool_schema
    from .transformers_backend import TransformersBackend
    from .vllm_backend import (
        VLLMColocateBackend,
        VLLMServerBackend,
        is_vllm_available,
        named_weights_for_sync,
    )
