"""Crash safety under kill -9 at random moments, and corrupted checkpoints caught on load.

The fault-injection test kills pretraining with SIGKILL at seeded random moments: at the named
steps of a save (checkpoint.KILL_POINTS, from inside the process, so the window is hit exactly),
twice in the same window, and after random delays from outside; every other trial with
--async-save, where the writes run in the background while training goes on. After each trial's kills a plain
rerun must finish, and its losses and every tensor of its final checkpoint must equal an
uninterrupted run bit for bit. MEGATRON_BIOMED_KILL_TRIALS sets the number of trials (10 in CI),
MEGATRON_BIOMED_KILL_SEED the seed.
"""
import glob
import os
import random
import shutil
import signal
import time

import pytest
import torch

from test_pretrain import base_args, checkpoint_tensors, finish, launch, scalars, train

from megatron_biomed.training.checkpoint import KILL_POINTS

ITERS, SAVE_EVERY, KEEP = 9, 3, 2
TRIALS = int(os.environ.get("MEGATRON_BIOMED_KILL_TRIALS", "7"))  # more: set it (CI keeps the suite < 15 min)
SEED = int(os.environ.get("MEGATRON_BIOMED_KILL_SEED", "20261125"))


def _args(dataset, run_dir, tb_name, async_save=False):
    return base_args(dataset, run_dir, iters=ITERS, save=run_dir / "ckpt", load=run_dir / "ckpt",
                     **{"save-interval": SAVE_EVERY, "hidden-dropout": 0.1, "attention-dropout": 0.1,
                        "tensorboard-dir": run_dir / tb_name, "keep-last-checkpoints": KEEP,
                        "async-save": async_save})


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    train(1, _args(dataset, run, "tb0"))
    return {"loss": scalars(run / "tb0", "train/loss"),
            "final": checkpoint_tensors(str(run / "ckpt" / f"iter_{ITERS:07d}"))}


def _reachable(ckpt, point, iteration):
    """Whether a run resumed from `ckpt` passes `point` of the save of `iteration`: it saves that
    iteration only if the latest is older, and moves an iter_N aside only if one exists."""
    latest = ckpt / "latest_checkpointed_iteration.txt"
    if latest.exists() and int(latest.read_text()) >= iteration:
        return False
    existing = (ckpt / f"iter_{iteration:07d}").exists() or (ckpt / f"iter_{iteration:07d}.old").exists()
    if point == "pruning":  # something older than the newest KEEP to delete after this save
        saved = {int(p.name[5:12]) for p in ckpt.glob("iter_*") if p.name[5:].split(".")[0].isdigit()
                 and not p.name.endswith((".tmp", ".pruned"))} | {iteration}
        return len(saved) > KEEP
    return point != "moved_aside" or existing


def _run_killed_at(args, ckpt, point, iteration):
    """One run that kills itself (SIGKILL) at `point` of the save of `iteration`; returns
    whether it was killed (a point the run never reaches lets it finish)."""
    expect_kill = _reachable(ckpt, point, iteration)
    codes, outs = finish(launch(1, args, env={"MEGATRON_BIOMED_TEST_KILL_AT": f"{point}@{iteration}"}))
    assert codes == [-signal.SIGKILL if expect_kill else 0], \
        f"exit {codes}, expected {'kill -9' if expect_kill else 0} at {point}@{iteration}\n{outs[0][-3000:]}"
    return expect_kill


def _run_killed_after(args, delay):
    """One run killed from outside `delay` seconds after it starts training (or finished by then)."""
    procs = launch(1, args)
    out = ""
    while "training iterations" not in out:
        line = procs[0].stdout.readline()
        if not line:
            break
        out += line
    time.sleep(delay)
    if procs[0].poll() is None:
        os.killpg(procs[0].pid, signal.SIGKILL)
    rest, _ = procs[0].communicate(timeout=120)
    assert procs[0].returncode in (0, -signal.SIGKILL), out + rest
    return procs[0].returncode == -signal.SIGKILL


