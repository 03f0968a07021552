"""CUDA graphs for training steps of one fixed shape: the checkpointed Q-LoRA step without its host time.

A checkpointed step of the 14B model launches tens of thousands of small GPU operations from Python
(forward, recomputation, backward; five LoRA Linears a block, each several kernels). At 2048 tokens the
host takes longer to issue them than the GPU takes to run them (benchmarks/NOTES.md). Here the whole
training forward (embedding, blocks, final norm, summed loss) is captured once as one CUDA graph, and its
backward (recomputation included) as a second; later steps of the same shape copy their inputs into the
graph's buffers and replay. The captured backward adds each trainable parameter's gradient into a fixed
buffer that is installed as ``param.grad`` (so gradient accumulation, clipping and the optimizer see
ordinary ``.grad`` tensors, and no extra copy of the gradients exists).

What has to hold, and how it is kept:
- Few shapes: packed rows padded to the row length (one shape), unpacked rows padded to a multiple of 128
  tokens (a few shapes, one graph each). Each shape runs eagerly ``warmup`` times, then is captured and
  replayed; after ``max_captures`` shapes, further shapes run eagerly. The trainer captures the shapes its data
  will give before the first step (``prepare``: the warm-ups run on batches whose labels are all ignored, so
  their gradients are zero), so a run's steps are replayed from the first one, whatever order the shapes come
  in.
- No hidden host work in the step: position ids and, for rows that have them, the FlexAttention block mask
  are built outside the graph and copied into its buffers, without reading a device value back (no GPU sync
  between micro-batches: a row without a restart gets document ids too, whose mask is the causal one); the
  loss runs lm_head over every position (ignored labels contribute nothing), so no data-dependent shape
  appears.
- Dropout: checkpointing cannot stash and restore the CUDA RNG state inside a capture, so LoRA dropout is
  replaced by ``SeededDropout`` (mask recomputed from a seed tensor the graph advances each step). Any other
  dropout with p > 0 (embedding, attention) keeps the model eager.
- Memory: all captured shapes share one memory pool, so the graphs together hold about what the largest step
  needs, not the sum over shapes. That is safe because a step's forward replay is always followed by its own
  backward before any other step replays (checked: a forward replay of any shape in between makes the earlier
  backward refuse), and what a graph keeps across replays (its input buffers, the gradient buffers) lives
  outside the pool. All of them add their gradients into one set of buffers, the parameters' ``.grad``, so
  gradient accumulation works across shapes.

Under DeepSpeed ZeRO-1/2 (``hooked_grads``) the step is the same but the gradients leave the replayed backward
through autograd: each parameter's gradient accumulates as in an eager backward, so the hooks DeepSpeed put
on the parameters (its gradient reduction into the ZeRO buffers) see them; and the replay runs inside the
engine's forward (``through_wrapper``), so the engine's own work around a forward and backward (its backward
prologue, loss scaling, accumulation boundaries) happens as it does eagerly. The same holds for several
processes (their gradient reduction runs in those hooks, after the replay; not yet run on more than one GPU,
so train.py uses it there only with an explicit --cuda_graphs True). ZeRO-3 (parameters gathered in module
hooks, which a replay bypasses) stays eager.
The model knows nothing of this: the trainer owns a ``TrainGraphs`` and sends its training forwards through
it (``QwenTrainer.compute_loss``). ``--cuda_graphs False`` (or ``FINETUNE_CUDA_GRAPHS=0``) keeps it off.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.encoding import IGNORE
from ..graph_capture import capture
from ..modeling.attention import build_attention, document_ids
from ..modeling.loss import causal_lm_nll_sum, normalize_loss
from ..modeling.model import qwen_lm
from ..settings import settings

# lm_head rows per loss chunk inside a graph: launches cost nothing there, and a 1024-token chunk's fp32
# logits and their gradient (about 2 GB on a 152k vocabulary) would be the largest block in the graph's pool
GRAPH_LOSS_CHUNK = 256


def seed_file_name(process_index: int = 0, world_size: int = 1) -> str:
    """The checkpoint file holding a process's dropout seed (named as transformers names its RNG state files)."""
    return "dropout_seed.json" if world_size <= 1 else f"dropout_seed_{process_index}.json"


