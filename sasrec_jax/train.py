"""Training: optimizer and schedule, the pure jitted train step, data-parallel sharding, and the epoch loop
with validation, early stopping, time budget, checkpoints and exact resume."""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sasrec_serve.ids import PAD

from sasrec_jax import checkpoint, distributed, evaluate, loggers, logs, losses, runs
from sasrec_jax.batches import Batch, Batcher
from sasrec_jax.budget import Clock, minutes, plan_evaluation
from sasrec_jax.config import ModelConfig, TrainConfig
from sasrec_jax.data import SequenceSet, Split
from sasrec_jax.errors import ConfigError, ResourceError, TrainingError
from sasrec_jax.inference import make_scorer
from sasrec_jax.model import init_model, merge

VALID_METRIC = "NDCG@10"


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up to `cfg.lr`, after global-norm gradient clipping.

    The decay after warm-up (`cfg.schedule`) is applied by the train step as a host-computed multiplier
    (`lr_factor`): that is what lets a cosine end exactly when a time budget does, which a step-indexed optax
    schedule cannot know in advance. Weight decay skips biases, layer-norm scales and the position table
    (decaying them only hurts); it does apply to the item embeddings, the bulk of the parameters."""
    warmup = warmup_steps(cfg, steps_per_epoch)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)], [warmup]
    )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, p: p.ndim == 2 and "pos_embed" not in jax.tree_util.keystr(path), params
        )

    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay, mask=decay_mask))
    if cfg.ema_decay > 0:
        chain.append(params_ema(cfg.ema_decay))
    return optax.chain(*chain)


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    # at most one epoch of warm-up: a small data set (ML-100K: 8 steps per epoch) must not spend 12 epochs on it
    return min(cfg.warmup_steps, steps_per_epoch, max(cfg.epochs * steps_per_epoch - 1, 0))


def learning_rate(cfg: TrainConfig, step_index: int, warmup: int, lr_scale: float) -> float:
    """The learning rate step `step_index` (from 0) takes: build_optimizer's warm-up times the decay multiplier."""
    return cfg.lr * (step_index / warmup if step_index < warmup else 1.0) * lr_scale


class EmaState(NamedTuple):
    # shadows tuple.count, as optax's own states do (ScaleByAdamState.count); renaming would change the
    # optimizer-state tree that checkpoints store
    count: jax.Array  # type: ignore[assignment]
    ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
    """Keeps an exponential moving average of the parameters in the optimizer state, so checkpoints and exact
    resume carry it; the updates pass through unchanged.

    Step t folds in the parameters it starts from (the result of steps 1..t-1) with weight 1 - d_t, where
    d_t = min(decay, (1 + t) / (10 + t)): early on the average follows the weights closely instead of dragging
    the random initialisation along, later it spans ~1 / (1 - decay) steps."""

    def init(params):
        return EmaState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(lambda p: jnp.array(p, jnp.float32), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("params_ema needs the parameters: call update(updates, state, params)")
        t = (state.count + 1).astype(jnp.float32)
        d = jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
        ema = jax.tree_util.tree_map(lambda e, p: e + (1.0 - d) * (p.astype(jnp.float32) - e), state.ema, params)
        return updates, EmaState(state.count + 1, ema)

    return optax.GradientTransformation(init, update)


def averaged_params(params, opt_state):
    """The weights that validation, the `best` checkpoint and export use: the moving average when the optimizer
    keeps one (`params_ema`), cast back to each parameter's dtype; else the raw weights."""
    ema = optax.tree_utils.tree_get(opt_state, "ema")
    if ema is None:
        return params
    return jax.tree_util.tree_map(lambda e, p: e.astype(p.dtype), ema, params)


FINAL_LR_FRACTION = 0.01


def lr_factor(cfg: TrainConfig, progress: float) -> float:
    """The learning-rate multiplier at `progress` in [0, 1] of the run (1.0 throughout for "constant").

    "cosine" decays from 1 to FINAL_LR_FRACTION; progress is the larger of steps done / steps planned and,
    with a time budget, minutes used / minutes allowed — so a budgeted run anneals before it is cut off."""
    if cfg.schedule != "cosine":
        return 1.0
    p = min(max(progress, 0.0), 1.0)
    return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * p))


