"""rerankers.first_token: the last layer for the first token only gives the model's own logits, and
only architectures whose head reads nothing else get it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kernel.config import TierSettings
from rerankers.cross_encoder import CrossEncoderReranker
from rerankers.factory import create_reranker
from rerankers.first_token import FirstTokenClassifier, first_token_classifier

QUERIES = ["what do cats eat", "q", "a much longer question about the capital city of france and its history"]
DOCS = ["cats eat fish", "paris " * 40, "the weather is cold today"]


def _model_and_batch(folder: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    batch = AutoTokenizer.from_pretrained(str(folder))(QUERIES, DOCS, padding=True, return_tensors="pt")
    return model, dict(batch)


@pytest.mark.parametrize("kind", ["tiny_bert_ce", "tiny_xlmr_ce"])
def test_same_logits_as_the_whole_model(kind: str, request: pytest.FixtureRequest) -> None:
    model, batch = _model_and_batch(request.getfixturevalue(kind))
    module = first_token_classifier(model, batch)
    assert isinstance(module, FirstTokenClassifier)
    with torch.inference_mode():
        expected = model(**batch).logits
        for rows in (slice(0, 3), slice(1, 2)):  # padded rows, and one row alone
            got = module(**{k: v[rows] for k, v in batch.items()}).logits
            assert torch.allclose(got, expected[rows], atol=1e-5)
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in model.parameters())  # shared


def test_unknown_or_changed_layouts_run_the_whole_model(tiny_bert_ce: Path) -> None:
    model, batch = _model_and_batch(tiny_bert_ce)
    model.config.position_embedding_type = "relative_key"  # attention we do not reproduce
    assert first_token_classifier(model, batch) is None
    model.config.position_embedding_type = "absolute"
    with torch.no_grad():  # a head that no longer matches what the module computes: the probe catches it
        model.bert.encoder.layer[-1].attention.self.scaling = 1.0
    assert first_token_classifier(model, batch) is None
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    other = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    )
    assert first_token_classifier(other.eval(), {"input_ids": torch.ones((1, 4), dtype=torch.long)}) is None


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_the_cross_encoder_uses_it(tiny_xlmr_ce: Path, runtime: str) -> None:
    reranker = create_reranker(
        TierSettings(name="reranker", engine="cross_encoder", runtime=runtime), str(tiny_xlmr_ce)
    )
    assert isinstance(reranker, CrossEncoderReranker)
    reranker.load()
    assert isinstance(reranker._classifier, FirstTokenClassifier)
