"""The pretraining loop: data, optimizer step, logging, evaluation, checkpoints, signals.

Exit codes: 0 finished (or --exit-interval reached), 75 saved and stopped early on SIGTERM /
SIGUSR1 / --exit-duration-in-mins (requeue the job and it resumes), 76 a collective failed
because another rank died or stopped answering (requeue the job: it resumes from the last
checkpoint), 1 a failure (NaN loss, bad data), 2 a bad setting.
"""
import datetime
import dataclasses
import math
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
import yaml

from megatron_biomed.arguments import model_config, parallel_config
from megatron_biomed.config import LayoutError
from megatron_biomed.checkpoint import run_lock
from megatron_biomed.checkpoint.run_lock import check_apart
from megatron_biomed.model.gpt import flops_per_token
from megatron_biomed.parallel import mesh as M
from megatron_biomed.parallel.parallelize import ParallelGPT
from megatron_biomed.training import checkpoint as C
from megatron_biomed.training.arguments import SETTINGS, ConfigError, effective_config, parse_args, run_settings
from megatron_biomed.training.data import build_datasets, get_batch
from megatron_biomed.training.metrics import Metrics, peak_memory_gb, peak_tflops
from megatron_biomed.training.optimizer import LossScaler, build_optimizer, set_lr
from megatron_biomed.training.schedule import BatchSchedule, LRSchedule
from megatron_biomed.utils import atomic_output, print0
from megatron_biomed.errors import UserError, entry_point, report

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: saved and stopped early; slurm/ scripts requeue on it
# Written into --save beside the checkpoints on such an exit, for launchers that do not pass the
# exit code on (torchrun): slurm/pretrain_biomedlm.sbatch requeues when it is there.
RESUMABLE_MARKER = "resumable_exit.txt"
EXIT_LOST_RANK = 76
# On exit 76 each surviving rank writes <--save>/collective_failure/rank_<r>.txt, one line:
# "<rank> <world> <last finished iteration> <host of every rank, comma-separated> <what failed>"; the ranks
# that wrote none are the lost ones, and slurm/pretrain_biomedlm.sbatch names them and their nodes.
FAILURE_DIR = "collective_failure"
# What gloo (and NCCL) say when the rank at the other end died or stopped answering.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
              "timed out", "Watchdog caught collective operation timeout", "NCCL communicator was aborted")


class TrainingError(UserError, RuntimeError):
    pass


class _Signals:
    """SIGTERM / SIGUSR1 (and --exit-signal) set a flag; the loop finishes its step, saves and exits."""

    def __init__(self, extra=None):
        self.received = None
        for sig in {signal.SIGTERM, signal.SIGUSR1, *([signal.Signals(extra)] if extra else [])}:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def _test_pause_hook():
    """Fault injection for the kill-during-save test: rank 0 stops inside the save of the
    iteration named by MEGATRON_BIOMED_TEST_PAUSE_IN_SAVE, after its shards are written and
    before the checkpoint is made complete, so that the test can kill -9 it there."""
    target = os.environ.get("MEGATRON_BIOMED_TEST_PAUSE_IN_SAVE")
    if not target:
        return None

    def hook(iteration):
        if iteration == int(target) and dist.get_rank() == 0:
            print(f"test hook: paused inside the save of iteration {iteration}", flush=True)
            time.sleep(3600)
    return hook


