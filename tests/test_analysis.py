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


def test_heatmap_shows_each_layers_similarity_in_its_row(tmp_path):
    """A known input: layer 0's heads orthogonal (0.0) in every module type, layer 1's identical (1.0).
    In the saved PNG, the heatmap (the left half; the colour bar is on the right) has viridis' colour
    of 0 in its upper rows and viridis' colour of 1 in its lower ones, each over about half its cells."""
    import matplotlib
    import matplotlib.image
    import numpy as np

    types = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    sims = {f"model.layers.{i}.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}":
            float(i) for i in (0, 1) for t in types}
    img = matplotlib.image.imread(plot_head_similarity(sims, tmp_path / "heat.png"))[..., :3]
    left = img[:, : img.shape[1] // 2]

    def rows_of(value):
        rgb = np.asarray(matplotlib.colormaps["viridis"](value)[:3])
        return np.nonzero(np.abs(left - rgb).max(axis=2) < 0.02)[0]

    low, high = rows_of(0.0), rows_of(1.0)
    assert len(low) > 0.1 * left.shape[0] * left.shape[1] / 2 and abs(len(low) - len(high)) < 0.2 * len(low)
    assert low.max() < high.min()  # layer 0 above layer 1, nothing mixed


def test_tsne_has_one_panel_per_module_type_and_a_point_per_head(tiny_llama_factory, tmp_path, monkeypatch):
    """The t-SNE figure, caught as it is saved: one panel per adapted module type, in each a point for
    every head of every layer (tiny Llama: 2 layers x 3 heads) coloured by its head index; the PNG
    decodes to a picture of the figure's shape, at print resolution or more."""
    import matplotlib.figure
    import matplotlib.image

    saved = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real(fig, *a, **k))[1])
    model = rlora.get_peft_model(tiny_llama_factory(), RLoraConfig(r=4, num_heads=3))
    path = plot_head_tsne(model, tmp_path / "figs" / "tsne.png")
    (fig,) = saved
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]
    for ax in panels:
        (points,) = ax.collections
        assert points.get_offsets().shape == (6, 2) and list(points.get_array()) == [0, 1, 2, 0, 1, 2]
    img = matplotlib.image.imread(path)
    w, h = fig.get_size_inches()
    assert img.shape[1] / img.shape[0] == pytest.approx(w / h, rel=0.01) and img.shape[1] >= 100 * w
