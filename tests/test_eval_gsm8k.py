"""GSM8K as an lm-eval task (the single-task track): lm-eval's own prompt, answer extraction and
exact match, on the training task's held-out split, run through lm-eval with a model whose answers
are known, so each filter's verdict is checked against what it must be."""

import json

import pytest

from pipeline.data import data_dir

N = 6


def gsm8k_rows(split="test"):
    with open(data_dir() / "gsm8k" / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


class CannedLM:
    """An lm-eval LM that answers each GSM8K question with ``answer(gold)``; it records the prompts."""

    def __new__(cls, answer):
        from lm_eval.api.model import LM

        class _LM(LM):
            def __init__(self):
                super().__init__()
                gold = {r["question"]: r["answer"] for r in gsm8k_rows()}
                self.answer, self.gold, self.contexts = answer, gold, []

            def generate_until(self, requests, disable_tqdm=False):
                out = []
                for req in requests:
                    context, _ = req.args
                    self.contexts.append(context)
                    question = context.rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]
                    out.append(self.answer(self.gold[question]))
                return out

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _LM()


def evaluate(answer):
    import lm_eval

    from eval.harness import STDERR_BOOTSTRAP_ITERS, task_manager

    lm = CannedLM(answer)
    res = lm_eval.simple_evaluate(model=lm, tasks=["rlora_gsm8k"], limit=N, task_manager=task_manager(),
                                  log_samples=True, bootstrap_iters=STDERR_BOOTSTRAP_ITERS, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    return res, lm


def final(gold: str) -> str:
    return gold.split("#### ")[-1].strip()


@pytest.mark.parametrize("name, answer, strict, flexible", [
    # the reference solution itself: "... #### 18"
    ("gold", lambda g: " " + g, 1.0, 1.0),
    # the right number without the "####" marker: only the flexible filter (last number) finds it
    ("unmarked", lambda g: f" She makes {final(g)} dollars.", 0.0, 1.0),
    # a wrong number in the marked form: both filters extract it, exact match says no
    ("wrong", lambda g: f" #### {int(final(g).replace(',', '')) + 1}", 0.0, 0.0),
])
def test_lm_eval_extraction_and_exact_match_on_the_held_out_split(name, answer, strict, flexible):
    from eval.results import flatten_scores, lmeval_examples

    res, lm = evaluate(answer)
    m = res["results"]["rlora_gsm8k"]
    assert (m["exact_match,strict-match"], m["exact_match,flexible-extract"]) == (strict, flexible), m
    # the held-out split is the training task's test.jsonl, in file order; 5 exemplars from train.jsonl
    questions = [r["question"] for r in gsm8k_rows()[:N]]
    asked = [c.rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0] for c in lm.contexts]
    assert sorted(asked) == sorted(questions)
    train = {r["question"] for r in gsm8k_rows("train")}
    for c in lm.contexts:
        shots = [s.split("\nAnswer:")[0] for s in c.split("Question: ")[1:-1]]
        assert len(shots) == 5 and all(s in train for s in shots)
    # the pipeline's score: flexible-extract, with lm-eval's standard error, and a row per question
    scores = flatten_scores(res["results"])
    assert scores["gsm8k/avg"] == flexible
    assert scores["gsm8k/avg_stderr"] == pytest.approx(m["exact_match_stderr,flexible-extract"])
    table = lmeval_examples(res["samples"])
    assert len(table) == N and set(table["task"]) == {"gsm8k/avg"} and table["correct"].mean() == flexible


def test_task_file_is_lm_evals_gsm8k_config():
    """rlora_gsm8k is lm-eval's installed gsm8k config, field for field, except where the data
    comes from (and its name): regenerating it changes nothing."""
    from pathlib import Path

    import lm_eval
    import yaml

    from eval.generate_tasks import TASKS, _Loader

    ours = yaml.load((TASKS / "gsm8k" / "rlora_gsm8k.yaml").read_text(), Loader=_Loader)
    stock = yaml.load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text(), Loader=_Loader)
    local_only = {"task", "task_alias", "custom_dataset"}
    stock_only = {"tag", "task", "dataset_path", "dataset_name"}
    assert {k: v for k, v in ours.items() if k not in local_only} == {k: v for k, v in stock.items() if k not in stock_only}


