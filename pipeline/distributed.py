"""Several processes, one stage: data parallel with sharded parameters, gradients and optimiser state (FSDP2).

    rlhf stage sft --nproc 2          # re-executes itself under torchrun with 2 local processes
    torchrun --nproc-per-node 8 -m pipeline.cli run --config llama2-7b    # the same, launched by hand (or by a cluster)

Who does what:
* the runner (`pipeline/runner.py`) lets rank 0 alone resolve inputs, take the lease, build and commit the
  artifact, write manifests and W&B; it tells the other ranks (`tell`/`hear`, over a gloo group) to join a
  build of a stage whose spec says `distributed=True`, and which artifact came out;
* the trainers (`policies/trainer.py`, `reward_models/train.py`) shard the model (`Sharded`), give each rank its
  share of every step's rows (`share`), save resume checkpoints (`save_train_state`/`load_train_state`: with
  several processes each rank writes and reads its own shard, `Sharded.save_shards`), and hand the stage back a
  plain, unsharded model with the trained weights on every rank (`Sharded.unshard`);
* PPO (`policies/ppo.py`) trains one `Sharded` module (policy, value head, critic): replicated by default (LoRA makes
  the trainable part small; `step` sums the gradients over ranks), or FSDP2-sharded with `ppo.shard_policy` and
  gathered whole only to sample (`Sharded.gathered`). Each rank samples and scores its share of the rollout prompts,
  `gather` puts the batch together on every rank, and each rank takes its share of every mini-batch;
* nothing else in a stage knows how many processes there are.

Why torch's `fully_shard` and not accelerate's FSDP plugin: accelerate 1.15 turns FSDP on only for GPU-family
distributed types; on CPU processes (`MULTI_CPU`) it silently falls back to DDP (`accelerate/state.py`), so the
code the tests run here could not be the code a GPU cluster runs. `fully_shard` (FSDP2, which accelerate
calls underneath) runs on gloo (CPU) and NCCL (GPU) alike. DeepSpeed ZeRO-3 is the other engine
(`hardware.sharding: deepspeed`), called directly for the same reason: accelerate drops DeepSpeed for CPU processes.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_SOLO = False  # rank 0 builds a stage alone (`solo`): what the stage calls must not wait for the other ranks


def world() -> World:
    """This process's place, from the variables torchrun (or any launcher of torch.distributed) sets; a single
    process inside `solo()`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or _SOLO:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def solo():
    """Rank 0 runs a stage that does not shard (data, pretrained, ...) while the others wait: inside, every helper
    here behaves as in one process (no collective the other ranks would never join)."""
    global _SOLO
    prev, _SOLO = _SOLO, True
    try:
        yield
    finally:
        _SOLO = prev


def resolve_device(name: str) -> str:
    """The config's `device` (auto, cpu, cuda) as a torch device type."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


_CONTROL = None  # a gloo group for the runner's messages (they wait for hours while rank 0 builds a stage alone)
TIMEOUT = timedelta(hours=int(os.environ.get("RLHF_DIST_TIMEOUT_H", "12")))


def init(device: str) -> World:
    """Join the process group (once); a single process does nothing."""
    global _CONTROL
    w = world()
    if not w.distributed:
        return w
    import torch.distributed as dist

    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=TIMEOUT)
        import atexit

        atexit.register(_shutdown)  # without it, gloo's threads abort the process at exit (SIGABRT)
    if _CONTROL is None:
        _CONTROL = dist.new_group(backend="gloo", timeout=TIMEOUT) if dist.get_backend() != "gloo" else dist.group.WORLD
    return w


def _wait_for_peers() -> None:
    """Wait (up to a minute) until every rank gets here; a peer that died already is not waited for."""
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.monitored_barrier(group=_CONTROL, timeout=timedelta(seconds=60))


def _shutdown() -> None:
    """Leave together, then tear the groups down: a rank whose group is destroyed while a peer still talks to it
    aborts in gloo's threads ("terminate called without an active exception", SIGABRT) and torchrun reports failure."""
    import torch.distributed as dist

    _wait_for_peers()
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End a process of a multi-process command: wait (up to a minute) until every rank is done, flush, and exit
    without running C++ destructors. gloo's threads can abort a process whose groups are torn down at interpreter
    exit ("terminate called without an active exception", SIGABRT; seen in about one run in five even after
    `destroy_process_group`), which makes torchrun report a finished run as failed."""
    import logging
    import sys

    _wait_for_peers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def tell(message: Any) -> None:
    """Rank 0 sends `message` to every other rank (no-op in one process)."""
    from_main(message)


def hear() -> Any:
    """What rank 0 `tell`s (a rank other than 0 waits here)."""
    return from_main(None)


def share(items: Sequence, w: World | None = None) -> list:
    """This rank's share of a step's items: every `size`-th, starting at `rank`."""
    w = w or world()
    return list(items[w.rank :: w.size])


def gather(mine: Sequence, w: World | None = None) -> list:
    """The inverse of `share`: every rank's share put back in the original order, on every rank."""
    w = w or world()
    if not w.distributed:
        return list(mine)
    import torch.distributed as dist

    parts: list = [None] * w.size
    dist.all_gather_object(parts, list(mine), group=_CONTROL)
    out: list = [None] * sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        out[rank :: w.size] = part
    return out


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of replicated parameters over the ranks (a rank that had no data adds zeros)."""
    if not world().distributed:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def all_sum(value: float) -> float:
    """The sum of `value` over all ranks."""
    if not world().distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, group=_CONTROL)
    return float(t)


def all_max(value: float) -> float:
    """The largest `value` over all ranks."""
    if not world().distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return float(t)


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (ranks that run a sharded model in lockstep ask it before each call)."""
    return all_max(1.0 if flag else 0.0) > 0


