"""The training loop in parts (t5x's trainer.py, MaxText's setup_train_loop / train_loop).

Each part has one job and is reused by every loop (pre-training today, RL post-training next):

  * `OptimizerConfig`, `make_optimizer`: AdamW with warm-up and decay.
  * `make_train_step`: `(state, batch, rng) -> (state, metrics)` for the NTP loss (another
    loop passes its own step function to `train_loop`).
  * `TrainStateFactory`: the abstract train state, its shardings, a sharded initialiser, the
    parameter-only abstract tree (for evaluation and the artifact).
  * `restore_or_init`: the restore order (resume this run, else load given weights, else
    initialise).
  * `train_loop`: steps a state with a step function over batches and calls hooks after each
    step: `ProgressHook` (console, TensorBoard, MFU), `EvalHook` (periodic validation and the
    best-on-validation weights), `CheckpointHook` (train state + data position + hook state).

The train state is a dict `{params, opt_state, step}` plus `ema_params` when
`OptimizerConfig.ema_decay > 0`; the whole dict is one Orbax checkpoint item.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from oxyjax import checkpoints
from oxyjax import distributed
from oxyjax import flops as flops_lib
from oxyjax import partitioning


# ====================================================================== optimizer
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warm-up then cosine (or linear / constant) decay."""

  learning_rate: float = 1e-3
  warmup_steps: int = 500
  decay: str = "cosine"  # cosine | linear | constant
  end_learning_rate_ratio: float = 0.05
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  grad_clip_norm: float = 1.0
  # > 0: also keep an exponential moving average of the weights (Polyak averaging), with the
  # warm-up d_t = min(ema_decay, (1 + t) / (10 + t)). Evaluation, the best-on-validation
  # checkpoint and the final metrics then use the average; the raw weights are still scored
  # at every evaluation (logged as validation_raw/...).
  ema_decay: float = 0.0


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
  warmup = max(0, min(cfg.warmup_steps, total_steps - 1))
  end = cfg.learning_rate * cfg.end_learning_rate_ratio
  if cfg.decay == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1), end)
  elif cfg.decay == "linear":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
         optax.linear_schedule(cfg.learning_rate, end, max(total_steps - warmup, 1))], [warmup])
  elif cfg.decay == "constant":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)), optax.constant_schedule(cfg.learning_rate)],
        [warmup])
  else:
    raise ValueError(f"unknown decay {cfg.decay!r}; expected cosine | linear | constant")
  # No weight decay on norms, biases and 1-d parameters.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
  )
  return tx, schedule


# ====================================================================== steps
def ema_update(ema_params, new_params, step, decay: float):
  """One Polyak-averaging step: d = min(decay, (1 + step) / (10 + step)) (step counts from 0)."""
  t = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema_params, new_params)


def eval_params(state):
  """The weights that evaluation and the best checkpoint use: the EMA when there is one."""
  return state.get("ema_params", state["params"])


def accumulate_gradients(loss_fn, params, batch, rng, grad_accum_steps: int):
  """Sums ``loss_fn(params, microbatch, rng_i) -> (loss_sum, aux)`` and its gradient over
  `grad_accum_steps` microbatches of interleaved rows (row i goes to microbatch i % A, so each
  device's shard of the batch is split locally). Returns (grads, loss_sum, aux), all sums: the
  caller divides by the summed denominator, so the result does not depend on A."""
  a = grad_accum_steps

  def micro(i, mb):
    r = jax.random.fold_in(rng, i)
    (loss_sum, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, r)
    return grads, loss_sum, aux

  if a == 1:
    return micro(0, batch)
  mbs = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1), batch)

  def body(carry, xs):
    i, mb = xs
    return jax.tree.map(jnp.add, carry, micro(i, mb)), None

  zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype),
                       jax.eval_shape(lambda: micro(0, jax.tree.map(lambda x: x[0], mbs))))
  out, _ = jax.lax.scan(body, zeros, (jnp.arange(a), mbs))
  return out


