"""--eval-tasks: downstream QA scored during pretraining, with the model as it is in memory in
any layout, equal item by item to tools/evaluate.py on the checkpoint saved at that iteration."""
import json

import pytest

from conftest import read_jsonl, run_tool, write_jsonl
from test_pretrain import base_args, scalars, train


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tensor-model-parallel-size": 2}, {"pipeline-model-parallel-size": 2},
                                    {"eval-tasks-shots": 2}], ids=["tp2", "pp2", "dp2-2shot"])
def test_in_loop_scores_equal_evaluate_on_the_saved_checkpoint(dataset, trained_tokenizer, tmp_path, layout):
    from megatron_biomed.data import synthetic
    dev = write_jsonl(tmp_path / "dev.json", synthetic.medmcqa_like(10, 3))
    run = tmp_path / "run"
    args = base_args(dataset, run, iters=4, **layout, **{
        "save": run / "ckpt", "save-interval": 2, "merge-file": trained_tokenizer / "merges.txt",
        "eval-tasks": f"medmcqa={dev}", "eval-tasks-interval": 2, "eval-tasks-limit": 8, "num-layers": 2})
    out = train(2, args)
    assert " medmcqa at iteration 2 | acc " in out and " medmcqa at iteration 4 | acc " in out, out[-3000:]
    acc = scalars(run / "tb", "tasks/medmcqa/acc")
    if "tensor-model-parallel-size" in layout:  # the run's curves show the task beside the loss
        r = run_tool("plot_run", run / "tb", "--output", tmp_path / "curves.png", check=0)
        assert "panels: loss, perplexity, learning rate, throughput, downstream tasks" in r.stdout
    assert sorted(acc) == [2, 4] and sorted(scalars(run / "tb", "tasks/medmcqa/acc_norm")) == [2, 4]
    assert len(read_jsonl(run / "ckpt" / "eval_tasks" / "iter_0000002.jsonl")) == 8  # --eval-tasks-limit
    for it in (4,):  # the final weights (two updates on): the layout's round-off has had time to show
        in_loop = read_jsonl(run / "ckpt" / "eval_tasks" / f"iter_{it:07d}.jsonl")
        assert len(in_loop) == 8
        run_tool("evaluate", "--load", run / "ckpt" / f"iter_{it:07d}", "--task", "medmcqa", "--data", dev,
                 "--limit", 8, "--num-fewshot", layout.get("eval-tasks-shots", 0), "--vocab-file", trained_tokenizer / "vocab.json", "--merge-file",
                 trained_tokenizer / "merges.txt", "--output", tmp_path / f"eval{it}.jsonl",
                 "--metrics-file", tmp_path / f"eval{it}.json", check=0)
        offline = read_jsonl(tmp_path / f"eval{it}.jsonl")
        for a, b in zip(in_loop, offline):
            assert a["id"] == b["id"] and a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)
            assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
        metrics = json.loads((tmp_path / f"eval{it}.json").read_text())
        assert acc[it] == pytest.approx(metrics["acc"]["accuracy"])
