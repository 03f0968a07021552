"""The loss QwenTrainer computes where transformers' Trainer computes it itself (label smoothing): next-token
targets, as the model's own loss has them. transformers shifts the labels only for models in its own causal-LM
table, which Qwen v1 is not in, so every position was scored against its own token (QwenLM/Qwen issue 834)."""

import pytest
import torch

from finetune.training.arguments import TrainingArguments
from finetune.training.trainer import QwenTrainer

from _helpers import tiny_model


def _peaked_model():
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # confident predictions: scoring the wrong position costs a lot
    return model.train()


def test_label_smoothing_scores_the_next_token(tmp_path):
    model = _peaked_model()
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    eps = 0.1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
    target, trained = labels[:, 1:], labels[:, 1:] != -100
    n = trained.sum()
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[trained].sum() / n
    uniform = -logp.sum(-1)[trained].sum() / (n * logp.shape[-1])
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=eps, report_to=[], use_cpu=True)
    trainer = QwenTrainer(model=model, args=args)
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    assert loss.item() == pytest.approx(((1 - eps) * nll + eps * uniform).item(), rel=1e-5)
