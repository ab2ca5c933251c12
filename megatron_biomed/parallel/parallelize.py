"""Compose tensor, pipeline and data parallelism on one (pp, dp, tp) mesh around the plain GPT.

The full model is initialised identically on every rank (same seed), then cut into this rank's
pipeline stages, sharded over TP, and wrapped for data parallelism - so the weights are the
same whatever the layout. `train_step` runs one optimizer step on a global batch.

bf16 (`param_dtype`): the modules hold bf16 parameters, so no per-step casts of the weights.
Under DDP each parameter has an fp32 main copy; every micro-batch's bf16 gradient is added to
the main copy's fp32 gradient as soon as it is accumulated (a post-accumulate-grad hook), so
accumulation, the data-parallel all-reduce, clipping and the optimizer all run in fp32 (Megatron's
main_grad scheme). `parameters()` / `named_parameters()` are the main copies: the optimizer and
checkpoints see fp32 weights, as without bf16. Under FSDP2 the sharded fp32 parameters are the
main copies and a MixedPrecisionPolicy gathers them in bf16 and reduces gradients in fp32.
"""
import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_biomed.model.gpt import GPT, CoreAttention
from megatron_biomed.parallel import pipeline
from megatron_biomed.model.loss import cross_entropy
from megatron_biomed.parallel.tensor_parallel import (apply_tensor_parallel, lm_loss,
                                                      tensor_parallel_dropout_rng)


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _inductor_problem(device):
    """Why torch.compile cannot run here (no C++ compiler, no Triton, ...), or None."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means "fall back to eager"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}"[:300]
    return None


def compile_blocks(modules, tensor_parallel=False):
    """Regional compilation: each transformer block's forward goes through torch.compile. All
    blocks share one compiled graph (parameters are graph inputs), so compile time does not grow
    with depth; hooks of TP and FSDP2 around a block stay outside the graph."""
    if tensor_parallel:
        # A backward graph of DTensor (sequence-parallel) blocks read back from AOTAutograd's
        # on-disk cache computes wrong gradients (torch 2.13: a rerun of the same layout got a
        # gradient norm off by 6%; tests/test_parallel.py); compile those afresh every run.
        from torch._functorch import config as functorch_config
        functorch_config.enable_autograd_cache = False
    # The attention kernel is a library call either way, and tracing it would specialise on each
    # layer's score scale (BioMedLM divides by layer index + 1): one recompilation per layer,
    # and dynamo gives up after 8. Patched here, not decorated in the model file, because
    # importing torch._dynamo costs every process a second.
    if not getattr(CoreAttention.forward, "_outside_compile", False):
        CoreAttention.forward = torch.compiler.disable(CoreAttention.forward)
        CoreAttention.forward._outside_compile = True
    for m in modules:
        for block in pipeline.blocks_of(m):
            block.forward = torch.compile(block.forward)


class ParallelGPT:
    def __init__(self, model_config, parallel, mesh, device=torch.device("cpu"), seed=1234,
                 param_dtype=None, compile=False):
        self.config, self.parallel, self.mesh, self.device = model_config, parallel, mesh, device
        world = mesh.size()
        parallel.validate(model_config, world)
        self.tp, self.pp, self.dp = mesh["tp"].size(), mesh["pp"].size(), mesh["dp"].size()
        self.tp_rank, self.pp_rank = mesh["tp"].get_local_rank(), mesh["pp"].get_local_rank()
        self.tp_group, self.pp_group, self.dp_group = (mesh[d].get_group() for d in ("tp", "pp", "dp"))

        torch.manual_seed(seed)  # identical full model on every rank: initialise, then shard
        with torch.device(device):  # initialised where it runs: seconds, not a minute, for 2.7B on GPU
            model = GPT(model_config, tensor_parallel_size=self.tp)
        self.padded_vocab_size = model.padded_vocab_size
        self.num_stages = self.pp * parallel.virtual_stages(model_config.num_layers)
        layers = pipeline.stage_layers(model_config.num_layers, self.num_stages)
        if self.pp == 1:
            self.stage_ids, self.modules = [0], [model]
        else:
            self.stage_ids = pipeline.stages_of_rank(self.pp_rank, self.pp, self.num_stages // self.pp)
            self.modules = [pipeline.GPTStage(model, layers[s], s == 0, s == self.num_stages - 1)
                            for s in self.stage_ids]
        del model
        if self.tp > 1:
            for m in self.modules:
                apply_tensor_parallel(m, mesh["tp"], parallel.sequence_parallel)
                tensor_parallel_dropout_rng(m, self.tp_rank, parallel.sequence_parallel)
        # Dropout streams as Megatron seeds them: per pipeline rank, shared across TP and DP.
        torch.manual_seed(seed + 100 * self.pp_rank)
        # --compile: None when compiled, else why not (the caller reports it and runs eager)
        self.compile_problem = _inductor_problem(device) if compile else "not asked for"
        if self.compile_problem is None:
            compile_blocks(self.modules, tensor_parallel=self.tp > 1)
        self.fsdp = parallel.data_parallel_sharding != "none"
        self._main = {}  # id(module parameter) -> its fp32 main copy (bf16 under DDP)
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            reshard = parallel.data_parallel_sharding == "full"
            mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            for m in self.modules:
                for block in pipeline.blocks_of(m):
                    fully_shard(block, mesh=mesh["dp"], reshard_after_forward=reshard, mp_policy=mp)
                fully_shard(m, mesh=mesh["dp"], reshard_after_forward=reshard, mp_policy=mp)
        elif param_dtype is not None:
            self._use_main_params(param_dtype)
        self._embedding_groups()
        # --overlap-grad-reduce under DDP (FSDP2 reduce-scatters during backward by itself)
        self.grad_reducer = None
        if parallel.overlap_grad_reduce and not self.fsdp and self.dp > 1:
            self.grad_reducer = OverlappedGradReduce(list(self._module_parameters()), self.main_param, self.dp_group,
                                                     self.dp, parallel.ddp_bucket_size or DDP_BUCKET_SIZE)
        self.schedules = {}  # pipeline schedules by micro-batch count
        self.autocast_dtype = None  # torch.bfloat16 / torch.float16: compute dtype (params stay fp32)
        self.loss_scale = 1.0       # fp16: the loss is multiplied by this before backward

    # -- groups -----------------------------------------------------------------------------
    def _embedding_groups(self):
        """First and last pipeline ranks of each (dp, tp) pair share the tied embedding."""
        self.embedding_group = None
        if self.pp == 1:
            return
        ranks = self.mesh.mesh  # (pp, dp, tp) tensor of global ranks
        me = dist.get_rank()
        for d in range(ranks.shape[1]):
            for t in range(ranks.shape[2]):
                pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
                g = dist.new_group(pair)
                if me in pair:
                    self.embedding_group = g

    def _module_parameters(self):
        """(name in the full model, parameter of the modules); the last stage's tied head is
        'lm_head.weight'."""
        seen = set()
        for m in self.modules:
            for n, p in m.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield n, p

    def _use_main_params(self, dtype):
        main = {n: p.detach().float().clone() for n, p in self._module_parameters()}
        for m in self.modules:
            m.to(dtype)
        for n, p in self._module_parameters():
            self._main[id(p)] = main[n]
            p.register_post_accumulate_grad_hook(self._to_main_grad)

    @torch.no_grad()
    def _to_main_grad(self, p):
        main = self._main[id(p)]
        g = p.grad
        if isinstance(g, DTensor) and g.placements != main.placements:
            g = g.redistribute(main.device_mesh, main.placements)
        if main.grad is None:
            main.grad = g.float()
        else:
            main.grad += g
        p.grad = None

    def main_param(self, p):
        """The parameter the optimizer updates for module parameter `p` (itself unless bf16)."""
        return self._main.get(id(p), p)

    @torch.no_grad()
    def sync_params(self):
        """Copy the main copies into the bf16 module parameters (after a step or a load)."""
        for _, p in self._module_parameters():
            main = self._main.get(id(p))
            if main is not None:
                _local(p).copy_(_local(main))

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self):
        """(name in the full model, parameter the optimizer updates and checkpoints hold)."""
        for n, p in self._module_parameters():
            yield n, self.main_param(p)

    @property
    def first_stage(self):
        return 0 in self.stage_ids

    @property
    def last_stage(self):
        return self.num_stages - 1 in self.stage_ids

    def train(self, mode=True):
        for m in self.modules:
            m.train(mode)

    # -- one step ---------------------------------------------------------------------------
    def _loss_fn(self, n_microbatches):
        def loss_fn(logits, targets):
            loss = lm_loss(logits, targets, self.config.vocab_size, self.tp_group, self.tp_rank)
            return loss * (self.loss_scale / n_microbatches)
        return loss_fn

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, tokens, targets, backward=True):
        """Forward (and backward) over this data-parallel rank's batch; returns the batch's
        mean loss, unscaled, on every rank. `tokens`/`targets`: (dp-local batch, seq); targets
        equal to IGNORE_INDEX add no loss."""
        mbs = self.parallel.micro_batch_size
        n_mb = tokens.shape[0] // mbs
        loss_fn = self._loss_fn(n_mb)
        if backward and self.grad_reducer is not None:
            self.grad_reducer.start(n_mb)
        total = torch.zeros((), device=self.device)
        if self.pp == 1:
            model = self.modules[0]
            for i in range(n_mb):
                if self.fsdp and backward:
                    model.set_requires_gradient_sync(i == n_mb - 1)
                with self._autocast():
                    logits = model(tokens[i * mbs:(i + 1) * mbs])
                    loss = loss_fn(logits, targets[i * mbs:(i + 1) * mbs])
                if backward:
                    loss.backward()
                total += loss.detach().float()
        else:
            if n_mb not in self.schedules:  # one per batch size (a --rampup-batch-size ramp has several)
                self.schedules[n_mb] = pipeline.build_schedule(
                    self.modules, self.stage_ids, self.num_stages, self.device, self.pp_group, n_mb,
                    lambda logits, targets, n_mb=n_mb: self._loss_fn(n_mb)(logits, targets),
                    self.parallel.pipeline_schedule)
            schedule = self.schedules[n_mb]
            losses = []
            kwargs = {"target": targets, "losses": losses} if self.last_stage else {}
            args = (tokens,) if self.first_stage else ()
            with self._autocast():
                if backward:
                    schedule.step(*args, **kwargs)
                else:
                    schedule.eval(*args, **kwargs)
            if self.last_stage:
                total = torch.stack([l.detach().float() for l in losses]).sum()
            src = dist.get_global_rank(self.pp_group, self.pp - 1)
            dist.broadcast(total, src=src, group=self.pp_group)
        if self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
            total /= self.dp
        return total / self.loss_scale

    @contextlib.contextmanager
    def _forward_only(self):
        """Dropout off and loss scale 1 for a forward with no backward; afterwards training mode."""
        self.train(False)
        scale, self.loss_scale = self.loss_scale, 1.0
        try:
            yield
        finally:
            self.loss_scale = scale
            self.train(True)
            if self.fsdp:  # a forward with no backward leaves FSDP2's unsharded parameters in place
                # (reshard_after_forward=False); the optimizer and checkpoints hold the sharded ones
                from torch.distributed.fsdp import FSDPModule
                for m in self.modules:
                    for sub in m.modules():
                        if isinstance(sub, FSDPModule):
                            sub.reshard()

    @torch.no_grad()
    def evaluate(self, tokens, targets):
        """Mean loss of a batch, forward only, dropout off."""
        with self._forward_only():
            return self.forward_backward(tokens, targets, backward=False)

    @torch.no_grad()
    def token_losses(self, tokens, targets):
        """Per-token cross entropy (-log p(target)) of this data-parallel rank's rows, forward
        only, dropout off: (rows, seq) fp32 on every rank of the model replica; IGNORE_INDEX
        targets give 0. Rows: a multiple of the micro-batch size."""
        mbs = self.parallel.micro_batch_size
        n_mb = tokens.shape[0] // mbs

        def per_token(logits, targets):
            return cross_entropy(logits, targets, self.config.vocab_size, self.tp_group,
                                 self.tp_rank * logits.shape[-1])
        with self._forward_only():
            if self.pp == 1:
                out = []
                for i in range(n_mb):
                    with self._autocast():
                        out.append(per_token(self.modules[0](tokens[i * mbs:(i + 1) * mbs]),
                                             targets[i * mbs:(i + 1) * mbs]).float())
                return torch.cat(out)
            key = ("token_losses", n_mb)
            if key not in self.schedules:  # the (cached) loss closure hands each micro-batch's rows to _scored
                self.schedules[key] = pipeline.build_schedule(
                    self.modules, self.stage_ids, self.num_stages, self.device, self.pp_group, n_mb,
                    lambda logits, targets: self._scored.append(per_token(logits, targets).float()) or
                    self._scored[-1].sum(), self.parallel.pipeline_schedule)
            self._scored = []
            kwargs = {"target": targets, "losses": []} if self.last_stage else {}
            args = (tokens,) if self.first_stage else ()
            with self._autocast():
                self.schedules[key].eval(*args, **kwargs)
            result = torch.cat(self._scored) if self.last_stage else \
                torch.empty(tokens.shape, dtype=torch.float32, device=self.device)
            dist.broadcast(result, src=dist.get_global_rank(self.pp_group, self.pp - 1), group=self.pp_group)
            return result

    @torch.no_grad()
    def reduce_gradients(self):
        """The data-parallel mean (DDP; started during backward under --overlap-grad-reduce, so
        waited for first) and the tied-embedding sum across first and last stage."""
        if self.grad_reducer is not None:
            self.grad_reducer.finish()
        match_grad_placements(self.parameters())
        if self.embedding_group is not None:
            for m in self.modules:
                for name in ("wte", "lm_head"):
                    mod = getattr(m, name, None)
                    weight = self.main_param(mod.weight) if mod is not None else None
                    if weight is not None and weight.grad is not None:
                        grad = _local(weight.grad)
                        buf = grad.contiguous()  # gloo needs contiguous buffers
                        dist.all_reduce(buf, group=self.embedding_group)
                        if buf.data_ptr() != grad.data_ptr():
                            grad.copy_(buf)
        if self.dp > 1 and not self.fsdp and self.grad_reducer is None:
            average_gradients(self.parameters(), self.dp_group, self.dp, self.parallel.ddp_bucket_size or DDP_BUCKET_SIZE)

    @torch.no_grad()
    def grad_norm(self):
        """Global L2 norm of all gradients, across tp, dp and pp, the tied embedding once."""
        sq = grad_square_sum((p for name, p in self.named_parameters()
                              if not (self.pp > 1 and name == "lm_head.weight")), self.device)
        if self.pp > 1:
            dist.all_reduce(sq, group=self.pp_group)
        return sq.sqrt()

    @torch.no_grad()
    def params_norm(self):
        """Global L2 norm of the parameters (Megatron's --log-params-norm), the tied embedding once."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for name, p in self.named_parameters():
            if not (self.pp > 1 and name == "lm_head.weight"):
                n = torch.linalg.vector_norm(p.detach().float())
                sq += (n.full_tensor() if isinstance(n, DTensor) else n).double() ** 2
        if self.pp > 1:
            dist.all_reduce(sq, group=self.pp_group)
        return sq.sqrt()

    @torch.no_grad()
    def grad_zeros(self):
        """How many gradient entries are zero, over the whole model (--log-num-zeros-in-grad)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for name, p in self.named_parameters():
            if p.grad is not None and not (self.pp > 1 and name == "lm_head.weight"):
                n = (p.grad == 0).sum()
                total += (n.full_tensor() if isinstance(n, DTensor) else n).double()
        if self.pp > 1:
            dist.all_reduce(total, group=self.pp_group)
        return total

    @torch.no_grad()
    def scale_gradients(self, factor):
        scale_gradients(self.parameters(), factor)

    @torch.no_grad()
    def clip_gradients(self, max_norm, norm=None):
        """Scale all gradients so that their global norm is at most `max_norm`; returns the
        norm before clipping."""
        norm = self.grad_norm() if norm is None else norm
        clip_gradients(self.parameters(), max_norm, norm)
        return norm

    def train_step(self, tokens, targets, optimizer, clip_grad=1.0):
        """One step on this rank's share of the global batch; returns (loss, grad norm)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(tokens, targets)
        self.reduce_gradients()
        norm = self.clip_gradients(clip_grad)
        optimizer.step()
        self.sync_params()
        return loss, norm

    def data_slice(self, global_batch):
        """This data-parallel rank's rows of a global batch."""
        dp_rank = self.mesh["dp"].get_local_rank()
        per = global_batch.shape[0] // self.dp
        return global_batch[dp_rank * per:(dp_rank + 1) * per]

    @torch.no_grad()
    def full_state_dict(self):
        """{name: full tensor} of this rank's stages (collective over tp and dp)."""
        out = {}
        for name, p in self.named_parameters():
            out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        return out


# -- gradient reductions shared with the fine-tuning loop (finetune/trainer.py) -----------------
@torch.no_grad()
def match_grad_placements(params):
    """An embedding's gradient can come back Replicate for a Shard(0) weight: give every
    gradient its parameter's layout so that reductions see matching shards."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


DDP_BUCKET_SIZE = 40_000_000  # gradient elements per reduction bucket (Megatron-LM's default)


@torch.no_grad()
def average_gradients(params, group, size, bucket_numel=DDP_BUCKET_SIZE):
    """The mean of every gradient over `group` (data parallel), in flat buckets."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    for bucket in _buckets(grads, bucket_numel):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        _unflatten_mean(flat, bucket, size)


def _unflatten_mean(flat, grads, size):
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class OverlappedGradReduce:
    """Megatron's --overlap-grad-reduce: the data-parallel mean of the gradients in buckets
    (parameters in reverse order, as backward produces them), each bucket's all-reduce started
    asynchronously during backward as soon as every gradient in it is final, i.e. accumulated
    once per micro-batch of the step; finish() waits for them (and reduces any bucket whose
    gradients never all arrived, in bucket order on every rank)."""

    def __init__(self, named_params, main_param, group, size, bucket_numel):
        self.main_param, self.group, self.size = main_param, group, size
        params = [p for _, p in named_params if p.requires_grad][::-1]
        self.buckets, bucket, n = [], [], 0
        for p in params:
            if bucket and n + p.numel() > bucket_numel:
                self.buckets.append(bucket)
                bucket, n = [], 0
            bucket.append(p)
            n += p.numel()
        if bucket:
            self.buckets.append(bucket)
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        for p in params:  # after the bf16 main-gradient hook, which was registered first
            p.register_post_accumulate_grad_hook(self._ready)
        self.expected, self.counts, self.pending, self.launched = None, {}, [], set()

    def start(self, n_microbatches):
        self.expected, self.counts, self.pending, self.launched = n_microbatches, {}, [], set()
        self.left = [len(b) for b in self.buckets]

    @torch.no_grad()
    def _ready(self, p):
        if self.expected is None:
            return
        self.counts[id(p)] = self.counts.get(id(p), 0) + 1
        if self.counts[id(p)] == self.expected:
            i = self.bucket_of[id(p)]
            self.left[i] -= 1
            if self.left[i] == 0:
                self._launch(i)

    def _launch(self, i):
        grads = []
        for p in self.buckets[i]:
            main = self.main_param(p)
            g = main.grad
            if g is None:
                continue
            if isinstance(g, DTensor) and g.placements != main.placements:
                main.grad = g = g.redistribute(main.device_mesh, main.placements)
            grads.append(_local(g))
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, grads))
        self.launched.add(i)

    @torch.no_grad()
    def finish(self):
        self.overlapped = len(self.launched)  # buckets already reducing when backward returned
        for i in range(len(self.buckets)):
            if i not in self.launched:
                self._launch(i)
        for work, flat, grads in self.pending:
            work.wait()
            _unflatten_mean(flat, grads, self.size)
        self.expected, self.pending = None, []


@torch.no_grad()
def grad_square_sum(params, device):
    """Sum of squared gradient entries (float64) over full tensors, DTensor shards included."""
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None:
            n = torch.linalg.vector_norm(p.grad.float())
            sq += (n.full_tensor() if isinstance(n, DTensor) else n).double() ** 2
    return sq


@torch.no_grad()
def scale_gradients(params, factor):
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


@torch.no_grad()
def clip_gradients(params, max_norm, norm):
    """Scale gradients whose global norm is `norm` so that it is at most `max_norm`."""
    if max_norm and max_norm > 0:
        scale_gradients(params, (max_norm / (norm + 1e-6)).clamp(max=1.0).float())


def _buckets(tensors, max_numel):
    bucket, n = [], 0
    for t in tensors:
        if bucket and n + t.numel() > max_numel:
            yield bucket
            bucket, n = [], 0
        bucket.append(t)
        n += t.numel()
    if bucket:
        yield bucket