def from_main(obj: Any) -> Any:
    """Rank 0's copy of `obj` on every rank (so ranks that sampled on their own train on the same rows)."""
    if not world().distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def check_divisible(batch_size: int, key: str) -> None:
    """Every rank must take the same number of micro-batches per step (each one is a collective)."""
    w = world()
    if w.distributed and batch_size % w.size:
        from .errors import StageFailed

        raise StageFailed(f"{key}={batch_size} does not split over {w.size} processes: set {key} to a multiple of {w.size}")


def _layers(model) -> list[torch.nn.Module]:
    """The decoder blocks of a transformers model, however wrapped (peft, a reward head): the first `layers` list."""
    for name, mod in model.named_modules():
        if name.split(".")[-1] in ("layers", "h") and isinstance(mod, torch.nn.ModuleList):
            return list(mod)
    return []


class Sharded:
    """The model a trainer trains, and its optimiser: the stage's model itself in one process; with several, a
    sharded copy while the stage's model waits on the meta device, holding no memory, until `unshard` loads the
    trained weights back into it on every rank. Two engines shard (`hardware.sharding`):
    * fsdp2 (default): torch's `fully_shard` on each decoder block and the root;
    * deepspeed: DeepSpeed ZeRO stage 3 (`pip install -e '.[deepspeed]'`; on the CPU its CPU accelerator over gloo);
    * replicated: not sharded, every rank holds the whole model, the gradients are summed over ranks (PPO with LoRA).
    The trainer's loop is the same for every engine: `backward(loss)` per micro-batch, `step(scheduler)` per optimiser step.
    `micro_batches`: backward calls per optimiser step on each rank (DeepSpeed counts them to know when to step).
    `compile`: each decoder block's forward compiled while it trains (`compile_layers`), back to eager after `unshard`."""

    def __init__(self, model, device: str, make_optimizer, engine: str = "fsdp2", micro_batches: int = 1,
                 max_grad_norm: float = 1.0, compile: bool = False):
        self.world = world()
        self.plain = model
        self.max_grad_norm = max_grad_norm
        self.engine = engine if self.world.distributed else "single"
        from .models import is_quantized

        # a QLoRA base (4-bit, frozen, read from its artifact) stays out of checkpoints: they hold only what trains
        self.frozen_out = is_quantized(model)
        if not self.world.distributed or engine == "replicated":  # replicated: every rank holds it whole (PPO's default)
            self.module = compile_layers(model, compile)
            self.optimizer = make_optimizer(model)
            return
        if engine not in ("fsdp2", "deepspeed"):
            raise ValueError(f"hardware.sharding must be 'fsdp2' or 'deepspeed', got {engine!r}")
        if engine == "fsdp2":  # rank 0's weights, a tensor at a time: the other ranks may hold `model` on meta (`load_device`)
            state, buffers = _take_weights(model)  # `model` is now the shell: same modules and names, no storage
            shard = compile_layers(copy.deepcopy(model), compile)  # compiled before sharding: the hooks stay outside
            self.module = _shard_from_main(shard, state, buffers, device)
            del state, buffers
            # non-persistent buffers (rotary frequencies) are in no state dict: keep them for `unshard`
            self._buffers = {n: b.detach().to("cpu", copy=True) for n, b in shard.named_buffers()}
            self.optimizer = make_optimizer(shard)
            return
        shard = compile_layers(copy.deepcopy(model), compile)
        self._buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        model.to("meta")
        self.optimizer = make_optimizer(shard)  # the torch optimiser DeepSpeed wraps: the scheduler sets its lr
        self.module = _deepspeed_engine(shard, self.optimizer, device, micro_batches, max_grad_norm, self.world)

    @property
    def grad_scale(self) -> float:
        """FSDP and DeepSpeed average gradients over ranks; a rank's loss is its share of the global sum, so scale it
        back (a replicated model's gradients are summed)."""
        return 1.0 if self.engine == "replicated" else float(self.world.size)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate one micro-batch's gradient."""
        if self.engine == "deepspeed":
            self.module.backward(loss, scale_wrt_gas=False)  # our losses are already each micro-batch's share
            self.module.step()  # DeepSpeed steps at the last micro-batch of a step (clipping there) and counts the others
        else:
            loss.backward()

    def step(self, scheduler) -> float:
        """Clip the gradient to `max_grad_norm`, step the optimiser and `scheduler`, clear the gradient. Returns
        the gradient's norm before clipping."""
        if self.engine == "deepspeed":  # the engine stepped at the last micro-batch's `backward`
            scheduler.step()
            return float(self.module.get_global_grad_norm())
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.engine == "replicated":
            all_reduce_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if scheduler is not None:
            scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def state(self) -> tuple[dict, dict]:
        """Full (unsharded) model and optimiser state dicts on the CPU, keyed by parameter name on every path,
        so a checkpoint resumes with any number of processes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.module, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                               ignore_frozen_params=self.frozen_out))

    def load_state(self, model_state: dict, optim_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(self.module, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, strict=not self.frozen_out))

    @contextlib.contextmanager
    def gathered(self, whole: bool = True):
        """Inside, every rank holds the whole model (FSDP2: every unit all-gathered once and kept), so that its
        submodules can be called directly and without collectives, as sampling does; resharded on leaving. Needs
        the memory of the whole model on each rank, as TRL's generation under ZeRO-3 does by default.
        whole=False (`hardware.shard_inference`, models too big for one device): only the root's own weights
        (embeddings, final norm, heads) are gathered; each block gathers itself in its forward, so every rank must
        make the same calls (`generate(lockstep=True)`)."""
        if self.engine != "fsdp2":
            yield self.module
            return
        from torch.distributed.fsdp import FSDPModule

        # FSDP2 initialises at the root's first forward; sampling calls submodules only (private API, torch 2.13)
        self.module._get_fsdp_state()._lazy_init()
        if not whole:
            self.module.unshard()  # not recursive: the root unit alone
            try:
                yield self.module
            finally:
                self.module.reshard()
            return
        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        self.module.set_reshard_after_forward(False)
        for unit in units:
            unit.unshard()
        try:
            yield self.module
        finally:
            for unit in units:
                unit.reshard()
            self.module.set_reshard_after_forward(True)
            self.module.set_reshard_after_forward(False, recurse=False)  # the root's default: kept for its backward

    def model_state(self) -> dict:
        """The full model state dict on the CPU, keyed by parameter name, on rank 0 (the other ranks get an empty
        dict: it is for rank 0 to save). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))

    def save_shards(self, directory) -> None:
        """Every rank writes its own shard of the model and optimiser state under `directory`; nothing is gathered.
        fsdp2: torch.distributed.checkpoint (a file per rank plus `.metadata`), which any number of processes reads
        back; deepspeed: the engine's own checkpoint, which resumes with the same number of processes. Collective."""
        if self.engine == "deepspeed":
            self.module.save_checkpoint(str(directory), tag="state", save_latest=False)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=StateDictOptions(ignore_frozen_params=self.frozen_out))
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory))

    def load_shards(self, directory) -> None:
        """Read a `save_shards` checkpoint into this model and optimiser: each rank reads the slices it holds. Collective."""
        if self.engine == "deepspeed":
            self.module.load_checkpoint(str(directory), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        # get_state_dict creates the optimiser's moments (zeros) when it has taken no step yet, so there is room to read into
        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=StateDictOptions(ignore_frozen_params=self.frozen_out))
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(strict=not self.frozen_out))

    def unshard(self, device: str):
        """The stage's model with the trained weights (every rank), for saving, sampling and scoring."""
        if self.engine in ("single", "replicated"):
            return compile_layers(self.plain, False)  # the stage samples with it next: eager, as it came
        if self.engine == "deepspeed":
            import deepspeed

            inner = self.module.module
            with deepspeed.zero.GatheredParameters(list(inner.parameters()), modifier_rank=None):  # whole on every rank
                full = {k: v.detach().to("cpu", copy=True) for k, v in inner.state_dict().items()}
            self.module.destroy()
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            # gathered a tensor at a time into host memory, on every rank (in the same order: each gather is a collective),
            # so that the device holds one whole copy (`plain`), not two. (cpu_offload=True would leave ranks > 0 empty.)
            # A rank asked for "meta" joins every gather and keeps nothing.
            full = {}
            for k, v in get_model_state_dict(self.module).items():
                whole = v.full_tensor() if hasattr(v, "full_tensor") else v
                if device != "meta":
                    full[k] = whole.detach().to("cpu", copy=True)
                del whole
        training = self.module.training
        if device == "meta":  # the trained model lives on rank 0 (host memory); this rank's stays an empty shell
            del self.module
            return self.plain.train(training)
        self.plain.to_empty(device=device)
        self.plain.load_state_dict(full, strict=True)
        with torch.no_grad():
            for name, buf in self.plain.named_buffers():
                buf.copy_(self._buffers[name])
        from .models import unwrap_peft

        inner = unwrap_peft(self.plain)
        if hasattr(inner, "tie_weights"):
            inner.tie_weights()
        self.plain.train(training)
        del self.module
        return self.plain


