"""Head-similarity analysis (paper Fig. 2/5): mean pairwise cosine similarity of the heads
B_i of every R-LoRA layer, a heatmap across layers and a t-SNE of the heads. Only layers whose
heads share one A: with an A_i per head (LoRA-MoE) the B_i live in different bases, and their
cosine says nothing about how alike the experts' updates are."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from .layer import RLoraLayer

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def mean_pairwise_cosine(heads: torch.Tensor) -> float:
    """Mean cosine similarity over all unordered pairs of rows of ``heads`` (N, ...)."""
    n = heads.shape[0]
    if n < 2:
        raise ValueError(f"heads: need at least 2 heads for a pairwise similarity, got {n}")
    flat = torch.nn.functional.normalize(heads.detach().double().reshape(n, -1), dim=1)
    sim = flat @ flat.T
    iu = torch.triu_indices(n, n, offset=1)
    return float(sim[iu[0], iu[1]].mean())


def _shares_down(module: RLoraLayer, adapter_name: str) -> bool:
    return module.rlora_A[adapter_name].shape[0] == module.rlora_settings[adapter_name].r


def _short_name(name: str) -> tuple[int, str]:
    m = _LAYER_INDEX.search(name)
    return (int(m.group(1)) if m else -1), name.rsplit(".", 1)[-1]


def head_similarity(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Module name -> mean pairwise cosine similarity of its flattened heads B_i."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, RLoraLayer) and adapter_name in module.rlora_B:
            if module.rlora_settings[adapter_name].num_heads > 1 and _shares_down(module, adapter_name):
                out[name] = mean_pairwise_cosine(module.head_weights(adapter_name))
    return out


def similarity_summary(sims: dict[str, float]) -> dict[str, float]:
    """Mean similarity overall and per module type (q_proj, ..., down_proj)."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for name, v in sims.items():
        by_type[_short_name(name)[1]].append(v)
    summary = {f"head_cos/{k}": sum(v) / len(v) for k, v in sorted(by_type.items())}
    if sims:
        summary["head_cos/mean"] = sum(sims.values()) / len(sims)
    return summary


def plot_head_similarity(sims: dict[str, float], path: str | Path, title: str = "") -> Path:
    """Heatmap: rows are transformer layers, columns module types; cell = mean pairwise cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sims:
        raise ValueError("sims: no multi-head R-LoRA layers to plot")
    cells = {_short_name(n): v for n, v in sims.items()}
    layers = sorted({k[0] for k in cells})
    types = list(dict.fromkeys(_short_name(n)[1] for n in sims))  # order of first appearance
    grid = torch.full((len(layers), len(types)), float("nan"))
    for (layer, typ), v in cells.items():
        grid[layers.index(layer), types.index(typ)] = v
    fig, ax = plt.subplots(figsize=(1.1 * len(types) + 2, 0.28 * len(layers) + 1.8))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=min(0.0, float(grid.nan_to_num(1).min())), vmax=1.0)
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_ylabel("layer")
    mean = sum(sims.values()) / len(sims)
    ax.set_title(title or f"head cosine similarity (mean {mean:.3f})")
    fig.colorbar(im, ax=ax, label="mean pairwise cosine of B_i")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_head_tsne(model: torch.nn.Module, path: str | Path, adapter_name: str = "default", seed: int = 0) -> Path:
    """t-SNE of all heads, one panel per module type (heads of one type share a shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    groups: dict[str, list[torch.Tensor]] = defaultdict(list)
    head_ids: dict[str, list[int]] = defaultdict(list)
    for name, module in model.named_modules():
        if isinstance(module, RLoraLayer) and adapter_name in module.rlora_B and _shares_down(module, adapter_name):
            heads = module.head_weights(adapter_name).detach().float().reshape(module.rlora_settings[adapter_name].num_heads, -1)
            typ = _short_name(name)[1]
            groups[typ].extend(heads)
            head_ids[typ].extend(range(heads.shape[0]))
    groups = {k: v for k, v in groups.items() if len(v) >= 3}
    if not groups:
        raise ValueError("model: needs at least 3 heads of one module type for a t-SNE")
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), squeeze=False)
    for ax, (typ, heads) in zip(axes[0], groups.items()):
        x = torch.stack(heads).numpy()
        perplexity = max(1.0, min(30.0, (len(x) - 1) / 3))
        emb = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="random").fit_transform(x)
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=head_ids[typ], cmap="tab10", s=14)
        ax.set_title(typ)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes[0].tolist(), label="head index")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