def _plan(rng):
    """A trial: the kills to make before the clean rerun."""
    kind = rng.choice(["point", "same-window-twice", "timed"])
    iteration = rng.choice(range(SAVE_EVERY, ITERS + 1, SAVE_EVERY))
    first = rng.choice([p for p in KILL_POINTS if p != "moved_aside"])  # nothing to move aside yet
    if kind == "point":
        return kind, [("point", first, iteration)]
    if kind == "same-window-twice":  # the first kill leaves the latest older, so the rerun saves N again
        first = rng.choice(["shards_written", "manifest_written", "renamed"])
        return kind, [("point", first, iteration), ("point", rng.choice(KILL_POINTS), iteration)]
    return kind, [("timed", round(rng.uniform(0.0, 2.5), 2), None) for _ in range(rng.choice([1, 2]))]


@pytest.mark.slow
def test_kill_at_random_moments_resumes_bit_identical(dataset, reference, tmp_path):
    rng = random.Random(SEED)
    # the crash loop found by hand first: killed after iter_N is renamed, then killed again while
    # the rerun moves that iter_N aside to save it again
    plans = [("crash-loop", [("point", "renamed", 6), ("point", "moved_aside", 6)])]
    plans += [_plan(rng) for _ in range(TRIALS - 1)]
    survived, kills_made = [], 0
    for t, (kind, kills) in enumerate(plans):
        run = tmp_path / f"trial{t}"
        async_save = t % 2 == 1  # every other trial writes its checkpoints in the background (--async-save)
        kind = f"{kind}{' --async-save' if async_save else ''}"
        for k, (how, what, iteration) in enumerate(kills):
            args = _args(dataset, run, f"tb{k}", async_save)
            if how == "point":
                kills_made += _run_killed_at(args, run / "ckpt", what, iteration)
            else:
                kills_made += _run_killed_after(args, what)
        out = train(1, _args(dataset, run, f"tb{len(kills)}", async_save))
        loss = {}
        for k in range(len(kills) + 1):
            loss.update(scalars(run / f"tb{k}", "train/loss"))
        assert loss == reference["loss"], f"trial {t} {kind} {kills}: losses differ\n{out[-3000:]}"
        final = checkpoint_tensors(str(run / "ckpt" / f"iter_{ITERS:07d}"))
        assert sorted(final) == sorted(reference["final"])
        for key in final:
            assert torch.equal(final[key], reference["final"][key]), f"trial {t} {kind} {kills}: {key} differs"
        ckpt = run / "ckpt"
        assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
        # the rerun's start repaired what the kills left and finished any deletion they cut short
        leftovers = glob.glob(str(ckpt / "*.tmp")) + glob.glob(str(ckpt / "*.old")) + \
            glob.glob(str(ckpt / "*.pruned")) + glob.glob(str(ckpt / ".*.tmp"))
        assert not leftovers, leftovers
        kept = sorted(p.name for p in ckpt.glob("iter_*") if not p.name.endswith(".pt"))  # .pt: read above
        assert kept == [f"iter_{i:07d}" for i in (ITERS - SAVE_EVERY, ITERS)], kept  # --keep-last-checkpoints 2
        survived.append((kind, kills))
        shutil.rmtree(run)
    print(f"\nkill trials survived: {len(survived)}/{len(plans)} ({kills_made} kill -9s)")
    assert len(survived) == len(plans)


def _flip_byte(path, offset=None):
    size = os.path.getsize(path)
    offset = size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_corrupted_checkpoint_is_caught_and_the_run_falls_back(dataset, tmp_path):
    """One flipped byte in the newest checkpoint: --load of the run directory falls back to the
    one before, loudly; --load of that iter_N directory is an error naming the file; with
    --no-verify-checkpoint it loads."""
    args = base_args(dataset, tmp_path, iters=6, save=tmp_path / "ckpt", **{"save-interval": 3})
    train(1, args)
    ckpt = tmp_path / "ckpt"
    bad = sorted(glob.glob(str(ckpt / "iter_0000006" / "*.distcp")))[0]
    _flip_byte(bad)
    out = train(1, base_args(dataset, tmp_path, iters=8, save=ckpt, load=ckpt))
    assert f"checkpoint {ckpt}/iter_0000006 fails verification: {bad}: checksum mismatch" in out
    assert f"falling back to {ckpt}/iter_0000003, the newest checkpoint that verifies" in out
    assert "training iterations 4..8" in out
    # the rerun saved iteration 8 (and replaced nothing it should not): the bad 6 is still there
    out = train(1, base_args(dataset, tmp_path, iters=8, load=ckpt / "iter_0000006"), expect=1)
    assert out.strip().splitlines()[-1].startswith(f"error: {bad}: checksum mismatch")
    assert "Traceback" not in out
    out = train(1, base_args(dataset, tmp_path, iters=7, load=ckpt / "iter_0000006",
                             **{"no-verify-checkpoint": True}))
    assert "training iterations 7..7" in out