def compile_layers(model, on: bool = True):
    """`model` with each decoder block's forward compiled by `torch.compile` (regional compilation: the blocks share one
    graph, compiled in seconds, where the whole model would take minutes and recompile per sequence length), or back
    to eager with `on=False`. Off by default: it fuses the norm, rotary and activation element-wise work that takes
    about half of an SFT step on a GPU (`bench/gpu_sft_variants.py`), and on a CPU it gains little for its compile time."""
    for layer in _layers(model):
        if on and "forward" not in vars(layer):
            layer.forward = torch.compile(layer.forward)
        elif not on:
            vars(layer).pop("forward", None)  # the class's forward again
    return model


def _fully_shard(module):
    """`module` sharded in place with FSDP2: each decoder block a unit, the rest in the root's."""
    from torch.distributed.fsdp import fully_shard

    for layer in _layers(module):
        fully_shard(layer)
    fully_shard(module)
    return module


def free_memory(device: str) -> None:
    """Collect what the training left (FSDP2's modules hold reference cycles) and give the device's cached blocks back,
    before a stage loads the next model."""
    import gc

    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def on_main(fn):
    """`fn()` run by rank 0 alone (an external command, say), its result given to every rank; its `StageFailed` is
    raised on every rank, so that none waits for a rank that stopped."""
    from .errors import StageFailed

    if not world().distributed:
        return fn()
    result = None
    if world().is_main:
        try:
            result = ("ok", fn())
        except StageFailed as e:
            result = ("failed", str(e))
    kind, value = from_main(result)
    if kind == "failed":
        raise StageFailed(value)
    return value