# ---------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------


def loss_fn(graphdef, params, batch: dict, key: jax.Array, cfg: TrainConfig) -> jax.Array:
    model = merge(graphdef, params)
    k_dropout, k_negatives = jax.random.split(key)
    h_BxLxD = model.hidden(batch["inputs"], key=k_dropout)
    idx_SxN = batch["idx"]  # per device (S of them), its positions: the gather stays on the device
    S, D = idx_SxN.shape[0], h_BxLxD.shape[-1]
    h_NxD = jnp.take_along_axis(h_BxLxD.reshape(S, -1, D), idx_SxN[:, :, None], axis=1).reshape(-1, D)
    t_N = jnp.take_along_axis(batch["targets"].reshape(S, -1), idx_SxN, axis=1).reshape(-1)
    w_N = batch["weight"].reshape(-1)
    table_VxD = model.item_table()
    if cfg.loss == "ce":
        return losses.full_softmax_ce(h_NxD, table_VxD, t_N, w_N, cfg.label_smoothing)
    if cfg.loss == "sampled":
        return losses.sampled_softmax(h_NxD, table_VxD, t_N, w_N, k_negatives, cfg.num_negatives)
    return losses.binary_ce(h_NxD, table_VxD, t_N, w_N, k_negatives, cfg.num_negatives)


def _zero_item_embeddings(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "item_embed" in jax.tree_util.keystr(path) else x, tree
    )


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: TrainConfig):
    """A pure step (params, opt_state, batch, step) -> (params, opt_state, loss), compiled once per shape."""

    @partial(jax.jit, static_argnames=("freeze_items",), donate_argnums=(0, 1))
    def step(params, opt_state, batch, step_index, seed, lr_scale=1.0, freeze_items: bool = False):
        key = jax.random.fold_in(jax.random.key(seed), step_index)  # dropout/negatives depend only on (seed, step)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(graphdef, p, batch, key, cfg))(params)
        if freeze_items:
            grads = _zero_item_embeddings(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        if freeze_items:
            updates = _zero_item_embeddings(updates)
        # AdamW's update is -lr·(adam + wd·p): scaling it scales the learning rate (the decay, see lr_factor)
        updates = jax.tree_util.tree_map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


# ---------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Data parallelism over a 1-D mesh of all devices of all processes: batches split on their first axis,
    parameters replicated. Devices are ordered by process, so each process feeds one contiguous block of rows."""

    mesh: Mesh

    @classmethod
    def create(cls, devices=None) -> Placement:
        devices = list(devices) if devices is not None else jax.devices()
        devices.sort(key=lambda d: (d.process_index, d.id))
        return cls(Mesh(np.array(devices), ("data",)))

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def local_shards(self) -> range:
        """This process's devices, as positions in the mesh (contiguous by construction)."""
        mine = [i for i, d in enumerate(self.mesh.devices.flat) if d.process_index == jax.process_index()]
        if not mine:
            raise TrainingError(f"none of the devices given is on this process ({jax.process_index()})")
        return range(mine[0], mine[-1] + 1)

    def replicate(self, tree):
        # through host memory: an array committed to one local device cannot be re-placed across processes
        return jax.device_put(jax.device_get(tree), NamedSharding(self.mesh, P()))

    def shard_batch(self, x: np.ndarray) -> jax.Array:
        """This process's rows → the global array split over the mesh's devices."""
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P("data")), x)

    def put_batch(self, batch: Batch) -> dict:
        return {
            "inputs": self.shard_batch(batch.inputs_BxL),
            "targets": self.shard_batch(batch.targets_BxL),
            "idx": self.shard_batch(batch.idx_SxN),
            "weight": self.shard_batch(batch.weight_SxN),
        }

    def round_batch(self, batch_size: int) -> int:
        return math.ceil(batch_size / self.num_devices) * self.num_devices


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LoopState:
    """Everything besides params/optimizer that resume needs (saved as the checkpoint's meta)."""

    epoch: int = 0  # epochs completed
    step: int = 0
    batch: int = 0  # batches of epoch `epoch + 1` already trained: a checkpoint taken inside an epoch
    epoch_loss: float = 0.0  # the sum of those batches' losses
    best_metric: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    seconds: float = 0.0
    progress: float = 0.0  # fraction of the schedule used (see lr_factor); a resume continues from it
    stopped: str = ""
    history: list = field(default_factory=list)

    def to_meta(self) -> dict:
        return dict(self.__dict__)


