import pytest
import torch

import rlora
from rlora import RLoraConfig
from rlora.analysis import (
    head_similarity,
    mean_pairwise_cosine,
    plot_head_similarity,
    plot_head_tsne,
    similarity_summary,
)


def test_mean_pairwise_cosine_known_values():
    e = torch.eye(3)
    assert mean_pairwise_cosine(e) == pytest.approx(0.0)
    same = torch.ones(4, 2, 3)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    two = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert mean_pairwise_cosine(two) == pytest.approx(2**-0.5)
    with pytest.raises(ValueError, match="heads"):
        mean_pairwise_cosine(torch.ones(1, 4))


def test_random_init_heads_are_dissimilar_identical_heads_are_not(tiny_llama_factory):
    model = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig(r=4, num_heads=4))
    sims = head_similarity(model)
    assert len(sims) == 14
    assert all(abs(v) < 0.2 for v in sims.values())  # independent Gaussian heads: cosine ~ 0
    for _, layer in rlora.rlora_layers(model):
        with torch.no_grad():
            heads = layer.head_weights()
            heads.copy_(heads[0].expand_as(heads).clone())  # write through the view into B
    assert all(v == pytest.approx(1.0) for v in head_similarity(model).values())
    summary = similarity_summary(head_similarity(model))
    assert summary["head_cos/mean"] == pytest.approx(1.0) and "head_cos/q_proj" in summary


def test_single_head_layers_have_no_similarity(tiny_llama_factory):
    model = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig.from_preset("lora"))
    assert head_similarity(model) == {}
    with pytest.raises(ValueError, match="sims"):
        plot_head_similarity({}, "unused.png")


def test_figures_are_written_as_png(tiny_llama_factory, tmp_path):
    model = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig(r=4, num_heads=3))
    heat = plot_head_similarity(head_similarity(model), tmp_path / "heat.png")
    tsne = plot_head_tsne(model, tmp_path / "figs" / "tsne.png")
    for path in (heat, tsne):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