class Trainer:
    def __init__(self, args):
        self.args = args
        if args.deterministic_mode:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
            torch.use_deterministic_algorithms(True)
        self.device = M.init_distributed(timeout_minutes=args.distributed_timeout_minutes)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.model_config = model_config(args)
        if args.use_checkpoint_args:
            self.model_config = self._checkpoint_model_config()
        self.parallel = parallel_config(args)
        self.parallel.validate(self.model_config, self.world)
        self.mesh = M.build_mesh(self.parallel, self.device.type)
        self.dp_rank, self.dp = self.mesh["dp"].get_local_rank(), self.mesh["dp"].size()
        self.gbs = self.parallel.global_batch_size or self.parallel.micro_batch_size * self.dp
        self.batches = BatchSchedule(self.gbs, self.parallel.micro_batch_size, self.dp, args.rampup_batch_size,
                                     args.decrease_batch_size_if_needed)
        self._check_ramp()
        if args.train_samples is not None:  # Megatron's update_train_iters
            args.train_iters = self.batches.iterations_for(args.train_samples)
            args._derived.append("train_iters")
            print0(f"--train-samples {args.train_samples}: {args.train_iters} iterations")
        self.lr_schedule = LRSchedule(args, self.gbs)
        self.layout = {"tp": self.parallel.tensor_model_parallel_size, "pp": self.parallel.pipeline_model_parallel_size,
                       "dp": self.dp, "sequence_parallel": self.parallel.sequence_parallel,
                       "vpp": self.parallel.num_layers_per_virtual_pipeline_stage,
                       "sharding": self.parallel.data_parallel_sharding}
        config = effective_config(args)
        for field in vars(self.model_config):  # shown resolved, under "model"
            config.pop(field, None)
        config.update(model=dict(preset=args.model, **vars(self.model_config)), layout=self.layout,
                      global_batch_size=self.gbs)
        self.config = config
        self.settings = _plain(run_settings(args, self.model_config))
        print0("effective config (--config of " + (os.path.join(args.save, SETTINGS) if args.save else "a file of this")
               + " runs it again):\n" + yaml.safe_dump(self.settings, sort_keys=True).rstrip()
               + f"\nlayout: {self.layout}")
        self._claim_save_dir()

        self.model = ParallelGPT(self.model_config, self.parallel, self.mesh, self.device, seed=args.seed,
                                 param_dtype=torch.bfloat16 if args.bf16 else None, compile=args.compile)
        if args.compile and self.model.compile_problem:
            print0(f"warning: --compile: torch.compile cannot run here ({self.model.compile_problem}); "
                   f"training without it")
        self.model.autocast_dtype = torch.float16 if args.fp16 else None
        self.optimizer = build_optimizer(self.model, args, self.device)
        self.scaler = LossScaler(args.initial_loss_scale, args.min_loss_scale, args.loss_scale_window,
                                 args.hysteresis, args.loss_scale) if args.fp16 else None
        # last_saved: the newest checkpoint of the current weights (loaded or saved); last_good:
        # the newest this run saved after steps with a finite loss, which a NaN message may name.
        self.iteration, self.last_saved, self.last_good, self.loaded_from = 0, None, None, None
        # --async-save: checkpoint writes get a gloo group of their own (collectives in the writing
        # thread never interleave with the training thread's); one save in flight at a time
        self.async_group = dist.new_group(backend="gloo") if args.async_save and args.save else None
        self.pending_save = None
        if args.save:
            C.clean_stale(args.save, args.keep_last_checkpoints, args.keep_every)
        self._load()
        eod = args.eod_id if args.eod_id is not None else self.model_config.vocab_size - 1
        self.train_ds, self.valid_ds, self.test_ds = build_datasets(
            args, self.model_config.vocab_size, eod, self.gbs, self.model_config.seq_length,
            train_samples=self.batches.consumed(args.train_iters))
        self.task_eval = self._task_eval() if args.eval_tasks else None
        wandb = None
        if args.wandb_project:
            wandb = dict(project=args.wandb_project, name=args.wandb_exp_name, entity=args.wandb_entity,
                         dir=args.wandb_save_dir or os.path.join(args.save or ".", "wandb"), config=self.settings)
        self.metrics = Metrics(args.tensorboard_dir, self.rank, yaml.safe_dump(_plain(config)), wandb=wandb)
        self.profiler = None
        self.hosts = [None] * self.world  # each rank's host, to name the slowest one in the log
        dist.all_gather_object(self.hosts, socket.gethostname())
        self.flops_per_token = flops_per_token(self.model_config, self.parallel.tensor_model_parallel_size)
        self.peak = peak_tflops(args, self.device)
        self._report_memory_plan()

    def _check_ramp(self):
        """Every global batch of a --rampup-batch-size ramp must suit the layout, as the full one does."""
        if not self.batches.ramping:
            return
        for size in self.batches.sizes():
            try:
                dataclasses.replace(self.parallel, global_batch_size=size).validate(self.model_config, self.world)
            except LayoutError as e:
                raise ConfigError(f"--rampup-batch-size {' '.join(map(str, self.args.rampup_batch_size))}: the ramp's "
                                  f"global batch of {size}: {e}") from None
        print0(f"batch size ramp-up: global batch {' -> '.join(map(str, self.batches.sizes()))} over the first "
               f"{self.batches.ramp_samples} samples")

    def _report_memory_plan(self):
        """The planner's peak memory for this layout, and a warning before an out-of-memory."""
        if self.device.type != "cuda":
            return
        from megatron_biomed import planner as P
        lay = P.Layout.of(self.parallel, self.dp, self.gbs, self.model_config.recompute_granularity,
                          P.precision_of(self.args))
        need = P.gib(sum(P.memory(self.model_config, lay).values()))
        have = torch.cuda.get_device_properties(self.device).total_memory / P.GIB
        print0(f"memory plan: {need:.1f} GiB per GPU predicted of {have:.1f} GiB (tools/plan_run.py)")
        if need > have - P.RESERVED_GIB:
            print0(f"warning: this layout is predicted to need {need:.1f} GiB per GPU, more than the "
                   f"{have:.1f} GiB there; expect an out-of-memory error: lower --micro-batch-size or use "
                   f"--recompute-granularity full (python tools/plan_run.py --gpus {self.world} lists layouts that fit)")

    # -- checkpoints ------------------------------------------------------------------------
    def _claim_save_dir(self):
        """Collective, before any work: --save is apart from --load, writable and this run's alone
        (rank 0 holds its lock until the process ends); the run's settings are written there."""
        a = self.args
        check_apart(a.load, a.save, allow_same=True)
        _refuse_foreign_load(a.load)
        error = None
        if a.save and self.rank == 0:
            try:
                run_lock.acquire(a.save, tool="training run")
                with atomic_output(os.path.join(a.save, SETTINGS), "w") as f:
                    f.write(f"# the settings of the run in {os.path.abspath(a.save)} (written at its start); "
                            f"pass this file as --config to run it again\n")
                    yaml.safe_dump(self.settings, f, sort_keys=True)
            except (OSError, UserError) as e:
                error = e
        C.agree(error)

    def _checkpoint_model_config(self):
        from megatron_biomed.config import config_from_dict
        a = self.args
        if not a.load:
            raise ConfigError("--use-checkpoint-args needs --load")
        saved = config_from_dict(C.saved_model_config(a.load))
        cfg = saved.replace(attention_backend=self.model_config.attention_backend,
                            recompute_granularity=self.model_config.recompute_granularity)
        if a.vocab_file and a.vocab_size != cfg.vocab_size:
            raise ConfigError(f"--vocab-file {a.vocab_file} has {a.vocab_size} tokens, the checkpoint's model "
                              f"{cfg.vocab_size}")
        return cfg

    def _load(self):
        a = self.args
        if not a.load or C.read_latest(a.load) is None:
            if a.load and a.exit_on_missing_checkpoint:
                raise ConfigError(f"--load {a.load}: no checkpoint there (--exit-on-missing-checkpoint); check the "
                                  f"path, or leave the flag out to start from scratch")
            if a.load:
                print0(f"no checkpoint in --load {a.load}: starting from scratch")
            return
        t0 = time.time()
        finetune = a.finetune
        got = C.load(a.load, self.model, self.optimizer, self.scaler, self.layout,
                     load_optim=not (a.no_load_optim or finetune), load_rng=not (a.no_load_rng or finetune),
                     verify=not a.no_verify_checkpoint)
        iteration, consumed, meta, self.loaded_from = got
        self.model.sync_params()
        if not finetune:
            if iteration > a.train_iters:
                raise ConfigError(f"--train-iters {a.train_iters}: the checkpoint loaded ({self.loaded_from}) is "
                                  f"at iteration {iteration}, so nothing would be trained; raise --train-iters "
                                  f"above {iteration}, or pass --finetune to start again from iteration 0")
            self.iteration = iteration
            if consumed != self.batches.consumed(iteration):
                raise ConfigError(f"--load {a.load}: the checkpoint consumed {consumed} samples in {iteration} "
                                  f"iterations, these flags {self.batches.consumed(iteration)}; resume with the "
                                  f"same --global-batch-size and --rampup-batch-size ({self.gbs} and "
                                  f"{a.rampup_batch_size} given)")
            self.last_saved = iteration
        saved_layout = meta.get("layout")
        note = "" if saved_layout == self.layout else f" (saved as {saved_layout}, resharded to {self.layout})"
        print0(f"loaded checkpoint {self.loaded_from} in {time.time() - t0:.1f} s{note}")

    def save(self):
        a = self.args
        self.wait_for_save()
        print0(f"saving checkpoint at iteration {self.iteration} to {a.save}")
        result = C.save(a.save, self.iteration, self.model, self.optimizer, self.scaler, _plain(self.config),
                        self.batches.consumed(self.iteration), self.layout, kill_hook=_test_pause_hook(),
                        keep_last=a.keep_last_checkpoints, keep_every=a.keep_every, async_group=self.async_group)
        self.last_saved = self.iteration
        if isinstance(result, C.PendingSave):
            self.pending_save = result
            print0(f"  staged in memory in {result.staged_seconds:.2f} s; writing in the background")
        else:
            print0(f"  saved {C.iteration_dir(a.save, self.iteration)} in {result:.1f} s")
            self.last_good = self.iteration

    def wait_for_save(self):
        """Wait for the --async-save in flight, if any (every rank alike); raises its error."""
        pending, self.pending_save = self.pending_save, None
        if pending is None:
            return
        seconds = pending.wait()
        print0(f"  saved {C.iteration_dir(self.args.save, pending.iteration)} in {seconds:.1f} s (in the background)")
        self.last_good = max(self.last_good or 0, pending.iteration)

    # -- steps ------------------------------------------------------------------------------
    def train_step(self, tokens, targets):
        model, opt = self.model, self.optimizer
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            model.loss_scale = self.scaler.scale
        loss = model.forward_backward(tokens.to(self.device), targets.to(self.device))
        model.reduce_gradients()
        if self.scaler is not None:
            model.scale_gradients(1.0 / self.scaler.scale)
        norm = model.grad_norm()
        if self.args.log_num_zeros_in_grad:
            self.last_grad_zeros = model.grad_zeros()
        finite = bool(torch.isfinite(norm))
        if self.scaler is not None:
            self.scaler.update(not finite)
            if not finite:  # overflow: skip this step at a smaller scale
                opt.zero_grad(set_to_none=True)
                return loss, norm, True
        elif not finite and math.isfinite(float(loss)):
            raise TrainingError(f"gradient norm is {float(norm)} at iteration {self.iteration + 1}; "
                                f"stopping{self._last_good()}")
        model.clip_gradients(self.args.clip_grad, norm)
        opt.step()
        model.sync_params()
        return loss, norm, False

    def evaluate(self, dataset, index, name):
        a = self.args
        total = 0.0
        for j in range(a.eval_iters):
            tokens, targets = get_batch(dataset, (index * a.eval_iters + j) * self.gbs, self.gbs, self.dp_rank,
                                        self.dp)
            total += float(self.model.evaluate(tokens.to(self.device), targets.to(self.device)))
        loss = total / a.eval_iters
        ppl = math.exp(min(20.0, loss))
        print0(f" {name} loss at iteration {self.iteration} | lm loss: {loss:.6E} | lm loss PPL: {ppl:.6E}")
        self.metrics.scalars(self.iteration, **{f"{name}/loss": loss, f"{name}/ppl": ppl})
        self.metrics.flush()
        return loss

    def _task_eval(self):
        from megatron_biomed.data.tokenizer import load_tokenizer
        from megatron_biomed.training.task_eval import TaskEval
        a = self.args
        merges = a.merge_file or (os.path.join(os.path.dirname(a.vocab_file), "merges.txt") if a.vocab_file else None)
        if not a.vocab_file or not merges or not os.path.isfile(merges):
            raise ConfigError("--eval-tasks: the items are tokenized with the run's tokenizer: give --vocab-file and "
                              "--merge-file (or keep merges.txt beside vocab.json)")
        tok = load_tokenizer("GPT2BPETokenizer", a.vocab_file, merges)
        return TaskEval(a.eval_tasks, tok, self.model_config.seq_length, a.eval_tasks_limit, a.eval_tasks_shots,
                        seed=a.seed)

    def score_tasks(self):
        """--eval-tasks with the weights as they are now: TensorBoard scalars, one log line per task."""
        start = time.time()
        results = self.task_eval.run(self.model, self.dp_rank, self.dp, self.parallel.micro_batch_size, self.device)
        self.metrics.scalars(self.iteration, **self.task_eval.scalars(results))
        for task, (summary, _) in results.items():
            print0(f" {task} at iteration {self.iteration} | acc {summary['acc']['accuracy']:.4f} | acc_norm "
                   f"{summary['acc_norm']['accuracy']:.4f} | n {summary['acc']['n']} | {time.time() - start:.1f} s")
        if self.args.save and self.rank == 0:
            self.task_eval.write(results, self.args.save, self.iteration)
        return results

    def _last_good(self):
        """Where to resume from after a non-finite loss: never the checkpoint this run started
        from, which may be what went wrong."""
        if self.last_good is not None:
            return (f"; the last good checkpoint is {C.iteration_dir(self.args.save, self.last_good)}, saved after "
                    f"finite steps")
        if self.loaded_from is None:
            return "; no checkpoint was saved"
        root = os.path.dirname(os.path.abspath(self.loaded_from))
        earlier = [i for i in C.L.complete_iterations(root) if i < C.L.iteration_of(self.loaded_from)]
        hint = (f"; to go back further pass --load {C.iteration_dir(root, earlier[0])}" if earlier else "")
        return (f"; this run saved no checkpoint and started from {self.loaded_from}, which may itself be "
                f"bad{hint}")

    def _stop_requested(self, signals, start):
        a = self.args
        over = a.exit_duration_in_mins is not None and (time.time() - start) / 60 >= a.exit_duration_in_mins
        writing = self.pending_save is not None and not self.pending_save.done()
        flag = torch.tensor([1.0 if signals.received else 0.0, 1.0 if over else 0.0, 1.0 if writing else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same iteration
        if self.pending_save is not None and flag[2] == 0:  # written on every rank: report it now
            self.wait_for_save()
        if flag[0] > 0:
            return f"received {signals.received or 'a signal (on another rank)'}"
        if flag[1] > 0:
            return f"--exit-duration-in-mins {a.exit_duration_in_mins} reached"
        return None

    # -- loop -------------------------------------------------------------------------------
    def train(self, signals):
        a = self.args
        start = time.time()
        if a.save and self.rank == 0 and os.path.exists(os.path.join(a.save, RESUMABLE_MARKER)):
            os.remove(os.path.join(a.save, RESUMABLE_MARKER))
        interval = {"loss": 0.0, "n": 0, "skipped": 0, "t": time.time(), "iters": 0, "samples": 0}
        first = self.batches.batch_size(self.batches.consumed(self.iteration))
        ramp = f" (ramping up to {self.gbs})" if first < self.gbs else ""
        if a.distributed_timeout_minutes:
            print0(f"collectives time out after {M.collective_timeout_minutes():g} min (--distributed-timeout-minutes)")
        print0(f"training iterations {self.iteration + 1}..{a.train_iters}: global batch {first}{ramp} x "
               f"{self.model_config.seq_length} tokens, {self.model.num_stages} pipeline stage(s), world {self.world}, "
               f"{torch.get_num_threads()} CPU thread(s) per process")
        self.model.train(True)
        self.start_iteration = self.iteration
        while self.iteration < a.train_iters:
            self._profile()
            consumed = self.batches.consumed(self.iteration)
            batch = self.batches.batch_size(consumed)
            lr = self.lr_schedule.lr(consumed)
            set_lr(self.optimizer, lr, self.lr_schedule.weight_decay(consumed))
            tokens, targets = get_batch(self.train_ds, consumed, batch, self.dp_rank, self.dp)
            loss, norm, skipped = self.train_step(tokens, targets)
            self.iteration += 1
            if a.distributed_timeout_seconds_after_init and self.iteration == self.start_iteration + 1:
                self._shorten_collective_timeout(a.distributed_timeout_seconds_after_init)
            reducer = self.model.grad_reducer
            if reducer is not None and self.iteration == 1:
                print0(f"--overlap-grad-reduce: {reducer.overlapped} of {len(reducer.buckets)} gradient buckets "
                       f"were already being reduced when backward returned")
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise TrainingError(f"loss is {loss_value} at iteration {self.iteration}; stopping{self._last_good()}")
            interval["loss"] += loss_value
            interval["n"] += 1
            interval["iters"] += 1
            interval["samples"] += batch
            interval["skipped"] += int(skipped)
            # tokens seen: the x axis of tools/plot_run.py (batch sizes vary under --rampup-batch-size)
            self.metrics.scalars(self.iteration, **{"train/loss": loss_value, "train/tokens_seen": float(
                self.batches.consumed(self.iteration) * self.model_config.seq_length)})
            if self.iteration % a.log_interval == 0 or self.iteration == a.train_iters:
                self._log(interval, lr, float(norm), batch)
                interval = {"loss": 0.0, "n": 0, "skipped": 0, "t": time.time(), "iters": 0, "samples": 0}
            if a.eval_iters and self.iteration % a.eval_interval == 0 and self.valid_ds is not None:
                self.evaluate(self.valid_ds, self.iteration // a.eval_interval - 1, "validation")
            if self.task_eval is not None and self.iteration % (a.eval_tasks_interval or a.eval_interval) == 0:
                self.score_tasks()
            reason = self._stop_requested(signals, start)
            if a.save and a.save_interval and self.iteration % a.save_interval == 0:
                self.save()
            if reason:
                if a.save and self.last_saved != self.iteration:
                    self.save()
                self.wait_for_save()
                print0(f"{reason}: stopping at iteration {self.iteration}"
                        f"{' (checkpoint saved; resume with --load)' if a.save else ' (no --save: nothing saved)'}")
                if a.save and self.rank == 0:
                    with open(os.path.join(a.save, RESUMABLE_MARKER), "w") as f:
                        f.write(f"{self.iteration} {reason}\n")
                return EXIT_RESUMABLE
            if a.exit_interval and self.iteration % a.exit_interval == 0:
                if a.save and self.last_saved != self.iteration:
                    self.save()
                self.wait_for_save()
                print0(f"--exit-interval {a.exit_interval} reached at iteration {self.iteration}")
                return 0
        self._profile(end=True)
        if a.save and self.last_saved != self.iteration:
            self.save()
        self.wait_for_save()
        if a.eval_iters:
            if self.valid_ds is not None and self.iteration % a.eval_interval:
                self.evaluate(self.valid_ds, self.iteration // a.eval_interval, "validation")
            if self.test_ds is not None:
                self.evaluate(self.test_ds, 0, "test")
        return 0

    def _shorten_collective_timeout(self, seconds):
        """--distributed-timeout-seconds-after-init, as Megatron applies it: once the first
        iteration (and its slow setup) is done, every training process group waits at most this
        long. The checkpoint writers' group keeps its timeout: a large shard may take longer."""
        dist.barrier()
        for group in list(dist.distributed_c10d._world.pg_map):
            if group is not self.async_group:
                dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)
        print0(f"collectives time out after {seconds} s from iteration {self.iteration + 1} on "
               f"(--distributed-timeout-seconds-after-init)")

    def report_collective_failure(self, error):
        """A collective failed because a peer is gone: one line per node, and this rank's record
        for the job script (which names the ranks that left none)."""
        what = _peer_lost(error)
        at = self.iteration  # the last finished iteration; the failure came in the next one or its save
        if int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))) == 0:
            print(f"error: rank {self.rank} ({self.hosts[self.rank]}): a collective failed after iteration {at}: {what}: "
                  f"another rank died or stopped answering; exiting with code {EXIT_LOST_RANK} so the job is "
                  f"requeued and resumes from the last checkpoint", file=sys.stderr, flush=True)
        if self.args.save:
            d = os.path.join(self.args.save, FAILURE_DIR)
            os.makedirs(d, exist_ok=True)
            with atomic_output(os.path.join(d, f"rank_{self.rank}.txt"), "w") as f:
                f.write(f"{self.rank} {self.world} {at} {','.join(self.hosts)} {what}\n")

    def _profile(self, end=False):
        """--profile: a torch.profiler trace of iterations --profile-step-start..--profile-step-end
        (counted as the log counts them, from 1) on --profile-ranks, which TensorBoard opens."""
        a = self.args
        if not a.profile or self.rank not in a.profile_ranks:
            return
        if self.profiler is None and not end and self.iteration + 1 == a.profile_step_start:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
            self.profile_dir = os.path.join(a.tensorboard_dir or a.save or ".", "profile")
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities, record_shapes=True,
                                    on_trace_ready=tensorboard_trace_handler(self.profile_dir, worker_name=f"rank{self.rank}"))
            if a.record_memory_history:
                if self.device.type == "cuda":
                    torch.cuda.memory._record_memory_history()
                else:
                    print(f"note: --record-memory-history records CUDA allocations; rank {self.rank} runs on the CPU")
            self.profiler.start()
        elif self.profiler is not None and (end or self.iteration == a.profile_step_end):
            self.profiler.stop()
            self.profiler = None
            print(f"profile of iterations {a.profile_step_start}..{min(a.profile_step_end, self.iteration)} (rank "
                  f"{self.rank}) written to {self.profile_dir}: tensorboard --logdir {self.profile_dir}", flush=True)
            if a.record_memory_history and self.device.type == "cuda":
                torch.cuda.memory._dump_snapshot(a.memory_snapshot_path)
                torch.cuda.memory._record_memory_history(enabled=None)
                print(f"CUDA memory history written to {a.memory_snapshot_path} (open it at pytorch.org/memory_viz)",
                      flush=True)

    def _rank_step_times(self, per_iter):
        """(min, median, max) of the ranks' step times this interval, and the slowest rank and its
        host: a slow node is named, not averaged away. Collective."""
        if self.world == 1:
            return None
        mine = torch.tensor([per_iter], dtype=torch.float64, device=self.device)
        times = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(times, mine)
        times = [float(t) for t in times]
        slowest = max(range(self.world), key=times.__getitem__)
        ordered = sorted(times)
        return ordered[0], ordered[len(ordered) // 2], times[slowest], slowest, self.hosts[slowest]

    def _log(self, interval, lr, norm, batch):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.time() - interval["t"]
        per_iter = elapsed / max(1, interval["iters"])
        tokens_per_s = interval["samples"] * self.model_config.seq_length / max(elapsed, 1e-9)
        tflops = self.flops_per_token * tokens_per_s / self.world / 1e12
        mfu = tflops / self.peak if self.peak else None
        loss = interval["loss"] / max(1, interval["n"])
        mem = peak_memory_gb(self.device)
        scale = self.scaler.scale if self.scaler else None
        params_norm = float(self.model.params_norm()) if self.args.log_params_norm else None
        zeros = int(self.last_grad_zeros) if self.args.log_num_zeros_in_grad else None
        ranks = self._rank_step_times(per_iter)
        print0(f" iteration {self.iteration:8d}/{self.args.train_iters:8d} | consumed samples: "
                f"{self.batches.consumed(self.iteration):12d} | elapsed time per iteration (ms): {per_iter * 1000:.1f} | "
                f"learning rate: {lr:.6E} | global batch size: {batch:5d} | lm loss: {loss:.6E} | "
                + (f"loss scale: {scale:.1f} | " if scale else "")
                + f"grad norm: {norm:.4f} | "
                + (f"num zeros: {zeros} | " if zeros is not None else "")
                + (f"params norm: {params_norm:.3f} | " if params_norm is not None else "")
                + f"tokens/s: {tokens_per_s:,.0f} | TFLOP/s/device: {tflops:.2f} | "
                f"MFU: {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | peak mem: {mem:.2f} GiB | "
                f"skipped iterations: {interval['skipped']}")
        if ranks is not None:
            low, mid, high, slowest, host = ranks
            print0(f"   step time per rank (ms): min {low * 1000:.1f} | median {mid * 1000:.1f} | max {high * 1000:.1f} "
                   f"(rank {slowest} on {host})")
        self.metrics.scalars(self.iteration, **{
            "train/lr": lr, "train/grad_norm": norm, "train/tokens_per_s": tokens_per_s,
            "train/tflops_per_device": tflops, "train/mfu": mfu, "train/peak_mem_gib": mem,
            "train/loss_scale": scale, "train/avg_loss": loss, "train/batch_size": batch,
            "train/params_norm": params_norm, "train/num_zeros_in_grad": zeros,
            "train/step_ms_max_rank": ranks[2] * 1000 if ranks else None,
            "train/step_ms_min_rank": ranks[0] * 1000 if ranks else None})
        self.metrics.flush()


def _refuse_foreign_load(path):
    """A Hugging Face or Megatron-LM directory given as --load would otherwise be 'no checkpoint
    there' (or fail deep in loading) and training would start from random weights."""
    if not path or not os.path.isdir(path):
        return
    try:
        fmt = C.L.detect_format(path)
    except UserError:  # empty, or not a checkpoint at all: the loader says what it finds
        return
    if fmt != "megatron_biomed":
        what = "a Hugging Face model" if fmt == "hf" else "a Megatron-LM checkpoint"
        raise ConfigError(f"--load {path}: is {what}, not a checkpoint of ours; convert it first: "
                          f"megatron-biomed-convert --load {path} --save DIR --target-format megatron_biomed "
                          f"(then --load DIR --finetune, or --use-checkpoint-args)")


def _peer_lost(error):
    """What failed, in one short line, when `error` says a peer rank is gone; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, dist.DistError) or any(s in text for s in _PEER_LOST):
            line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
            line = line.split("] ", 1)[-1] if line.startswith("[") else line  # gloo's source location
            return line.split(". ")[0][:200]
        error = error.__cause__ or error.__context__
    return None


def _plain(obj):
    """Config values as YAML/JSON-safe builtins."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


@entry_point
def main(argv=None):
    args = parse_args(argv)
    signals = _Signals(args.exit_signal)  # before setup, so that an early SIGTERM is not fatal either
    trainer = None
    code = 0
    try:
        trainer = Trainer(args)
        code = trainer.train(signals)
    except UserError as e:  # raised on every rank alike, so the barrier in destroy() is safe
        code = e.exit_code
        if trainer is not None and trainer.pending_save is not None:
            try:  # the checkpoint in flight is complete before the run stops
                trainer.wait_for_save()
            except UserError as e2:
                report(e2)
        if not dist.is_initialized() or dist.get_rank() == 0:
            report(e)
    except Exception as e:  # noqa: BLE001 - a peer lost is told apart below; anything else re-raised
        if trainer is None or not hasattr(trainer, "hosts") or _peer_lost(e) is None:
            raise
        trainer.report_collective_failure(e)
        trainer.metrics.close()
        # no barrier, no teardown: the peers they would wait for are gone
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_LOST_RANK)
    finally:
        if trainer is not None:
            trainer.metrics.close()
    M.destroy()
    return code


if __name__ == "__main__":
    sys.exit(main())
