"""A language-model study through the real CLI: a small GPT on generated text, tuned with SASSHA's
language-model variant, every trial measured for perplexity and sharpness."""

from __future__ import annotations

import math
import random

import optuna
from typer.testing import CliRunner

from sassha_tune.app.cli import app


def _text(tmp_path):
    rng = random.Random(0)
    words = "the a cat dog sat on mat ran fast slow big small red blue and or but".split()
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)), encoding="utf-8")
    return tmp_path


def test_language_model_study_stores_perplexity_and_sharpness(tmp_path):
    (tmp_path / "data").mkdir()
    data = _text(tmp_path / "data")
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(
        "study: {name: lm, objective: val_ppl, sampler: {name: random, seed: 0}}\n"
        "budget: {n_trials: 2}\n"
        f"task: {{dataset: text, data_dir: '{data}', dataset_options: {{block_size: 16}}, model: gpt,\n"
        "  model_options: {n_layer: 1, n_head: 2, n_embd: 16}, epochs: 2, batch_size: 8, grad_accumulation: 2,\n"
        "  max_steps_per_epoch: 6}\n"
        "optimizer: {name: sassha_lm, search_space: sassha_lm, enqueue_published: true,\n"
        "  fixed: {rho_warmup_iters: 2, hessian_warmup_iters: 2}}\n"
        "schedule: {name: cosine, min_lr_fraction: 0.05}\n"
        "metrics: {subset_size: 16, budget: {lambda_max_iters: 4, trace_probes: 4, sam_steps: 2}}\n"
        "device: cpu\nseed: 0\n"
    )
    url = f"sqlite:///{tmp_path / 's.db'}"
    result = CliRunner().invoke(app, ["run", str(cfg), "--storage", url])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="lm", storage=url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    first = trials[0]
    assert first.user_attrs["published"].startswith("language_tasks/modeling")  # the GPT-2 config, enqueued
    assert first.params["lr"] == 0.3 and first.params["hessian_power"] == 0.8
    assert first.user_attrs["optimizer_hparams"]["weight_decay"] == 2e-4  # as given: the LM scripts' convention
    for t in trials:
        a = t.user_attrs
        assert t.values[0] == a["val_ppl"] == math.exp(a["val_loss"])
        assert a["num_classes"] == 256 and 0 < a["val_acc"] < 1
        assert math.isfinite(a["lambda_max"]) and math.isfinite(a["hessian_trace"])
        assert [h["val_ppl"] for h in a["history"]] == [math.exp(h["val_loss"]) for h in a["history"]]