def load_device(cfg, device: str) -> str:
    """Where a stage that trains loads its model, and gets it back after training: the device; or, when the model is too
    big for one device (`hardware.shard_inference` in several processes, FSDP2), rank 0's host memory and, on the other
    ranks, the meta device (the modules without weights): `Sharded` gives each rank its shard of rank 0's weights, and
    `unshard` gathers the trained ones into rank 0's host memory alone."""
    if not big_model(cfg):
        return device
    return "cpu" if world().is_main else "meta"


def big_model(cfg) -> bool:
    """Whether this run's models are too big for one device: `hardware.shard_inference` in several processes with FSDP2."""
    return cfg.hardware.shard_inference and world().distributed and cfg.hardware.sharding == "fsdp2"


def load_sharded(load, device: str, wrap=None):
    """A model that only runs forward (sampling, scoring) FSDP2-sharded over the ranks from the start, so that no
    device, and no host but rank 0's, ever holds it whole: rank 0 reads it into host memory (`load("cpu")`), the other
    ranks build the same modules on the meta device (`load("meta")`: from its config, no weights read, no memory held,
    `pipeline.models.on_meta`), and each rank then receives only its shard of rank 0's weights (torch's
    `set_model_state_dict` with `broadcast_from_rank0`). In one process: `load(device)`. Every rank must call it (or its submodules) as many times
    as every other rank (each call gathers the blocks: a collective), which `generate(lockstep=True)` and
    `reward_models.model.score(lockstep=True)` see to. `wrap`: a module put around the model on every rank before it is
    sharded, when the forward that runs is the wrapper's (a reward model's `RewardForward`)."""
    wrap = wrap or (lambda m: m)
    if not world().distributed:
        return wrap(load(device)).eval()
    model = wrap(load("cpu" if world().is_main else "meta"))
    _shard_from_main(model, *_take_weights(model), device)
    # the root's own weights (embeddings, final norm, heads: small) stay gathered, so that submodules can be called
    # directly (a reward model's trunk, the chunked log-probs of `evaluate`'s KL): each block gathers itself
    model._get_fsdp_state()._lazy_init()  # (private API, torch 2.13) FSDP2 initialises at the root's first call
    model.set_reshard_after_forward(False, recurse=False)
    model.unshard()  # not recursive: the root unit alone
    return model.eval()