@dataclass
class FitResult:
    graphdef: Any
    params: dict  # best validation params
    loop: LoopState
    eval_plan: dict = field(default_factory=dict)  # the user samples of validation and of the final evaluation


def memory_in_use() -> str:
    """Host RSS now (Linux /proc; else the peak) and, on GPU/TPU, the first device's bytes in use."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = f"RSS {rss / 2**30:.1f} GB"
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats and jax.local_devices()[0].platform != "cpu":
        out += f", device {stats['bytes_in_use'] / 2**30:.1f} GB"
    return out


@contextmanager
def memory_errors(what: str, model_cfg: ModelConfig, cfg: TrainConfig, batch_size: int):
    """Turns an allocation failure (XLA's RESOURCE_EXHAUSTED on any device, or numpy's MemoryError) into one
    ResourceError line that names the buffer, the catalogue and the batch, and what to change."""
    try:
        yield
    except ResourceError:
        raise
    except Exception as e:  # XLA raises JaxRuntimeError; its message is the only reliable marker
        text = f"{type(e).__name__}: {e}"
        if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
            raise
        found = re.search(r"allocat\w* (\d+) bytes", text)
        size = f"a buffer of {int(found.group(1)) / 2**30:.1f} GB" if found else "memory"
        if what == "evaluation":
            fix = f"a smaller --eval-batch-size (now {cfg.eval_batch_size}) or fewer --valid-users"
        else:
            fix = f"a smaller --batch-size (now {batch_size}) or --max-len (now {model_cfg.max_len})"
            fix += ", or --loss sampled" if cfg.loss == "ce" else ""
        raise ResourceError(
            f"out of memory in {what}: {size} could not be allocated (catalogue {model_cfg.num_items:,} items, "
            f"batch {batch_size} × {model_cfg.max_len}, d={model_cfg.dim}, loss {cfg.loss}); try {fix}. "
            "A run directory keeps its last checkpoint: continue it with --resume"
        ) from None


# Inside a long epoch, a status line (steps/s, ETAs, memory) is logged this often.
STATUS_LOG_SECONDS = 300.0

# Tests replace this to stop a run at an exact point (e.g. kill the process right after the n-th save).
_after_checkpoint = None


def fit(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    split: Split,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    init_params=None,
    devices=None,
    progress: bool = True,
    log=logs.info,
) -> FitResult:
    """Trains with validation every epoch, early stopping on validation NDCG@10 and an optional time budget that
    covers training, validation and the final evaluation together.

    With `run_dir`, `last` (the resume point) is saved every `cfg.checkpoint_minutes` and before every validation,
    and `best` on improvement; a resume continues inside an epoch exactly (data order, RNG and schedule depend only
    on the seed and the step). `resume` with no `last` checkpoint yet starts from the beginning.
    The training rows are `split.train.training_rows(max_len, cfg.train_windows)`: int32 (inputs, targets); a
    target set to PAD adds no loss."""
    if resume and run_dir is None:
        raise ConfigError("resume=True needs the run_dir of the run to continue")
    if cfg.log_targets:  # on every process, before any of them waits on another
        if run_dir is None:
            raise ConfigError("log_to writes into the run directory: give fit a run_dir (or leave log_to empty)")
        loggers.check_available(cfg.log_targets)
    placement = Placement.create(devices)
    batch_size = placement.round_batch(cfg.batch_size)
    if not distributed.is_main():  # process 0 logs and draws the bars for all
        log, progress = (lambda *_: None), False
    with memory_errors("building the training windows", model_cfg, cfg, batch_size):
        inputs, targets = split.train.training_rows(model_cfg.max_len, cfg.train_windows)
    has_target = (targets != PAD).any(axis=1)
    inputs, targets = inputs[has_target], targets[has_target]
    if len(inputs) == 0:
        raise TrainingError("no training sequence has two or more items: nothing to learn from")
    batcher = Batcher.create(inputs, targets, batch_size, placement)
    steps_per_epoch = batcher.steps_per_epoch

    with memory_errors("model initialisation", model_cfg, cfg, batch_size):
        graphdef, params = init_model(model_cfg, cfg.seed)
        if init_params is not None:
            params = init_params(params)
        tx = build_optimizer(cfg, steps_per_epoch)
        opt_state = tx.init(params)
        params, opt_state = placement.replicate(params), placement.replicate(opt_state)
    loop = LoopState()
    best_params = params
    ckpt = checkpoint.Checkpoints(run_dir) if run_dir is not None else None
    if resume and ckpt is not None and ckpt.has_state():
        params, opt_state, meta = ckpt.restore_state(params, opt_state)
        params, opt_state = placement.replicate(params), placement.replicate(opt_state)  # no-op unless msgpack
        loop = LoopState(**meta)
        if checkpoint.has_best(ckpt.run_dir):
            best_params = placement.replicate(checkpoint.load_best(ckpt.run_dir, jax.device_get(params)))
        if loop.stopped.startswith("time budget"):  # a budget stop: go on from where it stopped
            loop.stopped = ""
        where = f"inside epoch {loop.epoch + 1} (batch {loop.batch:,})" if loop.batch else f"after epoch {loop.epoch}"
        log(f"resuming {where}, step {loop.step:,}, best {VALID_METRIC} {loop.best_metric:.4f}")
        if loop.stopped:
            log(f"nothing to resume: the run ended with '{loop.stopped}'")
    elif resume:
        log(f"no checkpoint in {run_dir} yet: training from the beginning")
    step_fn = make_train_step(graphdef, tx, cfg)
    score_fn = make_scorer(graphdef, placement)
    eval_bs = evaluate.eval_batch_size(model_cfg.num_items, cfg.eval_batch_size, placement.num_devices)
    clock = Clock(cfg.max_minutes * 60.0 if cfg.max_minutes else math.inf)
    V, L = model_cfg.num_items, model_cfg.max_len

    def validate(params_now, windows: SequenceSet, bar: bool = False) -> dict:
        with memory_errors("evaluation", model_cfg, cfg, batch_size):
            ranking = evaluate.rank(
                score_fn(params_now),
                windows,
                V,
                L,
                progress=bar,
                exclude_seen=cfg.exclude_seen,
                batch_size=eval_bs,
                desc="validation",
                position=1,  # below the run's bar
                loss=True,
            )
        return ranking.summary(V)

    def time_batch(windows: SequenceSet) -> float:
        t0 = time.perf_counter()
        validate(params, windows)
        return distributed.from_main(time.perf_counter() - t0)  # one plan for all processes

    baselines: dict = {}  # built on the first timing (like a compile, that one is not kept), reused by the second

    def time_baselines(windows: SequenceSet) -> float:
        t0 = time.perf_counter()
        baselines.update(baselines or evaluate.baseline_scorers(split.train, V))
        for score in baselines.values():
            evaluate.rank(score, windows, V, L, exclude_seen=cfg.exclude_seen, batch_size=eval_bs)
        return distributed.from_main(time.perf_counter() - t0)

    # Only a budget needs the baselines timed; the estimator's split has training sequences to fit them on (a
    # protocol's own split, e.g. prefix_protocol's masked rows, has not, and evaluates its own baselines).
    timed = math.isfinite(clock.budget_s) and isinstance(split.train, SequenceSet)
    plan = plan_evaluation(
        cfg, split, time_batch, eval_bs, clock.budget_s, log, time_baselines=time_baselines if timed else None
    )
    valid_windows = split.valid.take(plan.valid_rows)
    validation_s = plan.seconds(len(plan.valid_rows))
    clock.reserve_s = validation_s + plan.final_seconds()
    if math.isfinite(clock.budget_s):
        log(
            f"time budget {cfg.max_minutes:g} min ({minutes(clock.used())} used so far): training until "
            f"~{minutes(clock.training_s)}, then the last validation (~{minutes(validation_s)}) and the final "
            f"evaluation (~{minutes(plan.final_seconds())})"
        )
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    warmup = warmup_steps(cfg, steps_per_epoch)
    progress_at_start = loop.progress
    last_save = last_log = time.perf_counter()
    scalars = loggers.Scalars(cfg.log_targets if distributed.is_main() else (), run_dir)
    final_s = plan.final_seconds() if math.isfinite(clock.budget_s) else None  # the budget holds it
    bar = loggers.RunBar(progress, loop.epoch + 1, cfg.epochs, final_s)
    steps_per_s = 0.0  # training steps per second, measured (0: not yet)

    def save_last():
        """Starts an asynchronous save of the resume point; returns the seconds it blocked training."""
        nonlocal last_save
        if ckpt is None:
            return
        t0 = time.perf_counter()
        ckpt.save_state(params, opt_state, loop.to_meta())
        last_save = time.perf_counter()
        if _after_checkpoint is not None:
            ckpt.wait()
            _after_checkpoint(loop)
        return last_save - t0

    def take(pending: tuple) -> float:
        """The loss of a step taken earlier (the host reads it one step late), checked and logged."""
        loss, step, lr = pending
        value = _checked(loss, step)
        scalars.train_step(step, loop.epoch + 1, value, lr)
        return value

    def time_left() -> loggers.TimeLeft:
        return loggers.time_left(
            steps_left=(cfg.epochs - loop.epoch) * steps_per_epoch - loop.batch,
            steps_per_s=steps_per_s,
            validations_left=cfg.epochs - loop.epoch,
            validation_s=validation_s,
            training_left_s=clock.training_s - clock.used(),
        )

    try:
        while loop.epoch < cfg.epochs and not loop.stopped:
            epoch = loop.epoch + 1
            t0, steps_before, seconds_before = time.perf_counter(), loop.batch, loop.seconds
            freeze = epoch <= cfg.freeze_embeddings_epochs
            pending: tuple | None = None  # (loss, step, learning rate) of the last step, not read yet
            out_of_time, rate_from = False, None
            with memory_errors("the train step", model_cfg, cfg, batch_size):
                for batch in batcher.batches(cfg.seed, epoch, skip=loop.batch):
                    used = progress_at_start + clock.used() / max(clock.training_s, 1e-9)
                    loop.progress = max(loop.step / total_steps, min(used, 1.0), loop.progress)
                    factor = lr_factor(cfg, loop.progress)
                    lr_scale, lr = np.float32(factor), learning_rate(cfg, loop.step, warmup, factor)
                    on_devices = placement.put_batch(batch)
                    params, opt_state, loss = step_fn(
                        params, opt_state, on_devices, loop.step, cfg.seed, lr_scale, freeze_items=freeze
                    )
                    loop.step += 1
                    if pending is not None:  # read the previous loss: the host never waits on the current step
                        loop.epoch_loss += take(pending)
                    pending = (loss, loop.step, lr)
                    loop.batch += 1
                    done, now = loop.batch - steps_before, time.perf_counter()
                    if rate_from is None:  # the rate counts from the end of the epoch's first step (a compile)
                        rate_from = (now, loop.batch)
                    elif now > rate_from[0]:
                        steps_per_s = (loop.batch - rate_from[1]) / (now - rate_from[0])
                    if bar.due():  # reading memory costs a syscall
                        detail = [f"batch {loop.batch:,}/{steps_per_epoch:,}"]
                        detail += [f"{steps_per_s:.2f} steps/s"] if steps_per_s else []
                        if loop.batch > 1:  # the losses read so far: all but the last step's
                            detail.append(f"loss {loop.epoch_loss / (loop.batch - 1):.4f}")
                        detail.append(memory_in_use())
                        bar.show(epoch=epoch, used_s=clock.used(), left=time_left(), detail=", ".join(detail))
                    if now - last_log > STATUS_LOG_SECONDS:  # a line in logs too, where no bar is drawn
                        log(f"step {loop.step:,} ({_status(loop, done / (now - t0), clock, steps_per_epoch)})")
                        last_log = now
                    save_due = bool(cfg.checkpoint_minutes) and now - last_save > cfg.checkpoint_minutes * 60
                    # decided together: every process stops or saves on the same step, whatever its own clock says
                    over, save_due = distributed.any_true(clock.training_over(), save_due)
                    if over:
                        out_of_time = True
                        loop.progress = 1.0  # the budget, and with it the schedule, is used up
                        break
                    if save_due:
                        loop.epoch_loss += take(pending)
                        pending = None
                        loop.seconds = seconds_before + time.perf_counter() - t0
                        took = save_last()
                        if took is not None:
                            log(f"step {loop.step:,}: checkpoint started (training paused {took:.2f} s)")
                if pending is not None:
                    loop.epoch_loss += take(pending)
            train_loss = loop.epoch_loss / max(loop.batch, 1)
            loop.seconds = seconds_before + time.perf_counter() - t0
            save_last()  # before validating: a long validation killed halfway loses no training

            bar.show(epoch=epoch, used_s=clock.used(), left=time_left(), detail="validating", force=True)
            eval_params = averaged_params(params, opt_state)
            t_valid = time.perf_counter()
            valid = validate(eval_params, valid_windows, bar=progress)
            t_valid = time.perf_counter() - t_valid
            validation_s = t_valid  # the time left counts the next validations at the last one's speed
            # a validation slower than planned: the budget keeps room for the last one at the speed measured
            clock.reserve_s = max(clock.reserve_s, t_valid + plan.final_seconds())
            complete = loop.batch >= steps_per_epoch
            if complete:
                loop.epoch, loop.batch, loop.epoch_loss = epoch, 0, 0.0
            loop.seconds = seconds_before + time.perf_counter() - t0
            improved = valid[VALID_METRIC] > loop.best_metric  # the same on every process: ranks are gathered
            if improved:
                loop.best_metric, loop.best_epoch, loop.bad_epochs = valid[VALID_METRIC], epoch, 0
                best_params = jax.tree.map(jnp.copy, eval_params)  # its own buffers: the step donates params
            else:
                loop.bad_epochs += 1
            loop.history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "valid_loss": valid["loss"],
                    "valid_ndcg@10": valid[VALID_METRIC],
                    "valid_hr@10": valid["HR@10"],
                    "seconds": round(loop.seconds, 2),
                    "step": loop.step,
                }
            )
            if run_dir is not None and distributed.is_main():  # after every validation: a run can be watched
                runs.write_history(Path(run_dir), loop.history)
            scalars.validation(
                loop.step,
                epoch,
                {
                    "train/epoch_loss": train_loss,
                    "valid/loss": valid["loss"],
                    "valid/ndcg_at_10": valid[VALID_METRIC],  # TensorBoard's tags take no "@"
                    "valid/hr_at_10": valid["HR@10"],
                },
            )
            log(
                f"epoch {epoch:3d}{'' if complete else f' (stopped at batch {loop.batch:,} of {steps_per_epoch:,})'}  "
                f"loss {train_loss:.4f}  valid loss {valid['loss']:.4f}  NDCG@10 {valid[VALID_METRIC]:.4f}  "
                f"HR@10 {valid['HR@10']:.4f}  {time.perf_counter() - t0:.1f}s (validation {t_valid:.1f}s)"
                + ("  *" if improved else "")
            )
            (over,) = distributed.any_true(clock.training_over())
            if out_of_time or over:
                loop.progress = 1.0
                loop.stopped = f"time budget of {cfg.max_minutes:g} min reached"
            elif cfg.patience and loop.bad_epochs >= cfg.patience:
                loop.stopped = f"early stop: no improvement for {cfg.patience} epochs"
            if ckpt is not None:
                if improved:
                    ckpt.save_best(loop.step, best_params, {"epoch": epoch, "valid": valid}, valid[VALID_METRIC])
                save_last()
            best = f"valid NDCG@10 {valid[VALID_METRIC]:.4f} (best {loop.best_metric:.4f}, epoch {loop.best_epoch})"
            bar.show(epoch=epoch, used_s=clock.used(), left=time_left(), detail=best, force=True)
    finally:
        last = loop.history[-1]["epoch"] if loop.history else loop.epoch
        ended = f"completed {loop.epoch} epochs" if loop.epoch >= cfg.epochs else "interrupted"  # by an error
        bar.close(epoch=last, used_s=clock.used(), why=loop.stopped or ended)
        scalars.close()
    if loop.stopped:
        log(loop.stopped + f"; best epoch {loop.best_epoch} ({VALID_METRIC} {loop.best_metric:.4f})")
    left = f", {minutes(clock.budget_s - clock.used())} of the budget left" if math.isfinite(clock.budget_s) else ""
    log(
        f"training done after {minutes(clock.used())}{left}; the final evaluation ({plan.test_users:,} test users, "
        f"with baselines) is expected to take ~{minutes(plan.final_seconds())}"
    )
    eval_plan = {
        "seed": cfg.seed,
        "valid_users": len(plan.valid_rows),
        "valid_of": len(split.valid),
        "test_users": plan.test_users,
        "test_of": len(split.test),
        "final_seconds_estimate": round(plan.final_seconds(), 1),
        "seconds_left": round(clock.budget_s - clock.used(), 1) if math.isfinite(clock.budget_s) else None,
    }
    if ckpt is not None:
        ckpt.wait()  # the last saves are on disk before fit returns
        ckpt.close()
    return FitResult(graphdef, jax.device_get(best_params), loop, eval_plan)


def _status(loop: LoopState, steps_per_s: float, clock: Clock, steps_per_epoch: int) -> str:
    """steps/s, the epoch's and the budget's time left, memory in use: the line logged every STATUS_LOG_SECONDS."""
    left = (steps_per_epoch - loop.batch) / max(steps_per_s, 1e-9)
    out = f"epoch {loop.epoch + 1}: batch {loop.batch:,}/{steps_per_epoch:,}, {steps_per_s:.2f} steps/s, "
    out += f"epoch ETA {minutes(left)}"
    if math.isfinite(clock.budget_s):
        out += f", training budget left {minutes(max(clock.training_s - clock.used(), 0.0))}"
    return out + f", {memory_in_use()}"


# Tests set this to see every step's loss: _on_loss(step, value), steps counted from 1.
_on_loss = None


def _checked(loss: jax.Array, step: int) -> float:
    value = float(loss)
    if _on_loss is not None:
        _on_loss(step, value)
    if not math.isfinite(value):
        raise TrainingError(
            f"the training loss became {value} at step {step}: training diverged. "
            "Try a lower --lr, a smaller --max-len or gradient clipping (clip_norm)."
        )
    return value
