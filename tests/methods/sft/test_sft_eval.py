"""evaluate(): the SFT metrics are returned, with the prefix of each eval dataset."""

from __future__ import annotations

from honelm.methods.sft import SFTConfig, SFTTrainer
from honelm.testing import arithmetic_dataset, tiny_model


def _trainer(tmp_path, eval_dataset):
    model, tok = tiny_model("qwen2", seed=0)
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True,
                     save_strategy="no", per_device_eval_batch_size=4, seed=0)
    return SFTTrainer(model=model, args=args, train_dataset=arithmetic_dataset(n=8), eval_dataset=eval_dataset,
                      processing_class=tok)


def test_evaluate_returns_the_sft_metrics(tmp_path):
    trainer = _trainer(tmp_path, arithmetic_dataset(n=8, seed=1))
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_mean_token_accuracy", "eval_entropy", "eval_num_tokens"):
        assert key in metrics, metrics
    assert 0.0 <= metrics["eval_mean_token_accuracy"] <= 1.0 and metrics["eval_entropy"] > 0
    logged = trainer.state.log_history[-1]
    assert logged["eval_entropy"] == metrics["eval_entropy"]


def test_a_dict_of_eval_datasets_gets_one_prefix_each(tmp_path):
    trainer = _trainer(tmp_path, {"easy": arithmetic_dataset(n=4, seed=1), "hard": arithmetic_dataset(n=4, seed=2)})
    metrics = trainer.evaluate()
    for name in ("easy", "hard"):
        assert f"eval_{name}_loss" in metrics and f"eval_{name}_entropy" in metrics, metrics
    assert not any(k.startswith("eval_eval_") for k in metrics)
    assert "eval_entropy" not in metrics  # no metric under the wrong prefix