def test_nan_after_loading_a_bad_checkpoint_does_not_call_it_good(dataset, tmp_path):
    """A flipped exponent bit in a checkpoint without a manifest (as an older version wrote):
    the NaN message must not name the checkpoint that was just loaded as the last good one."""
    ckpt = tmp_path / "ckpt"
    train(1, base_args(dataset, tmp_path, iters=6, save=ckpt, **{"save-interval": 3}))
    d = ckpt / "iter_0000006"
    os.remove(d / "manifest.json")
    from megatron_biomed.checkpoint.metadata import read_dcp_metadata
    meta = read_dcp_metadata(str(d / ".metadata"))
    # the exponent of the first float of the position embedding (used by every step): all ones
    info = next(v for k, v in meta.storage_data.items() if k.fqn == "model.wpe.weight")
    with open(d / str(info.relative_path), "rb") as f:
        raw = f.read()
    # torch.save'd tensor storage: find the bytes of the tensor inside the shard's slice
    t = checkpoint_tensors(str(d))["model.wpe.weight"]
    first = t.reshape(-1)[:4].numpy().tobytes()
    pos = raw.index(first, info.offset)
    with open(d / str(info.relative_path), "r+b") as f:
        f.seek(pos + 2)
        f.write(bytes([raw[pos + 2] | 0x80, 0x7f]))  # little-endian fp32: exponent all ones, inf/nan
    out = train(1, base_args(dataset, tmp_path, iters=9, save=ckpt, load=ckpt, **{"save-interval": 3}), expect=1)
    assert "has no manifest.json (saved by an older version)" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: loss is nan at iteration 7") or last.startswith("error: gradient norm"), last
    assert "the last good checkpoint is" not in last
    assert f"started from {d}, which may itself be bad; to go back further pass --load {ckpt}/iter_0000003" in last


def test_keep_last_checkpoints_prunes_only_after_a_newer_save(dataset, tmp_path):
    """--keep-last-checkpoints 2 --keep-every 4 over saves at 1..9: 4, 8 and the newest two
    stay; a kill in the middle of a deletion is finished by the next start; the checkpoint the
    latest file names is kept even when it is not among the newest (a run killed after saving
    a newer one it never recorded)."""
    ckpt = tmp_path / "ckpt"
    args = base_args(dataset, tmp_path, iters=9, save=ckpt, load=ckpt,
                     **{"save-interval": 1, "keep-last-checkpoints": 2, "keep-every": 4})
    codes, outs = finish(launch(1, args, env={"MEGATRON_BIOMED_TEST_KILL_AT": "pruning@7"}))
    assert codes == [-signal.SIGKILL], outs[0][-3000:]
    names = sorted(p.name for p in ckpt.glob("iter_*"))
    assert names == ["iter_0000004", "iter_0000005.pruned", "iter_0000006", "iter_0000007"], names
    out = train(1, args)
    assert f"removed {ckpt}/iter_0000005.pruned" in out
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000008", "iter_0000009"]
    assert "deleted checkpoint(s) 7 (--keep-last-checkpoints 2, --keep-every 4)" in out

    from megatron_biomed.checkpoint.layout import prunable
    (ckpt / "latest_checkpointed_iteration.txt").write_text("4\n")
    assert prunable(str(ckpt), keep_last=1) == [8]  # 4 is the latest, 9 the newest
