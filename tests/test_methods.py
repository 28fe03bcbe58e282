"""PEFT's own methods as run adapters (adapter.method): built from the typed schema, trained a few
steps on the tiny model, saved, reloaded strictly on a fresh base, scored by the eval harness."""

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config.loading import ConfigError
from pipeline.config.run import load_run_config

ROOT = Path(__file__).resolve().parents[1]

PEFT_METHODS = ["lora", "dora", "adalora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"]
PROMPT_METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning"]
METHODS = [*PEFT_METHODS, "full"]  # full fine-tuning: every weight of the base trains, saved whole
STEPS = 6
# small enough for the tiny model; AdaLoRA prunes from rank 6 to 2 within the 6 steps (tinit 1, tfinal 2)
SECTIONS = {"lora": {"r": 4, "lora_alpha": 8}, "dora": {"r": 4, "lora_alpha": 8},
            "adalora": {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1},
            "ia3": {"feedforward_modules": ["down_proj"]}, "prompt_tuning": {"num_virtual_tokens": 4},
            "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16}, "prefix_tuning": {"num_virtual_tokens": 4},
            "full": {}}


def run_cfg(method, **train):
    over = [f"adapter.method={method}", "adapter.target_modules=[q_proj,v_proj,down_proj]",
            f"train.steps={train.get('steps', STEPS)}"]
    over += [f"adapter.{method}.{k}={v}" for k, v in SECTIONS[method].items()]
    return load_run_config(None, [o.replace("'", "") for o in over])