def apply_gradients(state, grads, tx: optax.GradientTransformation, ema_decay: float = 0.0):
  """One optimizer update of a train state (and of its EMA, when it has one)."""
  params = state["params"]
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  new_state = {**state, "params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
  if ema_decay > 0:
    new_state["ema_params"] = ema_update(state["ema_params"], new_params, state["step"], ema_decay)
  return new_state


def make_train_step(model, tx: optax.GradientTransformation, grad_accum_steps: int, ema_decay: float = 0.0):
  """(state, batch, rng) -> (state, metrics) for the model's NTP loss (`accumulate_gradients`,
  `apply_gradients`). With `ema_decay` > 0 the state also carries `ema_params`."""

  def train_step(state, batch, rng):
    a = grad_accum_steps
    grads, loss_sum, aux = accumulate_gradients(model.loss_fn, state["params"], batch,
                                                jax.random.fold_in(rng, state["step"]), a)
    denom = jnp.maximum(aux["denominator"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    new_state = apply_gradients(state, grads, tx, ema_decay)
    metrics = {"loss": loss_sum / denom, "token_accuracy": aux["correct"] / denom, "grad_norm": optax.global_norm(grads)}
    # Any other auxiliary scalar (Q2I parts, MoE load balance) is averaged over microbatches.
    metrics.update({k: v / a for k, v in aux.items() if k not in ("denominator", "correct")})
    return new_state, metrics

  return train_step


# ====================================================================== train state
class TrainStateFactory:
  """Shapes, shardings and a sharded initialiser of a model's train state on a mesh.

  `tx` may be None: then the state is parameters only (evaluation, serving), and
  `params_abstract` is what restores a parameter checkpoint onto this mesh.
  """

  def __init__(self, model, partitioner: partitioning.Partitioner, tx: optax.GradientTransformation | None = None,
               *, ema: bool = False):
    self.model, self.partitioner, self.tx, self.ema = model, partitioner, tx, ema
    dummy = model.dummy_batch(partitioner.data_parallel_size)
    self._dummy = dummy

    def init_state(rng):
      params = model.init(rng, dummy)
      if tx is None:
        return {"params": params}
      state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
      if ema:
        state["ema_params"] = params
      return state

    self._init_state = init_state
    with jax.set_mesh(partitioner.mesh), partitioner.rules_context():
      boxed = jax.eval_shape(init_state, jax.random.key(0))
      self.shardings = partitioner.params_shardings(boxed)
      abstract = partitioning.strip_boxes(boxed)
    self.abstract = checkpoints.abstract_with_shardings(abstract, self.shardings)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))

  @property
  def params_abstract(self):
    return self.abstract["params"]

  def batch_shardings(self):
    return {k: self.partitioner.data_sharding(np.ndim(v)) for k, v in self._dummy.items()}

  def init(self, rng):
    """A freshly initialised, sharded state."""
    part = self.partitioner
    with jax.set_mesh(part.mesh), part.rules_context():
      return jax.jit(lambda r: nn.unbox(self._init_state(r)), out_shardings=self.shardings)(rng)


class JointStateFactory:
  """A main model's train state with other models' train states beside it, each under its own
  key (post-training with a reward model that keeps training): checkpointed, restored and
  initialised as one pytree. `params_abstract` is the main model's, so `restore_or_init`'s
  `init_checkpoint` loads the main model's weights; `start_params` are the others' starting
  weights (their optimizer states start fresh)."""

  def __init__(self, main: TrainStateFactory, others: Mapping[str, TrainStateFactory],
               start_params: Mapping[str, Any] | None = None):
    clash = sorted(set(others) & set(main.abstract))
    if clash:
      raise ValueError(f"state key(s) {clash} are the main model's own")
    self.main, self.others, self.start_params = main, dict(others), dict(start_params or {})
    self.abstract = {**main.abstract, **{k: f.abstract for k, f in self.others.items()}}

  @property
  def params_abstract(self):
    return self.main.params_abstract

  def init(self, rng):
    state = self.main.init(rng)
    for i, (k, f) in enumerate(sorted(self.others.items())):
      sub = f.init(jax.random.fold_in(rng, i + 1))
      if k in self.start_params:
        sub = {**sub, "params": self.start_params[k]}
      state[k] = sub
    return state


def restore_or_init(factory: TrainStateFactory | JointStateFactory, *, ckpt: checkpoints.Checkpointer | None, init_rng,
                    init_checkpoint: str | None = None, log=print) -> tuple[Any, dict[str, Any] | None]:
  """The restore order (MaxText): the newest readable checkpoint of this run, else the weights
  in `init_checkpoint` (a parameter checkpoint or an artifact's params/), else a fresh state.
  Returns (state, data_state); data_state is None unless resumed."""
  if ckpt is not None:
    restored = ckpt.restore_latest(factory.abstract, log=log)
    if restored is not None:
      step0, state, data_state = restored
      log(f"[oxyjax] resumed from {ckpt.directory} step {step0}")
      return state, data_state
  state = factory.init(init_rng)
  if init_checkpoint:
    params, meta = checkpoints.load_params(init_checkpoint, factory.params_abstract)
    state = {**state, "params": params}
    if "ema_params" in state:
      state["ema_params"] = jax.tree.map(jnp.copy, params)
    log(f"[oxyjax] loaded weights from {init_checkpoint} ({meta})")
  return state, None


# ====================================================================== the loop
@dataclasses.dataclass
class StepInfo:
  """What hooks see after each step."""

  step: int  # steps done so far (the state's step)
  total_steps: int
  state: Any
  metrics: Mapping[str, jax.Array]
  batch: Mapping[str, np.ndarray]  # the host batch of this step
  stopping: bool  # the loop ends after this step (last step or stop_after_steps)


class Hook(Protocol):
  def after_step(self, info: StepInfo) -> None: ...


class HookBase:
  """Hook defaults: nothing to do, no state to checkpoint."""

  name = ""  # key of this hook's state in the checkpoint's data state ("" = none)

  def after_step(self, info: StepInfo) -> None:
    pass

  def before_next_step(self, info: StepInfo) -> None:
    """Called after every hook's after_step (e.g. to restart a timer after eval and saving)."""

  def state_dict(self) -> Any:
    return None

  def load_state_dict(self, state: Any) -> None:
    pass

  def close(self) -> None:
    pass


def train_loop(state, *, step_fn: Callable[[Any, Mapping[str, np.ndarray]], tuple[Any, Mapping[str, jax.Array]]],
               next_batch: Callable[[], Mapping[str, np.ndarray]], start_step: int, total_steps: int,
               hooks: Sequence[HookBase] = (), stop_after_steps: int | None = None) -> tuple[Any, int, bool]:
  """Runs `step_fn(state, host_batch) -> (state, metrics)` from `start_step` to `total_steps`
  (or `stop_after_steps`), calling every hook after each step in order. Returns
  (state, step, stopped_early)."""
  step = start_step
  while step < total_steps:
    batch = next_batch()
    state, metrics = step_fn(state, batch)
    step += 1
    stopped = stop_after_steps is not None and step >= stop_after_steps
    info = StepInfo(step, total_steps, state, metrics, batch, stopping=stopped or step == total_steps)
    for h in hooks:
      h.after_step(info)
    for h in hooks:
      h.before_next_step(info)
    if stopped and step < total_steps:
      return state, step, True
  return state, step, False


# ====================================================================== hooks
class ProgressLogger:
  """Console progress line (steps/s, examples/s, loss, ETA) and TensorBoard scalars.

  TensorBoard through tensorboardX rather than clu.metric_writers (what t5x uses): clu's
  writer is TensorFlow's summary API, and TensorFlow stays inside the data layer."""

  def __init__(self, model_dir: str | None, total_steps: int, batch_size: int, enabled: bool = True):
    self.total, self.batch_size, self.enabled = total_steps, batch_size, enabled
    self.writer = None
    if model_dir and enabled:
      try:
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(os.path.join(model_dir, "tensorboard"))
      except ImportError:  # pragma: no cover
        self.writer = None
    self._t0, self._step0 = time.time(), None

  def scalars(self, step: int, values: dict[str, float], prefix: str = ""):
    if self.writer:
      for k, v in values.items():
        self.writer.add_scalar(prefix + k, float(v), step)
      self.writer.flush()

  def progress(self, step: int, values: dict[str, float]):
    now = time.time()
    if self._step0 is None:
      self._step0, self._t0 = step, now
      rate = float("nan")
    else:
      rate = (step - self._step0) / max(now - self._t0, 1e-9)
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
    vals = " | ".join(f"{k} {v:.4f}" if abs(v) < 1e6 else f"{k} {v:.3e}" for k, v in values.items())
    if self.enabled:
      print(f"step {step}/{self.total} | {vals} | {rate:.2f} steps/s | {rate * self.batch_size:.0f} ex/s | "
            f"ETA {eta_s}", flush=True)
    self.scalars(step, {**values, "steps_per_second": rate if rate == rate else 0.0}, "train/")

  def close(self):
    if self.writer:
      self.writer.close()


class ProgressHook(HookBase):
  """Averages the step metrics over `every` steps and logs them with the learning rate and MFU.

  MFU: model FLOPs of a step (`flops_fn(state, batch) -> (FLOPs, tokens)` for the first batch shape,
  XLA's cost analysis of the compiled step; other shapes scaled by their tokens); timed
  windows start after this run's first (compiling) step and exclude the time the other hooks
  (evaluation, checkpointing) take."""

  def __init__(self, logger: ProgressLogger, *, every: int, schedule=None,
               flops_fn: Callable[[Any, Mapping[str, np.ndarray]], tuple[float, int]] | None = None,
               tokens_fn: Callable[[Mapping[str, np.ndarray]], int] | None = None, log=print):
    self.logger, self.every, self.schedule = logger, every, schedule
    self.flops_fn, self.tokens_fn, self.log = flops_fn, tokens_fn, log
    self._window: list[Mapping[str, jax.Array]] = []
    self._flops_ref = None
    self._timer = {"t0": None, "flops": 0.0, "steps": 0}

  def after_step(self, info: StepInfo) -> None:
    tokens = self.tokens_fn(info.batch) if self.tokens_fn else 0
    if self._flops_ref is None and self.flops_fn is not None:
      self._flops_ref = self.flops_fn(info.state, info.batch)
    self._window.append(info.metrics)
    t = self._timer
    if t["t0"] is None:
      jax.block_until_ready(info.metrics)
      t.update(t0=time.time(), flops=0.0, steps=0)
    else:
      if self._flops_ref:
        t["flops"] += self._flops_ref[0] * tokens / max(self._flops_ref[1], 1)
      t["steps"] += 1
    if info.step % self.every == 0 or info.step == info.total_steps:
      vals = {k: float(np.mean([float(x[k]) for x in self._window])) for k in self._window[0]}
      if self.schedule is not None:
        vals["learning_rate"] = float(self.schedule(info.step))
      if t["steps"]:
        dt = (time.time() - t["t0"]) / t["steps"]
        kind = jax.devices()[0].device_kind
        vals.update(flops_lib.utilization(t["flops"] / t["steps"], dt, jax.device_count(), kind))
      self.logger.progress(info.step, vals)
      self._window = []

  def before_next_step(self, info: StepInfo) -> None:
    if info.step % self.every == 0:  # the next timed window starts after logging, eval and saving
      self._timer.update(t0=time.time(), flops=0.0, steps=0)

  def close(self) -> None:
    self.logger.close()


class EvalHook(HookBase):
  """Every `every` steps: validation metrics of the evaluation weights (and of the raw weights
  when there is an EMA); the best weights by `metric` are kept by `best` (Orbax, in
  `<model_dir>/best`). Its state (the validation history) is checkpointed with the run."""

  name = "history"

  def __init__(self, evaluate: Callable[[Any], dict[str, float]], *, every: int,
               best: checkpoints.BestCheckpointer | None, logger: ProgressLogger | None = None,
               metric: str = "recall@10", description: str = "", log=print):
    self.evaluate, self.every, self.best, self.logger = evaluate, every, best, logger
    self.metric, self.description, self.log = metric, description, log
    self.history: list[dict[str, float]] = []

  def after_step(self, info: StepInfo) -> None:
    if not self.every or not (info.step % self.every == 0 or info.step == info.total_steps):
      return
    state, step = info.state, info.step
    ema = "ema_params" in state
    res = self.evaluate(eval_params(state))
    self.history.append({"step": step, **res})
    if self.logger:
      self.logger.scalars(step, res, "validation/")
    if ema:  # the raw weights too, to see what the average buys
      raw = self.evaluate(state["params"])
      self.history[-1].update({f"raw_{k}": v for k, v in raw.items()})
      if self.logger:
        self.logger.scalars(step, raw, "validation_raw/")
      self.log(f"[oxyjax] step {step} validation, raw weights: "
               + ", ".join(f"{k} {v:.4f}" for k, v in sorted(raw.items()) if k.startswith(("recall", "ndcg"))))
    self.log(f"[oxyjax] step {step} validation ({self.description}{', EMA weights' if ema else ''}): "
             + ", ".join(f"{k} {v:.4f}" for k, v in sorted(res.items())))
    if self.best is not None:
      if self.metric not in res:  # never choose a checkpoint by a metric that is not there
        raise KeyError(f"the best checkpoint is chosen by {self.metric!r}, but validation returned only "
                       f"{sorted(res)}")
      self.best.maybe_save(step, eval_params(state), {self.metric: float(res[self.metric]), "ema": ema})

  def state_dict(self):
    return self.history

  def load_state_dict(self, state) -> None:
    self.history = list(state or [])


class CheckpointHook(HookBase):
  """One save per step (on the interval, at the end, or when stopping early) of the train
  state and the data state: the iterator position and every hook's state."""

  def __init__(self, ckpt: checkpoints.Checkpointer, *, iterator, hooks: Sequence[HookBase] = ()):
    self.ckpt, self.iterator, self.hooks = ckpt, iterator, [h for h in hooks if h.name]

  def data_state(self) -> dict[str, Any]:
    return {"iterator": self.iterator.state(), **{h.name: h.state_dict() for h in self.hooks}}

  def restore_data_state(self, data_state: Mapping[str, Any]) -> None:
    self.iterator.restore(data_state["iterator"])
    for h in self.hooks:
      h.load_state_dict(data_state.get(h.name))

  def after_step(self, info: StepInfo) -> None:
    self.ckpt.save(info.step, info.state, self.data_state(), force=info.stopping)
    if info.stopping:
      self.ckpt.wait()


def check_same_across_hosts(**values) -> None:
  """Decisions every process must share (no-ops for one process)."""
  for name, v in values.items():
    distributed.assert_same_across_hosts(v, name)