def is_seed_file(name: str) -> bool:
    return name == "dropout_seed.json" or (name.startswith("dropout_seed_") and name.endswith(".json"))


def read_seed(path) -> int:
    """The seed a checkpoint's seed file holds; ValueError saying what is wrong with the file when it is damaged
    (a resume checks it before loading anything: training/checks.py)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt or truncated ({e})") from None
    value = value.get("seed") if isinstance(value, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"corrupt: 'seed' must be an integer, got {value!r}")
    return value


def graphs_unavailable(model: nn.Module, several_processes: bool = False) -> str | None:
    """Why `model` (a QWenLMHeadModel, possibly inside PEFT) cannot train through CUDA graphs, or None.
    `several_processes`: the caller hands gradients to autograd (`hooked_grads`), so the hooks DeepSpeed or DDP
    put on the parameters see them and several processes are possible."""
    if not settings().cuda_graphs:
        return "FINETUNE_CUDA_GRAPHS=0"
    if not torch.cuda.is_available():
        return "no CUDA device"
    lm = qwen_lm(model)
    if lm is None:
        return "not a Qwen model"
    if lm.lm_head.weight.device.type != "cuda":
        return "the model is not on a CUDA device"
    if not several_processes and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        return "several processes (their gradient hooks need the hooked_grads path)"
    cfg = lm.config
    if cfg.attn_dropout_prob > 0 or cfg.emb_dropout_prob > 0:
        return "attention or embedding dropout is on (only LoRA dropout can be replayed)"
    try:
        from . import seeded_dropout  # noqa: F401  (needs triton)
    except ImportError:
        return "triton is not importable"
    return None


# shapes a run may capture: every 128-token length up to 2048 (the pool is shared, so a shape costs little memory)
MAX_CAPTURES = 16


def enable_train_graphs(model: nn.Module, warmup: int = 2, max_captures: int = MAX_CAPTURES,
                        hooked_grads: bool = False) -> "TrainGraphs":
    """A TrainGraphs for `model` (call after LoRA is attached and checkpointing is set): the caller owns it and
    runs its training forwards through it (`graphs(model, inputs)`); `close()` gives everything back.
    `hooked_grads`: gradients reach the parameters through autograd, for a wrapper (DeepSpeed) that hooks them.
    Raises RuntimeError saying why when graphs cannot be used (see ``graphs_unavailable``)."""
    why = graphs_unavailable(model, several_processes=hooked_grads)
    if why is not None:
        raise RuntimeError(f"CUDA graphs cannot be used: {why}")
    return TrainGraphs(qwen_lm(model), warmup=warmup, max_captures=max_captures, hooked_grads=hooked_grads)


class TrainGraphs:
    """Decides per training forward whether to replay, capture or run eagerly (see the module docstring)."""

    def __init__(self, lm, warmup: int = 2, max_captures: int = MAX_CAPTURES, hooked_grads: bool = False):
        self.lm = lm
        # True: a replayed backward hands the gradients to autograd (parameter hooks fire, one copy a micro-batch);
        # False: it adds them straight into buffers installed as .grad (no copy)
        self.hooked_grads = hooked_grads
        self.warmup = warmup
        self.max_captures = max_captures
        self.captures = 0
        self.replays = 0
        self.eager_steps = 0
        self.failure: str | None = None
        device = lm.lm_head.weight.device
        # drawn from the CUDA generator, so torch.manual_seed makes a run's dropout masks reproducible
        self.seed = torch.randint(0, 2**40, (1,), device=device, dtype=torch.int64)
        self._swapped: list[tuple[nn.ModuleDict, str, nn.Module]] = []
        self._swap_dropouts()
        self.steps: dict[tuple, _CapturedStep] = {}  # one per captured shape
        self.pool = None  # the memory pool every captured shape shares
        self.generation = 0  # forward replays so far: a backward checks that no other replay came in between
        self.prepared: list[tuple[int, int]] = []  # shapes captured before training (prepare)
        self.prepare_s = 0.0
        self._grads: tuple[tuple[int, ...], list[torch.Tensor]] | None = None  # shared .grad buffers
        self._seen: dict[tuple, int] = {}  # eager runs per shape so far
        self._rng_use: dict[tuple, str | None] = {}  # per shape: what else draws random numbers (then: eager)
        self.enabled = True  # False: every step runs eagerly through the same seeded dropout (A/B, tests)

    # -- the training forward -----------------------------------------------------------------------------
    def applies(self, inputs: dict) -> bool:
        """Whether a training forward on `inputs` is one this object runs: a loss-only step on token ids
        (input_ids, labels, optional position_ids) in training mode with gradients, on the GPU."""
        ids = inputs.get("input_ids")
        return (ids is not None and ids.is_cuda and inputs.get("labels") is not None
                and set(inputs) <= {"input_ids", "labels", "position_ids"}
                and self.lm.training and torch.is_grad_enabled())

    def __call__(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """The training loss of one step on `inputs`: through the graphs where they apply, else `model`'s own
        forward."""
        if self.applies(inputs):
            def step():
                return self.loss(inputs["input_ids"], inputs.get("position_ids"), inputs["labels"],
                                 num_items_in_batch)

            if self.hooked_grads and _is_wrapper(model):
                return through_wrapper(model, step, inputs)
            return step()
        kw = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return model(**inputs, **kw).loss

    def close(self) -> None:
        """Back to eager training: the captured step (and its memory pool) goes, the LoRA dropout modules are
        put back."""
        self.restore_dropouts()
        self.steps.clear()
        self._grads = None

    # -- the seeded-dropout state in checkpoints ------------------------------------------------------------------
    def save_seed(self, checkpoint_dir: str, process_index: int = 0, world_size: int = 1) -> None:
        """Write the dropout seed (one file a process, beside the Trainer's RNG state files): a resumed run
        continues with the masks the uninterrupted run would have drawn."""
        path = os.path.join(checkpoint_dir, seed_file_name(process_index, world_size))
        with open(path, "w") as f:
            json.dump({"seed": int(self.seed)}, f)  # a read at checkpoints only

    def load_seed(self, checkpoint_dir: str, process_index: int = 0, world_size: int = 1) -> bool:
        """Restore the seed a checkpoint recorded; False when it has none (written without CUDA graphs or
        before they kept it): the run then continues with other dropout masks than the uninterrupted one."""
        path = os.path.join(checkpoint_dir, seed_file_name(process_index, world_size))
        if not os.path.isfile(path):
            return False
        try:
            value = read_seed(path)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        self.seed.fill_(value)
        return True

    def stats(self) -> dict:
        out = {"captures": self.captures, "replayed_steps": self.replays, "eager_steps": self.eager_steps}
        if self.prepared:
            out["captured_before_training"] = [list(s) for s in self.prepared]
            out["capture_s"] = round(self.prepare_s, 1)
        if self.failure:
            out["capture_failure"] = self.failure
        return out

    # -- before training --------------------------------------------------------------------------------
    def prepare(self, shapes, pad_id: int, context=contextlib.nullcontext) -> list[tuple[int, int]]:
        """Capture the steps of these (rows, tokens) shapes now, before training, so that a run replays from its
        first step: each shape runs its ``warmup`` eager steps and its capture on a batch of padding whose labels
        are all ignored (a zero loss: the gradients it adds are zero, and are dropped), as the collator lays out
        graphed batches (position ids, no attention mask). The dropout seed and the step counters are put back,
        so the run draws the masks and reports the counts it would have without this. ``context``: makes the
        context the trainer's forwards run in (autocast: a captured step must be the one training replays).
        Shapes past ``max_captures`` are left to the run (eager). Returns the shapes captured. Not under a wrapper
        that hooks the gradients (DeepSpeed): its engine must see every backward."""
        if self.hooked_grads or not self.enabled:
            return []
        lm = self.lm
        device = lm.lm_head.weight.device
        params = [p for p in lm.parameters() if p.requires_grad]
        had_grad = [p.grad is not None for p in params]
        seed, counts, was_training = self.seed.clone(), (self.replays, self.eager_steps), lm.training
        done = []
        t0 = time.perf_counter()
        lm.train()
        chosen = list(dict.fromkeys(shapes))[: max(0, self.max_captures - self.captures)]  # the most common
        try:
            # the largest first: the shared pool is then sized by it, and the smaller captures reuse its blocks
            for B, T in sorted(chosen, key=lambda s: -s[0] * s[1]):
                ids = torch.full((B, T), pad_id, device=device, dtype=torch.long)
                batch = {"input_ids": ids, "labels": torch.full_like(ids, IGNORE),
                         "position_ids": torch.arange(T, device=device).repeat(B, 1)}
                before = self.captures
                for _ in range(self.warmup + 1):
                    with context():
                        loss = self(lm, batch)
                    loss.backward()
                if self.captures > before and not self.failure:
                    done.append((B, T))
                if self.failure:
                    break
        finally:
            self.seed.copy_(seed)
            self.replays, self.eager_steps = counts
            for p, had in zip(params, had_grad):
                if not had:
                    p.grad = None
            lm.train(was_training)
            torch.cuda.synchronize(device)
            self.prepare_s += time.perf_counter() - t0
        self.prepared += done
        return done

    # -- dropout ----------------------------------------------------------------------------------------
    def _swap_dropouts(self) -> None:
        from .seeded_dropout import SALTS, SeededDropout

        salt = 0
        for module in list(self.lm.modules()):
            table = getattr(module, "lora_dropout", None)
            if not isinstance(table, nn.ModuleDict):
                continue
            for name, drop in list(table.items()):
                if isinstance(drop, nn.Dropout) and drop.p > 0:
                    if salt >= SALTS:
                        raise RuntimeError(f"more than {SALTS} LoRA dropout sites")
                    seeded = SeededDropout(drop.p, self.seed, salt)
                    seeded.train(drop.training)
                    table[name] = seeded
                    self._swapped.append((table, name, drop))
                    salt += 1

    def restore_dropouts(self) -> None:
        for table, name, drop in self._swapped:
            drop.train(table[name].training)
            table[name] = drop
        self._swapped.clear()

    def _rng_free(self) -> str | None:
        """Anything left in the model that draws random numbers in training (then: eager)."""
        for name, m in self.lm.named_modules():
            if isinstance(m, nn.Dropout) and m.p > 0:
                return f"dropout at {name}"
        return None

    # -- per forward ------------------------------------------------------------------------------------
    def loss(self, input_ids, position_ids, labels, num_items_in_batch):
        """The normalised training loss of one step (replayed, captured or eager), differentiable."""

        B, T = input_ids.shape
        if position_ids is not None and position_ids.shape[0] != B:
            position_ids = position_ids.expand(B, -1)
        # rows with position ids get document ids even without a restart (the same mask as causal): asking
        # whether a row restarts would make the host wait for the GPU before every micro-batch
        doc_ids = None if position_ids is None else document_ids(position_ids, none_without_restart=False)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        params = tuple(p for p in self.lm.parameters() if p.requires_grad)
        key = (B, T, doc_ids is not None, position_ids is None, autocast, input_ids.device,
               tuple((b.gradient_checkpointing, b.keep_mlp_projections) for b in self.lm.transformer.h),
               tuple(map(id, params)))

        if not self.enabled:
            key = None  # eager from here (a later step with it back on captures afresh)
        elif key in self.steps:
            self.replays += 1
            return self.steps[key].run(input_ids, position_ids, doc_ids, labels, num_items_in_batch)
        if key is not None:
            seen = self._seen[key] = self._seen.get(key, 0) + 1
            if key not in self._rng_use:  # a scan of every module: once a shape
                self._rng_use[key] = self._rng_free()
            if seen > self.warmup and self.captures < self.max_captures and params and self._rng_use[key] is None:
                torch.cuda.empty_cache()  # cached blocks go back before the new graph's pool allocates
                self.captures += 1
                try:
                    step = _CapturedStep(self, key, params, self._grad_buffers(params), input_ids, position_ids,
                                         doc_ids, labels, autocast)
                except Exception as e:  # nothing ran during the failed capture: this step and the rest run eagerly
                    self.max_captures = 0
                    self.steps.clear()
                    self.failure = f"{type(e).__name__}: {e}"
                    warnings.warn(f"CUDA graph capture failed, training continues without graphs ({self.failure})")
                else:
                    self.steps[key] = step
                    self.replays += 1
                    return step.run(input_ids, position_ids, doc_ids, labels, num_items_in_batch)

        self.eager_steps += 1
        self.seed.add_(1)
        attn = self.attention(doc_ids, B, T, input_ids.device)
        with _autocast_without_cache(autocast):  # as captured: torch.compile guards on the autocast state
            total, count = self.body(input_ids, position_ids, labels, attn)
        return normalize_loss(total, count, num_items_in_batch)

    def _grad_buffers(self, params) -> list[torch.Tensor]:
        """The buffers every captured shape's backward adds into (installed as the parameters' .grad): one set,
        so that micro-batches of different shapes accumulate into the same gradients."""
        ids = tuple(map(id, params))
        if self._grads is None or self._grads[0] != ids:
            self._grads = (ids, [torch.zeros_like(p) for p in params])
        return self._grads[1]

    def attention(self, doc_ids, B, T, device):
        return build_attention(None, doc_ids, T, 0, device, self.lm.transformer.use_flex_attention())

    def body(self, input_ids, position_ids, labels, attn):
        """(summed NLL, trained-token count): the part of a step that is captured."""
        hidden = self.lm.transformer(input_ids=input_ids, position_ids=position_ids, attention_spec=attn,
                                     use_cache=False).last_hidden_state
        return causal_lm_nll_sum(self.lm.lm_head, hidden, labels, chunk_tokens=GRAPH_LOSS_CHUNK, select=False)


def _is_wrapper(model: nn.Module) -> bool:
    """A DeepSpeed engine (or DDP): it holds the model as `.module` and does its own work around each forward."""
    return isinstance(getattr(model, "module", None), nn.Module)


def through_wrapper(wrapper: nn.Module, step, inputs: dict):
    """`step()`'s loss, computed inside `wrapper`'s forward in place of the wrapped module's own forward.

    A DeepSpeed engine's forward enters its autocast, clears its per-backward state and hooks the output so that
    its backward prologue runs; calling the graphs beside it would skip all of that. The wrapped module's
    `forward` is replaced for this one call (an instance attribute, which nn.Module's call looks up first), so
    the engine runs exactly what it runs around an eager forward, with the replay in the middle. `inputs` go
    to the wrapper as in an eager step (it may move or cast them); the replay has its own copies."""
    inner = wrapper.module
    had = "forward" in inner.__dict__
    saved = inner.__dict__.get("forward")
    inner.forward = lambda *a, **k: step()
    try:
        out = wrapper(**inputs)
    finally:
        if had:
            inner.forward = saved
        else:
            del inner.forward
    return out if isinstance(out, torch.Tensor) else out["loss"]


def _autocast_without_cache(dtype):
    """The caller's autocast, minus its weight-cast cache: a cast cached outside a capture would be read at a
    stale address inside it (PyTorch requires cache_enabled=False for graphed autocast regions). Warm-up
    steps run the same way, so compiled kernels see the same autocast state and are not recompiled in the
    capture."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


@contextlib.contextmanager
def _fresh_leaves(lm: nn.Module, params):
    """The trainable parameters replaced, for the capture, by new Parameters sharing their storage.

    Autograd keeps one gradient-accumulator node per leaf while any graph references it, tied to the stream
    it was created on; if the caller still holds an eager step's loss, the capture would sync with that
    node's (default) stream, which invalidates a capture. New leaves get new nodes on the capture stream.
    The kernels read the same storage, so optimizer updates of the real parameters reach the graph."""
    alias = {id(p): nn.Parameter(p.detach(), requires_grad=True) for p in params}
    swapped = []
    for module in lm.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in alias:
                module._parameters[name] = alias[id(p)]
                swapped.append((module, name, p))
    try:
        yield tuple(alias[id(p)] for p in params)
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


@contextlib.contextmanager
def _capturable_checkpointing(blocks):
    """Blocks checkpoint without stashing the CUDA RNG state (the only random op left, SeededDropout,
    recomputes its own mask), which is what a capture needs."""
    saved = [b.__dict__.get("_gradient_checkpointing_func") for b in blocks]
    func = functools.partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
    for b in blocks:
        b._gradient_checkpointing_func = func
    try:
        yield
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                b.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                b._gradient_checkpointing_func = f


class _CapturedStep:
    """The forward and backward graphs of one input shape, with their input and output buffers."""

    def __init__(self, owner: TrainGraphs, key, params, grads, input_ids, position_ids, doc_ids, labels, autocast):
        self.key = key
        self.params = params
        B, T = input_ids.shape
        device = input_ids.device
        self.input_ids = input_ids.clone()
        self.labels = labels.to(device).clone()
        self.position_ids = None if position_ids is None else position_ids.contiguous().clone()
        self.docs = None if doc_ids is None else doc_ids.clone()
        # the mask_mod of a packed row's block mask reads self.docs: later steps refill it and the block tables
        self.attn = owner.attention(self.docs, B, T, device)
        self._owner = owner
        self.grads = grads
        self.hooked = owner.hooked_grads
        self.grad_out = torch.ones((), device=device, dtype=torch.float32)
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        if owner.pool is None:
            owner.pool = torch.cuda.graph_pool_handle()
        pool = owner.pool
        with _capturable_checkpointing(owner.lm.transformer.h), _autocast_without_cache(autocast), \
                _fresh_leaves(owner.lm, params) as leaves:
            with capture(self.fwd, pool):
                owner.seed.add_(1)
                self.total, self.count = owner.body(self.input_ids, self.position_ids, self.labels, self.attn)
            with capture(self.bwd, pool):
                grads = torch.autograd.grad(self.total, leaves, grad_outputs=self.grad_out, allow_unused=True)
                pairs = [(b, g) for b, g in zip(self.grads, grads) if g is not None]
                if pairs:
                    torch._foreach_add_([b for b, _ in pairs], [g for _, g in pairs])
                del grads, pairs
        self.total = self.total.detach()

    def run(self, input_ids, position_ids, doc_ids, labels, num_items_in_batch):

        self.input_ids.copy_(input_ids, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        if self.position_ids is not None:
            self.position_ids.copy_(position_ids, non_blocking=True)
        if self.docs is not None:
            self.docs.copy_(doc_ids)
            B, T = input_ids.shape
            fresh = self._owner.attention(self.docs, B, T, input_ids.device).block_mask
            _copy_block_mask(self.attn.block_mask, fresh)
        total = _Replay.apply(self, *self.params)
        return normalize_loss(total, self.count, num_items_in_batch)


_BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                       "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _copy_block_mask(static, fresh) -> None:
    for name in _BLOCK_MASK_TENSORS:
        a, b = getattr(static, name, None), getattr(fresh, name, None)
        if (a is None) != (b is None):
            raise RuntimeError(f"block mask field {name} present in one mask only")
        if a is not None:
            a.copy_(b)


class _Replay(torch.autograd.Function):
    """Replays the forward graph; its backward replays the backward graph, which adds the parameters'
    gradients into the buffers installed as their .grad (so it returns None for them), or, with `hooked_grads`,
    into zeroed buffers that it returns to autograd as the parameters' gradients."""

    @staticmethod
    def forward(ctx, step: _CapturedStep, *params):
        step.fwd.replay()
        owner = step._owner
        owner.generation += 1  # any shape: they share one memory pool
        ctx.step, ctx.generation = step, owner.generation
        return step.total.clone()  # the caller's loss must survive the next replay

    @staticmethod
    def backward(ctx, grad):
        step = ctx.step
        if ctx.generation != step._owner.generation:
            raise RuntimeError(
                "a CUDA-graphed training forward ran again before the backward of the previous one; run "
                "backward after each training forward, or train with --cuda_graphs False")
        step.grad_out.copy_(grad)
        if step.hooked:
            # autograd accumulates these into .grad (a copy: the buffers stay the graph's) and fires the
            # parameters' hooks, as after an eager backward
            torch._foreach_zero_(step.grads)
            step.bwd.replay()
            return (None, *step.grads)
        zero, foreign = [], []
        for p, buf in zip(step.params, step.grads):
            if p.grad is None:
                p.grad = buf
                zero.append(buf)
            elif p.grad is not buf:  # someone installed their own .grad tensor: add into it afterwards
                foreign.append((p, buf))
                zero.append(buf)
        if zero:
            torch._foreach_zero_(zero)
        step.bwd.replay()
        for p, buf in foreign:
            p.grad.add_(buf)
        return (None,) * (1 + len(step.params))


__all__ = ["enable_train_graphs", "graphs_unavailable", "seed_file_name", "TrainGraphs"]