def batch_of(tok, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tok) - 10, (n, 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_steps(model, tok, steps):
    from pipeline.model import adapters

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(1, steps + 1):
        model(**batch_of(tok, seed=step)).loss.backward()
        opt.step()
        adapters.after_optimizer_step(model, step)
        opt.zero_grad(set_to_none=True)
    return model.eval()


def logits(model, ids):
    """The logits of ``ids``' own positions (prompt and P-tuning also return their virtual tokens')."""
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -ids.shape[1]:]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Each method trained STEPS steps and saved: {method: (adapter dir, logits of the trained model)}."""
    from pipeline.model import adapters
    from pipeline.model.base import load_model

    out, ids = {}, torch.arange(5, 37)[None]
    for method in METHODS:
        cfg = run_cfg(method)
        base, tok = load_model(str(tiny_model_dir))
        torch.manual_seed(0)
        model = train_steps(adapters.build(base, cfg.adapter, cfg.train.steps), tok, cfg.train.steps)
        d = tmp_path_factory.mktemp(method)
        model.save_pretrained(d)
        out[method] = (d, logits(model, ids), model)
    return out, ids


@pytest.mark.parametrize("method", METHODS)
def test_trained_adapter_reloads_exactly_on_a_fresh_base(method, trained, tiny_model_dir):
    from pipeline.model import adapters
    from pipeline.model.base import load_model

    out, ids = trained
    d, expected, model = out[method]
    base, _ = load_model(str(tiny_model_dir))
    assert not torch.allclose(logits(base, ids), expected, atol=1e-4)  # training moved the model
    torch.manual_seed(12345)  # a different RNG state than the trained adapter's init
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        reloaded = adapters.load(base, d)
    # nothing tells the user that part of the adapter was ignored (PEFT says so of AdaLoRA's ranks, wrongly)
    assert not [str(w.message) for w in seen if "ignored" in str(w.message)]
    if method == "adalora":  # pruned ranks are zeros in the trained model and absent from the reload:
        # the same sum in another order (measured max |diff| 6e-8)
        torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-6, rtol=0)
    else:
        assert torch.equal(logits(reloaded, ids), expected)
    if method == "full":  # its weights went into a copy: the base it was given is untouched
        untouched, _ = load_model(str(tiny_model_dir))
        assert torch.equal(logits(base, ids), logits(untouched, ids))
        assert not any(p.requires_grad for p in reloaded.parameters())
    if method == "adalora":  # the budget was allocated: ranks were pruned, and the reload has the pruned shapes
        pattern = model.peft_config["default"].rank_pattern
        assert pattern and any(sum(m) < SECTIONS["adalora"]["init_r"] for m in pattern.values())
        shapes = {k: v.shape[0] for k, v in load_file(str(d / "adapter_model.safetensors")).items() if "lora_A" in k}
        assert min(shapes.values()) < SECTIONS["adalora"]["init_r"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpoint_restore_puts_the_trained_weights_back(method, trained, tiny_model_dir):
    """What a resumed training run does with its checkpoint's ``adapter`` directory: the model it
    builds afresh gets every trained tensor back (the adapter's, or for full fine-tuning the whole model's)."""
    from pipeline.model import adapters
    from pipeline.model.base import load_model

    out, ids = trained
    d, expected, model = out[method]
    base, _ = load_model(str(tiny_model_dir))
    torch.manual_seed(999)
    fresh = adapters.build(base, run_cfg(method).adapter, STEPS)
    assert not torch.equal(logits(fresh, ids), expected)
    adapters.restore(fresh, d)
    assert torch.equal(logits(fresh, ids), expected)
    trained_state = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(v, trained_state[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("at", [3, 5])
def test_an_adalora_run_resumed_after_its_rank_allocation_ends_where_the_uninterrupted_run_ends(at, tiny_model_dir, tmp_path):
    """A run resumed from a checkpoint written after AdaLoRA allocated ranks (save_pretrained then
    writes the cut-down matrices; training goes on at full rank) continues through the final
    allocation to the same weights, rank pattern and saved adapter as the run that never stopped."""
    from pipeline.model import adapters
    from pipeline.model.base import load_model
    from pipeline.train.checkpoints import restore_checkpoint
    from pipeline.train.checkpoints import save_checkpoint as save_checkpoint
    from pipeline.train.request import lr_schedule

    cfg = run_cfg("adalora")  # 6 steps: ranks allocated at steps 2-3, fixed at 4, masked at 5-6; stopped at `at`

    def fresh(seed):
        base, tok = load_model(str(tiny_model_dir))
        torch.manual_seed(seed)
        model = adapters.build(base, cfg.adapter, STEPS)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        return model, tok, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(1, STEPS))

    def steps(model, tok, opt, sched, first, last):  # the training loop's order of calls
        model.train()
        for step in range(first, last + 1):
            torch.manual_seed(step)
            model(**batch_of(tok, seed=step)).loss.backward()
            opt.step()
            adapters.after_optimizer_step(model, step)
            sched.step()
            opt.zero_grad(set_to_none=True)

    whole = fresh(0)
    steps(*whole, 1, STEPS)
    part = fresh(0)
    steps(*part, 1, at)
    save_checkpoint(part[0], part[2], part[3], at, tmp_path / "ckpt", final=False)
    assert part[0].peft_config["default"].rank_pattern  # ranks were allocated before the checkpoint
    resumed = fresh(7)  # a new process: another init, nothing of the first part in memory
    assert restore_checkpoint(resumed[0], resumed[2], resumed[3], tmp_path / "ckpt") == at
    steps(*resumed, at + 1, STEPS)

    want, got = whole[0].state_dict(), resumed[0].state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # (PEFT's save_pretrained drops the adapter name from the pattern's keys: the checkpoint's has none)
    pattern = [{k.replace(".default", ""): v for k, v in m[0].peft_config["default"].rank_pattern.items()}
               for m in (whole, resumed)]
    assert pattern[0] == pattern[1]
    whole[0].save_pretrained(tmp_path / "whole")
    resumed[0].save_pretrained(tmp_path / "resumed")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert min(v.shape[0] for k, v in a.items() if "lora_A" in k) < SECTIONS["adalora"]["init_r"]


def test_an_adalora_checkpoint_without_its_training_state_is_refused_in_one_line(trained, tiny_model_dir):
    """The cut-down adapter directory alone (a checkpoint written before the fix, or a final
    adapter passed as one) would put the wrong shapes, or with a shape check silently no allocator
    state, into the resumed run: refused, naming why."""
    from pipeline.model import adapters
    from pipeline.model.base import load_model

    out, _ = trained
    base, _ = load_model(str(tiny_model_dir))
    fresh = adapters.build(base, run_cfg("adalora").adapter, STEPS)
    with pytest.raises(adapters.AdapterLoadError, match="AdaLoRA checkpoint without its full-rank training state") as e:
        adapters.restore(fresh, out["adalora"][0])
    assert "\n" not in str(e.value)
    state = adapters.training_state(out["adalora"][2])
    state["adalora"]["weights"].popitem()
    with pytest.raises(adapters.AdapterLoadError, match="does not match this model's adapter: base_model"):
        adapters.restore(fresh, out["adalora"][0], state)


def test_trainable_parameter_counts_from_the_layer_shapes(trained, tiny_model_dir):
    from pipeline.model import adapters
    from pipeline.model.base import load_model

    out, _ = trained
    # tiny model: q_proj 64->64, v_proj 64->32 (2 kv heads x 16), down_proj 128->64, 2 layers
    shapes = [(64, 64), (64, 32), (128, 64)]
    lora = adapters.trainable(out["lora"][2])
    assert lora["trainable_params"] == 2 * sum(4 * (i + o) for i, o in shapes)  # r = 4: A (r x in), B (out x r)
    ia3 = adapters.trainable(out["ia3"][2])  # a scale per output, on the feed-forward module per input
    assert ia3["trainable_params"] == 2 * (64 + 32 + 128)
    n_base = sum(p.numel() for p in out["ia3"][2].parameters()) - ia3["trainable_params"]
    assert ia3["trainable_pct"] == pytest.approx(100 * ia3["trainable_params"] / n_base)
    # prompt tuning: 4 virtual token embeddings of width 64; prefix tuning: a key and a value of width
    # 2 kv heads x 16 per virtual token and layer
    assert adapters.trainable(out["prompt_tuning"][2])["trainable_params"] == 4 * 64
    assert adapters.trainable(out["prefix_tuning"][2])["trainable_params"] == 4 * 2 * 2 * 32
    # full fine-tuning: every parameter of the base (the tied embedding once), 100 % of it
    base, _ = load_model(str(tiny_model_dir))
    full = adapters.trainable(out["full"][2])
    assert full == {"trainable_params": sum(p.numel() for p in base.parameters()), "trainable_pct": 100.0}


def test_ab_matrices_read_off_the_built_layers(trained, tiny_model_dir):
    """The paper's Table 3 "A/B" column from the model itself: one shared A and a B per head for
    R-LoRA and HydraLoRA, one of each for LoRA, DoRA and AdaLoRA, none for IA³."""
    import rlora
    from pipeline.model import adapters
    from pipeline.model.base import load_model

    out, _ = trained
    got = {m: adapters.ab_matrices(out[m][2]) for m in METHODS}
    assert got == {"lora": "1/1", "dora": "1/1", "adalora": "1/1", "ia3": None,
                   "prompt_tuning": None, "p_tuning": None, "prefix_tuning": None, "full": None}
    for preset, heads, expected in [("rlora", 3, "1/3"), ("hydralora", 2, "1/2"), ("lora", 1, "1/1")]:
        base, _ = load_model(str(tiny_model_dir))
        model = rlora.get_peft_model(base, rlora.RLoraConfig.from_preset(preset, r=4, num_heads=heads))
        assert adapters.ab_matrices(model) == expected, preset


def test_lora_moe_trains_and_reloads_exactly_through_the_pipeline_schema(tiny_model_dir, tmp_path):
    """adapter.method: lora_moe builds N independent LoRA experts under the router (this project's
    tuner, per-head A), trains, and reloads on a fresh base under another RNG state exactly."""
    from pipeline.model import adapters
    from pipeline.model.base import load_model

    cfg = load_run_config(None, ["adapter.method=lora_moe", "adapter.num_heads=3", "adapter.r=4",
                                 "adapter.target_modules=[q_proj,v_proj,down_proj]"])
    assert cfg.adapter.label == "lora_moe-N3-r4"
    resolved = adapters.resolved(cfg.adapter)
    assert (resolved["down_projection"], resolved["head_init"], resolved["correction"]) == ("per_head", "zero", "none")
    base, tok = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    model = train_steps(adapters.build(base, cfg.adapter), tok, STEPS)
    assert adapters.ab_matrices(model) == "3/3"
    from rlora.analysis import head_similarity

    assert head_similarity(model) == {}  # experts with their own A_i: no B_i cosine (README)
    ids = torch.arange(5, 37)[None]
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    fresh, _ = load_model(str(tiny_model_dir))
    assert not torch.allclose(logits(fresh, ids), expected, atol=1e-4)
    torch.manual_seed(12345)
    assert torch.equal(logits(adapters.load(fresh, tmp_path), ids), expected)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "prefix_tuning", "full"])
def test_missing_or_mis_shaped_tensor_is_refused_naming_it(method, trained, tiny_model_dir, tmp_path):
    from pipeline.model import adapters
    from pipeline.model.base import load_model

    d = trained[0][method][0]
    weights, config = ((adapters.FULL_WEIGHTS, "config.json") if method == "full"
                       else ("adapter_model.safetensors", "adapter_config.json"))
    tensors = load_file(str(d / weights))
    key = sorted(tensors)[len(tensors) // 2]
    extra = {**tensors, "model.layers.9.mlp.gate_proj.weight": tensors[key].clone()}
    for name, broken in (("missing", {k: v for k, v in tensors.items() if k != key}),
                         ("mis-shaped", {**tensors, key: torch.cat([tensors[key], tensors[key]], 0)}),
                         ("unexpected", extra if method == "full" else None)):
        if broken is None:
            continue
        bad = tmp_path / name
        bad.mkdir()
        (bad / config).write_text((d / config).read_text())
        save_file(broken, str(bad / weights))
        base, _ = load_model(str(tiny_model_dir))
        with pytest.raises(adapters.AdapterLoadError) as e:
            adapters.load(base, bad)
        named = "model.layers.9" if name == "unexpected" else key.rsplit(".", 2)[0].split("base_model.model.")[-1]
        assert named in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(adapters.AdapterLoadError, match="neither an adapter"):
        adapters.load(load_model(str(tiny_model_dir))[0], tmp_path)


@pytest.mark.parametrize("over, msg", [
    (["adapter.method=lora", "adapter.lora.rr=4"], "adapter.lora: rr: not a field of peft.LoraConfig"),
    (["adapter.method=lora", "adapter.lora.r=four"], "adapter.lora: r: Input should be a valid integer"),
    (["adapter.ia3.use_dora=true"], "adapter.ia3: use_dora: not a field of peft.IA3Config"),
    (["adapter.method=dora", "adapter.dora.use_dora=false"], "adapter.dora: use_dora: set by the pipeline"),
    (["adapter.method=lora", "adapter.lora.task_type=SEQ_CLS"], "adapter.lora: task_type: set by the pipeline"),
    (["adapter.method=adalora", "adapter.adalora.tinit=30", "adapter.adalora.tfinal=20", "train.steps=50"], "adapter.adalora: The supplied schedule"),
    (["adapter.method=prefix"], "adapter.method: Input should be"),
])
def test_bad_method_fields_are_one_line_naming_the_field(over, msg):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, over)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


def test_method_sections_apply_only_to_their_method():
    cfg = load_run_config(None, ["adapter.method=lora", "adapter.lora.r=16", "adapter.dora.r=2",
                                 "adapter.adalora.init_r=3", "train.steps=100"])
    peft_cfg = cfg.adapter.to_peft(cfg.train.steps)
    assert type(peft_cfg).__name__ == "LoraConfig" and peft_cfg.r == 16 and not peft_cfg.use_dora
    assert cfg.adapter.label == "lora-r16"
    dora = load_run_config(None, ["adapter.method=dora", "adapter.dora.r=2", "adapter.lora.r=16"]).adapter.to_peft()
    assert dora.use_dora and dora.r == 2
    ada = load_run_config(None, ["adapter.method=adalora", "train.steps=77"])
    assert ada.adapter.to_peft(ada.train.steps).total_step == 77  # the schedule follows train.steps
    assert load_run_config(None, []).adapter.method == "rlora"


def test_eval_harness_scores_peft_adapters_and_unloads_them(trained, tiny_model_dir):
    from eval.harness import EvalJob, EvalSettings, Evaluator
    from pipeline.model.base import load_model

    out, ids = trained
    ev = Evaluator(EvalSettings(model=str(tiny_model_dir), tasks=("rlora_heldout_sst2",), limit=8), device="cpu")
    fresh, _ = load_model(str(tiny_model_dir))
    results = {m: ev.evaluate(EvalJob(m, str(out[m][0]))) for m in ("lora", "ia3", *PROMPT_METHODS, "full")}
    assert all(r["error"] is None and "heldout/sst2" in r["scores"] for r in results.values()), results
    assert torch.equal(logits(ev.base, ids), logits(fresh, ids))  # the base is back, bit for bit
    for m in ("ia3", "full"):  # scored the same after other jobs as alone: nothing leaked between jobs
        alone = Evaluator(ev.settings, device="cpu").evaluate(EvalJob(m, str(out[m][0])))
        assert alone["scores"] == results[m]["scores"], m
    # the full fine-tune was scored with its own weights: its per-question log-likelihoods are not the base's
    base_res = ev.evaluate(EvalJob("base", None))
    gold = {name: r["examples"].set_index("example_id")["gold_logprob"] for name, r in (("base", base_res), *results.items())}
    assert (gold["full"] - gold["base"]).abs().min() > 1e-3 and (gold["ia3"] - gold["base"]).abs().min() > 1e-6


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_virtual_tokens_are_not_scored(method, trained, tiny_model_dir):
    """The training loop's held-out scorer and the eval harness (lm-eval) score a prompt- or P-tuned
    model exactly as the base model scores the input behind the learned virtual token embeddings,
    spelled out here with ``inputs_embeds``; each with its own tokenisation of (context, choice)."""
    from eval.harness import EvalSettings, Evaluator
    from pipeline.data.tasks import task_splits
    from pipeline.model import adapters
    from pipeline.model.base import load_model
    from pipeline.model.scoring import score_choices

    out, _ = trained
    base, tok = load_model(str(tiny_model_dir))
    model = adapters.load(base, out[method][0]).eval()
    with torch.no_grad():
        prompts = model.get_prompt(batch_size=1)  # (1, V, hidden): PEFT's learned virtual tokens
    embed = base.get_input_embeddings()

    def reference(ctx: list[int], cont: list[int]) -> float:
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lg = base(inputs_embeds=torch.cat([prompts, embed(ids)], 1)).logits[0, prompts.shape[1]:]
        lp = torch.log_softmax(lg[:-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        return lp[len(ctx) - 1:].sum().item()

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    held = task_splits("sst2")[1][:6]
    rows = score_choices(model, tok, held, batch_size=4)
    for row, ex in zip(rows, held):  # the pipeline's convention: context and choice tokenised apart
        assert row["choice_logprobs"] == pytest.approx([reference(enc(ex.prompt), enc(c)) for c in ex.choices],
                                                       abs=1e-4)
    ev = Evaluator(EvalSettings(model=str(tiny_model_dir), tasks=("rlora_heldout_sst2",), limit=6, num_fewshot=0),
                   device="cpu")
    res = ev.run(str(out[method][0]), log_samples=True)
    samples = res["samples"]["rlora_heldout_sst2"]
    assert len(samples) == 6
    for x in samples:  # lm-eval's convention: the choice's tokens are the whole's after the context's
        expected = [reference(enc(ctx), enc(ctx + cont)[len(enc(ctx)):]) for ctx, cont in x["arguments"]]
        assert [v[0] for v in x["filtered_resps"]] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_adalora_trains_through_ray_train_with_its_budget_schedule(tmp_path, tiny_model_dir, local_ray):
    """pipeline.train with a PEFT method, for real (2 DDP workers on the module's local Ray, MLflow):
    AdaLoRA's schedule follows train.steps, its ranks are allocated inside the loop, and the logged
    adapter reloads strictly."""
    from test_train import only_run, write_yaml

    from pipeline.config.run import load_run_config
    from pipeline.model import adapters
    from pipeline.model.base import load_model
    from pipeline.train.driver import run_training

    cfg = write_yaml(tmp_path, tiny_model_dir, adapter={
        "method": "adalora", "target_modules": ["q_proj", "v_proj"],
        "adalora": {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1}})
    run_training(load_run_config(cfg, []), str(cfg), quiet=True)
    client, run, _ = only_run(tmp_path)
    p, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and tags["rlora.method"] == "adalora" and run.info.run_name == "adalora-r6"
    assert p["resolved.peft.peft_type"] == "ADALORA" and p["resolved.peft.total_step"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/mean_acc")] == [0, 4, 8]
    d = client.download_artifacts(run.info.run_id, "adapter", str(tmp_path))
    import json
    from pathlib import Path

    pattern = json.loads((Path(d) / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and sum(map(sum, pattern.values())) < 6 * len(pattern)  # ranks were pruned in the loop
    base, _ = load_model(str(tiny_model_dir))
    model = adapters.load(base, d)
    assert type(model.base_model).__name__ == "AdaLoraModel"


def test_method_fields_are_search_dimensions(tmp_path, tiny_model_dir):
    from test_sweep import sweep_yaml

    from pipeline.config.sweep import load_sweep_config

    ok = {"adapter.method": {"choice": ["rlora", "lora", "ia3"]}, "adapter.lora.r": {"choice": [2, 4]}}
    cfg = load_sweep_config(sweep_yaml(tmp_path, tiny_model_dir, search=ok))
    assert set(cfg.search) == set(ok)
    for key, msg in (("adapter.lora.rr", "search.adapter.lora.rr: not a run config field"),
                     ("adapter.dora.use_dora", "search.adapter.dora.use_dora: not a run config field")):
        with pytest.raises(ConfigError) as e:
            load_sweep_config(sweep_yaml(tmp_path, tiny_model_dir, search={key: {"choice": [1]}}))
        assert str(e.value).startswith(msg), str(e.value)
    with pytest.raises(ConfigError) as e:  # every value is checked against PEFT's type hints
        load_sweep_config(sweep_yaml(tmp_path, tiny_model_dir, search={"adapter.lora.r": {"choice": [4, "x"]}}))
    assert "search.adapter.lora.r: value 'x' is invalid" in str(e.value), str(e.value)


def test_whole_adapter_sections_are_one_search_dimension(tmp_path, tiny_model_dir):
    """search.adapter with mappings as values (a baselines grid: each method with its own fields):
    each value is merged into the base adapter, checked like a full run config, and grid-only."""
    from test_sweep import sweep_yaml

    from pipeline.config.sweep import load_sweep_config
    from pipeline.sweep.space import trial_run_config

    grid = [{"method": "rlora", "preset": "hydralora"}, {"method": "lora", "lora": {"r": 24}}, {"method": "lora_moe"}]
    path = sweep_yaml(tmp_path, tiny_model_dir, search={"adapter": {"grid": grid}}, tune={"search_alg": "grid"})
    cfg = load_sweep_config(path)
    base = cfg.base.model_dump(mode="json")
    built = [trial_run_config(base, {"adapter": v}, {"experiment": "e", "trial_name": "t"}).adapter for v in grid]
    assert [a.label for a in built] == ["hydralora-N2-r4", "lora-r24", "lora_moe-N2-r4"]
    assert all(a.target_modules == cfg.base.adapter.target_modules for a in built)  # the rest of the base kept
    bad = [{"method": "lora", "lora": {"rr": 24}}]
    with pytest.raises(ConfigError) as e:
        load_sweep_config(sweep_yaml(tmp_path, tiny_model_dir, search={"adapter": {"grid": bad}}, tune={"search_alg": "grid"}))
    assert "search.adapter: value" in str(e.value) and "rr: not a field of peft.LoraConfig" in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:
        load_sweep_config(sweep_yaml(tmp_path, tiny_model_dir, search={"adapter": {"choice": grid}}))
    assert "need tune.search_alg: grid" in str(e.value), str(e.value)


@pytest.mark.slow
def test_one_method_per_trial_sweep_end_to_end(tmp_path, tiny_model_dir, local_ray):
    """adapter.method as the search dimension: each trial trains its method in its trial's process
    (in this process's sweep, on the module's local Ray), its section's fields apply to it alone, and
    the eval stage scores and registers every adapter; the baselines report reads the sweep back."""
    from test_sweep import mlflow_runs, sweep_here, sweep_yaml

    from pipeline.model import adapters
    from pipeline.model.base import load_model

    # one dimension over whole adapter sections; lora's r from the grid, its lora_alpha from the base
    search = {"adapter": {"grid": [{"method": "rlora"}, {"method": "lora", "lora": {"r": 3}}, {"method": "ia3"},
                                   {"method": "lora_moe"}, {"method": "prompt_tuning"}, {"method": "prefix_tuning"},
                                   {"method": "full"}]}}
    path = sweep_yaml(tmp_path, tiny_model_dir, search=search,
                      tune={"num_samples": 1, "search_alg": "grid", "max_concurrent_trials": 2,
                            "train_in_trial": True},  # every method in reused trial processes, one after another
                      eval_={"top_k": 7, "tasks": ["heldout_sst2"], "limit": 4, "include_base": False,
                             "registry_name": "t-methods"})
    data = __import__("yaml").safe_load(path.read_text())
    data["base"]["adapter"].update({"target_modules": ["q_proj", "v_proj", "down_proj"],
                                    "lora": {"r": 5, "lora_alpha": 10}, "ia3": {"feedforward_modules": ["down_proj"]},
                                    "prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4}})
    path.write_text(__import__("yaml").safe_dump(data))
    out = sweep_here(path)
    assert out["summary"]["done"] == 7 and len(out["eval"]["rows"]) == 7
    client, parents, children = mlflow_runs(tmp_path)
    by_method = {c.data.tags["rlora.method"]: c for c in children}
    assert set(by_method) == {"rlora", "lora", "ia3", "lora_moe", "prompt_tuning", "prefix_tuning", "full"} and all(c.info.status == "FINISHED" for c in children)
    assert by_method["lora"].data.params["resolved.peft.r"] == "3"  # its own section, nobody else's
    assert by_method["lora"].data.params["resolved.peft.lora_alpha"] == "10"  # merged into the base section
    assert by_method["lora"].data.params["adapter.trainable_params"] == str(2 * 3 * (128 + 96 + 192))
    assert by_method["rlora"].data.params["resolved.rlora.r"] == "4"
    base, _ = load_model(str(tiny_model_dir))
    n_base = sum(p.numel() for p in base.parameters())
    assert by_method["full"].data.params["adapter.trainable_params"] == str(n_base)  # every weight trained
    assert float(by_method["full"].data.params["adapter.trainable_pct"]) == 100.0
    # no early stopping: trial actors are reused (7 trials, 2 at a time, in fewer than 7 processes),
    # and a method trained after another in the same process is still only itself (checks above)
    assert len({c.data.tags["ray.driver_pid"] for c in children}) < 7
    versions = client.search_model_versions("name = 't-methods'")
    assert len(versions) == 7
    # the trials table and the eval stage's comparison show each trial's % params and A/B matrices
    import pandas as pd

    parent = parents[0].info.run_id
    trials = pd.read_csv(client.download_artifacts(parent, "trials/trials.csv", str(tmp_path / "t")), dtype=str)
    comparison = pd.read_csv(client.download_artifacts(parent, "eval/comparison.csv", str(tmp_path / "c")), dtype=str)
    heads = by_method["rlora"].data.params["resolved.rlora.num_heads"]
    for method, ab in [("rlora", f"1/{heads}"), ("lora", "1/1"), ("ia3", "–"), ("lora_moe", f"{heads}/{heads}"),
                       ("prompt_tuning", "–"), ("prefix_tuning", "–"), ("full", "–")]:
        run = by_method[method]
        pct = f"{float(run.data.params['adapter.trainable_pct']):.3g}"
        trial = trials[trials["mlflow_run"] == run.info.run_id].iloc[0]
        assert (trial["% params"], trial["A/B"]) == (pct, ab), method
        row = comparison[comparison["run_id"] == run.info.run_id].iloc[0]
        assert (row["% params"], row["A/B"]) == (pct, ab), method
    lora_run = by_method["lora"].info.run_id  # the section as the trials table's cell, the label in the comparison
    assert trials[trials["mlflow_run"] == lora_run].iloc[0]["adapter"] == "method=lora, lora.r=3"
    assert comparison[comparison["run_id"] == lora_run].iloc[0]["adapter"] == "lora-r3"
    # the baselines report (Tables 2/3 layout) from this sweep: a row per adapter with the run's own
    # held-out score, % params, A/B and median training throughput, each compared with R-LoRA
    import statistics

    from eval.reproduce import main as reproduce

    assert reproduce([str(path), "--table", "baselines", "--from-sweep", parent, "--out", str(tmp_path / "rep")]) == 0
    report = pd.read_csv(tmp_path / "rep" / "baselines.csv", dtype=str).set_index("adapter")
    assert "reproduce/baselines.csv" in {a.path for a in client.list_artifacts(parent, "reproduce")}
    reference = by_method["rlora"].data.tags["rlora.adapter"]
    for method, run in by_method.items():
        row = report.loc[run.data.tags["rlora.adapter"]]
        m, p = run.data.metrics, run.data.params
        assert row["Avg"].startswith(f"{100 * m['eval/mean_acc']:.1f} ± "), method
        ab = "–" if method in ("ia3", *PROMPT_METHODS, "full") else p["adapter.ab_matrices"]
        assert (row["% params"], row["A/B"]) == (f"{float(p['adapter.trainable_pct']):.3g}", ab), method
        tps = statistics.median(h.value for h in client.get_metric_history(run.info.run_id, "train/tokens_per_s"))
        assert row["tokens/s"] == f"{tps:.0f}", method
        peak = [h.value for h in client.get_metric_history(run.info.run_id, "train/peak_mem_gb")]
        assert len(peak) == 2 and 0.2 < peak[0] <= peak[1] < 64, method  # at each eval step, never falling
        assert row["peak mem (GiB)"] == f"{peak[1]:.2f}", method
        if method == "rlora":
            assert row["Δ vs R-LoRA"] == "–"
        else:  # a paired difference with its interval, or the same examples' outcomes (+0.0 [+0.0, +0.0])
            assert row["Δ vs R-LoRA"].startswith(("+", "-")) and "[" in row["Δ vs R-LoRA"], method
    assert reference in report.index
    for method, run in by_method.items():
        assert "heldout/sst2" in client.get_run(run.info.run_id).data.metrics, method  # scored by the eval stage
        d = client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / method))
        base, _ = load_model(str(tiny_model_dir))
        loaded = adapters.load(base, d)
        if method == "full":  # its own weights, every one of them moved by training
            assert adapters.is_full(loaded)
            assert all(not torch.equal(a, b) for a, b in zip(loaded.parameters(), base.parameters()) if a.dim() == 2)
            continue
        peft_type = loaded.peft_config["default"].peft_type
        expected = "RLORA" if method in ("rlora", "lora_moe") else method.upper()
        assert str(peft_type.value if hasattr(peft_type, "value") else peft_type) == expected