def test_eval_harness_generates_and_scores_gsm8k_with_its_standard_error(tiny_model_dir):
    """The eval stage's path (HFLM generation on a real model, ``gsm8k`` as eval.tasks names it):
    every question gets an exact-match verdict and the score comes with lm-eval's standard error."""
    from eval.harness import EvalJob, EvalSettings, Evaluator
    from eval.task_names import resolve_tasks

    settings = EvalSettings(model=str(tiny_model_dir), tasks=tuple(resolve_tasks(["gsm8k"], "local")), limit=3,
                            gen_kwargs="max_gen_toks=4")
    res = Evaluator(settings, device="cpu").evaluate(EvalJob("base"))
    assert res["error"] is None, res["error"]
    assert set(res["scores"]) == {"gsm8k/avg", "gsm8k/avg_stderr"}, res["scores"]
    assert res["examples"]["correct"].isin([0.0, 1.0]).all() and len(res["examples"]) == 3
    assert res["n_samples"] == {"rlora_gsm8k": 3}


@pytest.mark.slow
def test_single_task_sweep_ranks_on_answer_nll_over_seeds_and_scores_gsm8k(tmp_path, tiny_model_dir, local_ray,
                                                                           capsys):
    """sweeps/single_task.yaml as shipped, made small: two methods trained on GSM8K alone with 2
    seeds each (in their trials' processes, in this process's sweep on the module's local Ray),
    ranked on the seed-mean held-out answer NLL (lower is better) with its standard error, then
    generated and scored by the eval stage on rlora_gsm8k."""
    import math

    from test_sweep import ROOT, mlflow_runs

    from pipeline.config.sweep import load_sweep_config
    from pipeline.sweep.driver import run_sweep

    over = {"base.model": str(tiny_model_dir), "base.data.train_per_task": 16, "base.data.eval_per_task": 4,
            "base.data.max_length": 96, "base.train.steps": 3, "base.train.batch_size": 2, "base.train.eval_every": 3,
            "base.train.warmup_steps": 1, "base.scaling.max_failures": 0,
            "base.mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "base.mlflow.experiment": "sweeps",
            "base.output_dir": str(tmp_path / "out"), "search.adapter.grid": "[{method: rlora}, {method: full}]",
            "tune.max_concurrent_trials": 2, "eval.top_k": 2, "eval.include_base": "false", "eval.limit": 2,
            "eval.tasks": "[gsm8k]", "eval.gen_kwargs": "max_gen_toks=4", "eval.registry_name": "t-single",
            "tune.train_in_trial": "true"}
    path = str(ROOT / "sweeps" / "single_task.yaml")
    capsys.readouterr()
    out = run_sweep(load_sweep_config(path, [f"{k}={v}" for k, v in over.items()]), path)
    assert "eval/gsm8k/answer_nll_stderr; there is no paired test" in capsys.readouterr().out
    client, parents, children = mlflow_runs(tmp_path)
    trials = [c for c in children if c.data.tags.get("rlora.trial_id") and "/" not in c.data.tags["rlora.trial_id"]]
    assert {c.data.tags["rlora.method"] for c in trials} == {"rlora", "full"}
    for t in trials:
        seeds = [client.get_run(r) for r in t.data.tags["rlora.seed_runs"].split(",")]
        per_seed = [s.data.metrics["eval/gsm8k/answer_nll"] for s in seeds]
        assert len(per_seed) == 2 and all(s.data.metrics["eval/gsm8k/answer_nll_stderr"] > 0 for s in seeds)
        m = t.data.metrics
        assert m["eval/gsm8k/answer_nll"] == pytest.approx(sum(per_seed) / 2)
        assert m["eval/gsm8k/answer_nll_stderr"] > 0 and not math.isnan(m["eval/gsm8k/answer_nll_stderr"])
        assert {"gsm8k/avg", "gsm8k/avg_stderr"} <= set(m)  # the eval stage generated and scored it
    best = min(trials, key=lambda t: t.data.metrics["eval/gsm8k/answer_nll"])  # mode: min
    parent = parents[0]
    assert parent.data.tags["best_trial"] == best.data.tags["rlora.trial_id"]
    se = best.data.metrics["eval/gsm8k/answer_nll_stderr"]
    assert parent.data.metrics["sweep/best_eval_gsm8k_answer_nll_stderr"] == pytest.approx(se)
    assert out["best"]["eval/gsm8k/answer_nll"] == pytest.approx(best.data.metrics["eval/gsm8k/answer_nll"])
    assert len(client.search_model_versions("name = 't-single'")) == 2
