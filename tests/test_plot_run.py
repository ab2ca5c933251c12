"""tools/plot_run.py: a run's curves from its TensorBoard events, one run or several."""
import base64
import re

from conftest import run_tool
from test_pretrain import base_args, train


def test_plots_a_run_against_tokens_seen_and_compares_runs(dataset, tmp_path):
    from megatron_biomed.plot_run import read_scalars
    runs = []
    for name, lr in (("lr3e-3", 3e-3), ("lr1e-3", 1e-3)):
        run = tmp_path / name
        train(1, base_args(dataset, run, iters=6, lr=lr, **{"eval-iters": 1, "eval-interval": 3,
                                                             "tensorboard-dir": run / "tensorboard"}))
        runs.append(run)
    series = read_scalars(str(runs[0] / "tensorboard"))
    assert series["train/tokens_seen"] == {i: 8 * 32 * i for i in range(1, 7)}  # global batch 8 x 32 tokens
    r = run_tool("plot_run", runs[0], check=0)
    assert r.stdout.strip() == (f"1 run(s), panels: loss, perplexity, learning rate, throughput -> "
                                f"{runs[0] / 'curves.png'}, {runs[0] / 'curves.html'}")
    png = (runs[0] / "curves.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    page = (runs[0] / "curves.html").read_text()
    assert base64.b64encode(png).decode() in page  # the same figure, self-contained
    assert re.search(r"<tr><td>lr3e-3</td><td>6</td><td>1536</td>", page)
    r = run_tool("plot_run", *runs, "--output", tmp_path / "both.png", check=0)
    assert r.stdout.startswith("2 run(s)") and (tmp_path / "both.png").stat().st_size > 0
    assert "<td>lr1e-3</td>" in (tmp_path / "both.html").read_text()


def test_bad_run_directories_are_one_line(tmp_path):
    r = run_tool("plot_run", tmp_path / "nowhere")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {tmp_path / 'nowhere'}: no such directory; give a run directory (its --save or --tensorboard-dir)")
    (tmp_path / "empty").mkdir()
    r = run_tool("plot_run", tmp_path / "empty")
    assert r.returncode == 1 and r.stderr.strip().startswith(f"error: {tmp_path / 'empty'}: no TensorBoard events")
    r = run_tool("plot_run", tmp_path / "empty", tmp_path / "empty", "--labels", "one")
    assert r.returncode == 1 and "--labels: 1 names for 2 runs" in r.stderr
    assert not list(tmp_path.glob("**/*.png"))