def _retie(module):
    """`module` with its transformers models' tied weights (embeddings and LM head) one parameter again: moving a model
    to the meta device unties them."""
    from transformers import PreTrainedModel

    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            m.tie_weights()
    return module


def _take_weights(module) -> tuple[dict, dict | None]:
    """Rank 0's state dict and buffers of `module` (its tensors referenced, not copied; ({}, None) on the other ranks),
    and `module` left on the meta device: the shell that `_shard_from_main` fills."""
    main = world().is_main
    state = module.state_dict() if main else {}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()} if main else None
    module.to("meta")
    return state, buffers


def _shard_from_main(module, state: dict, buffers: dict | None, device: str):
    """`module`, on the meta device on every rank (`_take_weights`), FSDP2-sharded in place and filled with rank 0's
    weights: `state` (rank 0's full state dict, {} elsewhere) is broadcast a tensor at a time and each rank keeps its shard (torch's
    `set_model_state_dict` with `broadcast_from_rank0`); so are the buffers no state dict holds (`buffers`: rank 0's,
    None elsewhere). No host but rank 0's, and no device, ever holds the whole model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    _fully_shard(_retie(module))
    module.to_empty(device=device)
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if buffers is not None:
                buf.copy_(buffers[name])
            dist.broadcast(buf.data, src=0)
    return module


def shard_frozen(module, device: str):
    """`module` (a model that only runs forward, as PPO's frozen reference) sharded with FSDP2 over the ranks: each
    decoder block and the root, gathered a block at a time in its forward; unchanged in one process. Call the root."""
    if not world().distributed:
        return module
    _shard_from_main(module, *_take_weights(module), device)  # rank 0's weights (ranks > 0 may hold a meta copy)
    # FSDP2 keeps a root's weights gathered after its forward, for the backward that follows; this one has none
    module._get_fsdp_state()._lazy_init()  # (private API, torch 2.13: the root is special-cased at initialisation)
    module.set_reshard_after_forward(True, recurse=False)
    return module


def _deepspeed_engine(module, optimizer, device: str, micro_batches: int, max_grad_norm: float, w: World):
    """`module` partitioned by DeepSpeed ZeRO-3 with `optimizer`, stepping every `micro_batches` backward calls.
    Written for DeepSpeed 0.19; the training precision stays ours (float32 master weights, the stage's bf16 autocast)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    try:
        import deepspeed
    except ImportError as e:
        from .errors import StageFailed

        raise StageFailed("hardware.sharding=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]' "
                          "(or set hardware.sharding=fsdp2, the default)") from e
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins the process group `init` made
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": micro_batches,
              "train_batch_size": micro_batches * w.size, "gradient_clipping": max_grad_norm,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": False}, "fp16": {"enabled": False}, "steps_per_print": 1 << 30}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def barrier() -> None:
    if world().distributed:
        import torch.distributed as dist

        dist.barrier(group=_CONTROL)
