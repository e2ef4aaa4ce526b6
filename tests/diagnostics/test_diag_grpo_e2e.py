"""End to end: a GRPO run with a constant reward raises the zero-variance event within a few steps."""

from __future__ import annotations

import pytest

from honelm.diagnostics import DiagnosticsCallback
from honelm.testing import arithmetic_dataset, tiny_model

grpo = pytest.importorskip("honelm.methods.grpo.trainer", reason="the GRPO trainer is not in this tree yet")


def test_constant_reward_raises_zero_reward_std_with_real_config_fields(tmp_path):
    from honelm.methods.grpo.config import GRPOConfig

    model, tok = tiny_model()
    prompts = arithmetic_dataset(n=32).remove_columns(["completion"])
    events = []
    args = GRPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True,
                      save_strategy="no", logging_steps=1, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, max_steps=4, seed=0)
    trainer = grpo.GRPOTrainer(model, reward_funcs=lambda prompts, completions, **kw: [1.0] * len(completions),
                               args=args, train_dataset=prompts, processing_class=tok,
                               callbacks=[DiagnosticsCallback(on_diagnostic=events.append, console=False)])
    trainer.train()
    event = next(e for e in events if e.code == "GRPO_ZERO_REWARD_STD")
    assert event.status == "new" and event.step <= 3 and event.severity == "error"
    assert event.evidence["mean"] == 1.0
    suggested = {s.param: (s.current, s.proposed) for s in event.suggestions}
    assert suggested == {"num_generations": (4, 8), "temperature": (args.temperature, 1.3)}
    assert all(hasattr(args, s.param) for s in event.suggestions)  # real GRPOConfig fields
