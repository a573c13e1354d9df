"""The training loop: one code path from one CPU to many GPUs on many machines.

Built on Hugging Face ``accelerate`` (DDP by default, FSDP as an option), so a script
using :class:`Trainer` runs unchanged when started plainly, with ``torchrun`` or with
``accelerate launch``. See the package README for the options and the output folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from attn_training.checkpoint import (
    MANIFEST_NAME,
    AuxContent,
    CheckpointContent,
    CheckpointError,
    check_aux_name,
    checkpoint_name,
    checkpoint_step,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from attn_training.data import BadSampleBudget, BatchStream, EpochBatchSampler
from attn_training.ema import ModelEMA
from attn_training.metrics import CSV_NAME, PLOT_NAME, TENSORBOARD_DIR, MetricsLogger, plot_curves
from attn_training.options import TrainConfig
from attn_training.pretrained import (
    PretrainedMixin,
    load_state_dict_checked,
    load_weights,
    save_pretrained_state,
)
from attn_training.rng import (
    capture_rng_state,
    derive_seed,
    isolated_rng,
    restore_rng_state,
    seed_everything,
)
from attn_training.schedule import advance_scheduler, build_scheduler

logger = logging.getLogger("attn_training")

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
BEST_DIR = "best"
CONFIG_RECORD = "train_config.json"

LossFn = Callable[[torch.nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]"]
ValFn = Callable[[torch.nn.Module], Mapping[str, Any]]
OptimizerFn = Callable[[torch.nn.Module], torch.optim.Optimizer]
SchedulerFn = Callable[[torch.optim.Optimizer, int], Any]

_FULL_GET = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL_SET = StateDictOptions(full_state_dict=True)


@dataclass
class AuxModel:
    """A second network trained alongside the model, e.g. a GAN discriminator.

    It gets its own optimizer (``optimizer_fn(module)``; default AdamW with ``--lr`` and
    ``--weight-decay``) and its own copy of the learning-rate schedule, is checkpointed and
    resumed with the model, and is not exported. The loss function receives the prepared
    auxiliary modules and returns one loss whose graph reaches every network: each
    optimizer steps on the gradients its parameters received (detach or freeze a network
    where another one's loss must not train it).
    """

    module: torch.nn.Module
    optimizer_fn: OptimizerFn | None = None


@dataclass
class _Aux:
    module: Any
    optimizer: Any
    scheduler: Any


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for too many consecutive steps."""


@dataclass
class TrainState:
    """Progress of a run; saved as ``trainer_state.json`` in every checkpoint."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    """Samples of the current epoch's permutation already consumed (all ranks)."""
    samples_drawn: int = 0
    samples_failed: int = 0
    skipped_steps: int = 0
    nonfinite_streak: int = 0
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    world_size: int = 1
    batch_size: int = 0
    grad_accum: int = 1

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainState:
        """Inverse of ``asdict``, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` produced."""

    step: int
    final_dir: Path
    last_checkpoint: Path
    best_dir: Path | None
    best_value: float | None
    stopped_early: bool
    samples_failed: int
    skipped_steps: int


class Trainer:
    """Trains ``model`` on ``train_dataset`` according to a :class:`TrainConfig`.

    Args:
        model: the model, built by the app (seed with ``seed_everything`` first).
        train_dataset: a map-style dataset (``len`` and ``dataset[i]``). Items that raise
            are skipped and logged; a ``sample_path(i)`` method, if present, names them.
        config: the options (usually ``TrainConfig.from_args(args)``).
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, {name: value})``; ``batch``
            is the collated batch already on the training device, ``model`` the wrapped
            (DDP/FSDP) model. Extra values are logged as ``train/<name>``. With
            ``aux_models`` it is called as ``loss_fn(model, batch, aux)``, ``aux`` mapping
            each name to its wrapped module.
        val_fn: ``val_fn(model) -> {name: value}``, called on every process in eval mode
            without gradients, with the EMA weights when EMA is on. Values are averaged
            over processes; ``config.best_metric`` must be one of the names.
        optimizer_fn: ``optimizer_fn(model) -> optimizer``; default AdamW with
            ``config.lr`` and ``config.weight_decay``.
        scheduler_fn: ``scheduler_fn(optimizer, total_steps) -> scheduler`` (torch or timm);
            default warm-up + ``config.lr_schedule``.
        collate_fn: batches a list of samples; default ``torch``'s default collate.
        model_config: JSON-ready arguments that rebuild the model for ``config.json`` of
            the exports; taken from the model when it uses :class:`PretrainedMixin` or
            ``huggingface_hub.PyTorchModelHubMixin``.
        shuffle: draw a new random order every epoch (else the dataset order).
        loader_kwargs: extra ``DataLoader`` arguments (e.g. ``prefetch_factor``).
        accelerator: an ``accelerate.Accelerator`` to use instead of building one.
        aux_models: ``{name: AuxModel}``, networks trained alongside ``model`` with their
            own optimizers (checkpointed under ``aux/<name>/``; not exported).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset: Dataset,
        config: TrainConfig,
        *,
        loss_fn: LossFn,
        val_fn: ValFn | None = None,
        optimizer_fn: OptimizerFn | None = None,
        scheduler_fn: SchedulerFn | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
        shuffle: bool = True,
        loader_kwargs: Mapping[str, Any] | None = None,
        accelerator: Any = None,
        aux_models: Mapping[str, AuxModel] | None = None,
    ) -> None:
        self.model = model
        self.train_dataset = train_dataset
        self.config = config
        self.loss_fn = loss_fn
        self.val_fn = val_fn
        self.optimizer_fn = optimizer_fn
        self.scheduler_fn = scheduler_fn
        self.collate_fn = collate_fn
        self.model_config = _model_config(model, model_config)
        self.shuffle = shuffle
        self.loader_kwargs = dict(loader_kwargs or {})
        self.accelerator = accelerator
        self.aux_models = {check_aux_name(k): v for k, v in (aux_models or {}).items()}
        self._aux: dict[str, _Aux] = {}
        self.state = TrainState()
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ setup

    def _build_accelerator(self) -> Any:
        from accelerate import Accelerator

        cfg = self.config
        kwargs: dict[str, Any] = {}
        if cfg.strategy == "fsdp":
            from accelerate import FullyShardedDataParallelPlugin

            if cfg.ema > 0:
                raise ValueError("--ema is not supported with --strategy fsdp")
            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2)
        # Without cpu=True accelerate does not form a process group on CPU-only machines.
        cpu = cfg.cpu or not torch.accelerator.is_available()
        return Accelerator(cpu=cpu, mixed_precision=cfg.precision, **kwargs)

    @property
    def output_dir(self) -> Path:
        return self.config.output_dir

    @property
    def checkpoint_root(self) -> Path:
        return self.config.output_dir / CHECKPOINTS_DIR

    def _decide_start(self, acc: Any) -> Path | None:
        """The checkpoint to resume from (``None``: fresh start), decided on rank 0."""
        code, step, message = 0, -1, ""
        if acc.is_main_process:
            try:
                path = self._pick_checkpoint()
                if path is not None:
                    step = checkpoint_step(path) or 0
                    code = 1 if self.config.resume == "auto" else 2
            except (CheckpointError, FileExistsError) as exc:
                code, message = -1, str(exc)
                if acc.num_processes == 1:
                    raise
        decision = torch.tensor([code, step], dtype=torch.int64, device=acc.device)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast

            decision = broadcast(decision, from_process=0)
        code, step = decision.tolist()
        if code == -1:
            raise CheckpointError(message or "rank 0 refused to start; see its log")
        if code == 0:
            return None
        if code == 2:
            return Path(self.config.resume)
        return self.checkpoint_root / checkpoint_name(step)

    def _pick_checkpoint(self) -> Path | None:
        cfg = self.config
        root = self.checkpoint_root
        if cfg.resume == "none":
            self._clear_previous_run()
            return None
        if cfg.resume == "auto":
            path, damaged = find_latest_valid(root)
            for folder, _problem in damaged:
                shutil.rmtree(folder, ignore_errors=True)
            if path is None:
                if damaged:
                    logger.warning("no valid checkpoint in %s: starting from scratch", root)
                return None
            if damaged:
                logger.warning(
                    "resuming from %s, the newest valid checkpoint (damaged newer ones removed)",
                    path,
                )
            return path
        path = Path(cfg.resume)
        problem = verify_checkpoint(path) if path.is_dir() else "no such folder"
        if problem is not None:
            raise CheckpointError(f"--resume {path}: {problem}")
        step = checkpoint_step(path)
        newer = [p for p in list_checkpoints(root) if (checkpoint_step(p) or 0) > (step or 0)]
        if newer and path.resolve().parent == root.resolve():
            if not cfg.overwrite:
                raise FileExistsError(
                    f"--resume {path}: {root} holds newer checkpoints "
                    f"({', '.join(p.name for p in newer)}); add --overwrite to delete them"
                )
            for folder in newer:
                shutil.rmtree(folder)
        return path

    def _clear_previous_run(self) -> None:
        out = self.output_dir
        previous = [
            out / name
            for name in (CHECKPOINTS_DIR, FINAL_DIR, BEST_DIR, CSV_NAME, TENSORBOARD_DIR, PLOT_NAME)
            if (out / name).exists()
        ]
        if not previous:
            return
        if not self.config.overwrite:
            raise FileExistsError(
                f"{out} already holds a training run ({', '.join(p.name for p in previous)}); "
                "use --resume auto to continue it or --overwrite to start over"
            )
        logger.warning("--overwrite: deleting the previous run in %s", out)
        for path in previous:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _load_initial_weights(self, model: torch.nn.Module) -> None:
        path = Path(self.config.init_from)
        if (path / MANIFEST_NAME).is_file() and (problem := verify_checkpoint(path)):
            raise CheckpointError(f"--init-from {path}: {problem}")
        report = load_state_dict_checked(
            model,
            load_weights(path),
            skip_mismatched=self.config.init_skip_mismatched,
            source=f"--init-from {path}",
        )
        logger.info("initialised from %s: %s", path, report.describe())
        if report.skipped or report.unexpected:
            logger.warning("--init-from %s did not fit entirely: %s", path, report.describe())

    # --------------------------------------------------------------- checkpoints

    def _gather_rng(self, acc: Any) -> dict[str, torch.Tensor]:
        local = capture_rng_state()
        if acc.num_processes == 1:
            return {k: v.unsqueeze(0) for k, v in local.items()}
        return {
            k: acc.gather(v.unsqueeze(0).to(acc.device)).cpu() for k, v in sorted(local.items())
        }

    def _save(self, acc: Any, model: Any, optimizer: Any, scheduler: Any, ema: Any) -> Path:
        content = CheckpointContent(
            model=get_model_state_dict(model, options=_FULL_GET),
            optimizer=get_optimizer_state_dict(model, optimizer.optimizer, options=_FULL_GET),
            state=asdict(self.state),
            rng=self._gather_rng(acc),
            scheduler=scheduler.state_dict(),
            scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
            ema=ema.state_dict() if ema is not None else None,
            aux={
                name: AuxContent(
                    model=get_model_state_dict(aux.module, options=_FULL_GET),
                    optimizer=get_optimizer_state_dict(
                        aux.module, aux.optimizer.optimizer, options=_FULL_GET
                    ),
                    scheduler=aux.scheduler.state_dict(),
                )
                for name, aux in self._aux.items()
            },
        )
        path = self.checkpoint_root / checkpoint_name(self.state.step)
        if acc.is_main_process:
            save_checkpoint(self.checkpoint_root, self.state.step, content)
            prune_checkpoints(self.checkpoint_root, self.config.keep_last)
        acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def _restore(
        self, acc: Any, path: Path, model: Any, optimizer: Any, scheduler: Any, ema: Any
    ) -> None:
        content = load_checkpoint(path, verify=False)
        set_model_state_dict(model, content.model, options=_FULL_SET)
        set_optimizer_state_dict(model, optimizer.optimizer, content.optimizer, options=_FULL_SET)
        if content.scheduler is not None:
            scheduler.load_state_dict(content.scheduler)
        if acc.scaler is not None and content.scaler is not None:
            acc.scaler.load_state_dict(content.scaler)
        if ema is not None:
            if content.ema is None:
                logger.warning("%s has no EMA weights: the EMA restarts from the model", path)
                ema.module.load_state_dict(acc.unwrap_model(model).state_dict())
            else:
                ema.load_state_dict({k: v.to(acc.device) for k, v in content.ema.items()})
        self._restore_aux(acc, path, content)
        saved = TrainState.from_json(content.state)
        cfg = self.config
        changed = [
            f"{name} {getattr(saved, name)} -> {now}"
            for name, now in (
                ("world_size", acc.num_processes),
                ("batch_size", cfg.batch_size),
                ("grad_accum", cfg.grad_accum),
            )
            if getattr(saved, name) != now
        ]
        rng = content.rng
        if rng and rng["torch.cpu"].shape[0] == acc.num_processes:
            restore_rng_state({k: v[acc.process_index] for k, v in rng.items()})
        else:
            seed_everything(derive_seed(cfg.seed, saved.step, acc.process_index))
        if changed and acc.is_main_process:
            logger.warning(
                "resuming %s with a different setup (%s): the data order continues from the "
                "same position but the run will not repeat an uninterrupted one exactly",
                path,
                ", ".join(changed),
            )
        self.state = saved
        self.last_checkpoint = path
        if acc.is_main_process:
            logger.info("resumed from %s (step %d)", path, saved.step)

    def _restore_aux(self, acc: Any, path: Path, content: CheckpointContent) -> None:
        for name, aux in self._aux.items():
            saved = content.aux.get(name)
            if saved is None:
                if acc.is_main_process:
                    logger.warning(
                        "%s has no auxiliary model %r: it starts from its initial weights",
                        path,
                        name,
                    )
                continue
            set_model_state_dict(aux.module, saved.model, options=_FULL_SET)
            set_optimizer_state_dict(
                aux.module, aux.optimizer.optimizer, saved.optimizer, options=_FULL_SET
            )
            if saved.scheduler is not None:
                aux.scheduler.load_state_dict(saved.scheduler)
        unused = sorted(set(content.aux) - set(self._aux))
        if unused and acc.is_main_process:
            logger.warning("%s: auxiliary models not used by this run: %s", path, unused)

    def _export(self, acc: Any, folder: Path, model: Any, ema: Any, extra: Any = None) -> None:
        weights = (
            ema.state_dict() if ema is not None else get_model_state_dict(model, options=_FULL_GET)
        )
        if acc.is_main_process:
            save_pretrained_state(folder, weights, self.model_config, extra_json=extra)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------- steps

    def _train_step(
        self, acc: Any, model: Any, optimizer: Any, stream: BatchStream, ema: Any
    ) -> dict[str, float]:
        cfg = self.config
        loss_sum = torch.zeros((), device=acc.device)
        finite = torch.ones((), device=acc.device)
        losses, good, failed, last_failure = 0, 0, 0, None
        extras: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(stream)
            for bad in batch.bad:
                logger.warning("skipped sample %s: %s", bad.source, bad.error)
                last_failure = f"{bad.source}: {bad.error}"
            good += batch.size
            failed += len(batch.bad)
            sync = micro == cfg.grad_accum - 1
            modules = [model, *(aux.module for aux in self._aux.values())]
            with ExitStack() as stack:
                if not sync:
                    for module in modules:
                        stack.enter_context(acc.no_sync(module))
                if batch.data is None:
                    # Every sample failed: contribute zero gradients so that the other
                    # ranks' gradient reduction still completes.
                    loss = sum(
                        (p * 0).sum()
                        for module in modules
                        for p in module.parameters()
                        if p.requires_grad
                    )
                else:
                    data = _to_device(batch.data, acc)
                    if self._aux:
                        aux_modules = {name: aux.module for name, aux in self._aux.items()}
                        out = self.loss_fn(model, data, aux_modules)  # type: ignore[call-arg]
                    else:
                        out = self.loss_fn(model, data)
                    loss, values = _split_loss(out)
                    loss_sum += loss.detach().float()
                    finite *= torch.isfinite(loss.detach()).float()
                    losses += 1
                    for key, value in values.items():
                        extras[key] = extras.get(key, 0.0) + float(value) / cfg.grad_accum
                acc.backward(loss / cfg.grad_accum)

        stats = torch.stack(
            [
                loss_sum,
                torch.tensor(float(losses), device=acc.device),
                torch.tensor(float(good), device=acc.device),
                torch.tensor(float(failed), device=acc.device),
                1.0 - finite,
            ]
        )
        if acc.num_processes > 1:
            stats = acc.reduce(stats, reduction="sum")
        loss_total, n_losses, n_good, n_failed, n_nonfinite = stats.tolist()
        self.budget.add(int(n_good + n_failed), int(n_failed), last_failure)
        self.state.samples_drawn, self.state.samples_failed = self.budget.drawn, self.budget.failed
        step = self.state.step + 1
        lr = optimizer.param_groups[0]["lr"]
        result = {"lr": lr, "samples": n_good, **extras}

        grad_norm = math.nan
        skip = None
        if n_nonfinite > 0:
            skip = "nonfinite"
        elif n_good == 0:
            skip = "empty"
        else:
            max_norm = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
            grad_norm = float(acc.clip_grad_norm_(model.parameters(), max_norm))
            for name, aux in self._aux.items():
                aux_norm = float(acc.clip_grad_norm_(aux.module.parameters(), max_norm))
                result[f"grad_norm_{name}"] = aux_norm
                grad_norm = grad_norm if math.isfinite(aux_norm) else aux_norm
            if not math.isfinite(grad_norm) and acc.scaler is None:
                skip = "nonfinite"
        if skip is None:
            optimizer.step()
            for aux in self._aux.values():
                aux.optimizer.step()
            if ema is not None and not acc.optimizer_step_was_skipped:
                ema.update(acc.unwrap_model(model))
            self.state.nonfinite_streak = 0
            result["grad_norm"] = grad_norm
        else:
            self.state.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        for aux in self._aux.values():
            aux.optimizer.zero_grad(set_to_none=True)
        if skip == "nonfinite":
            self.state.nonfinite_streak += 1
            streak = self.state.nonfinite_streak
            if acc.is_main_process:
                logger.warning(
                    "step %d: loss or gradient is NaN/inf; step skipped (%d in a row, limit %d)",
                    step,
                    streak,
                    cfg.max_nonfinite,
                )
            if streak >= cfg.max_nonfinite:
                where = (
                    f"the last good checkpoint is {self.last_checkpoint}"
                    if self.last_checkpoint is not None
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLossError(
                    f"the loss or gradient was NaN/inf for {streak} consecutive steps "
                    f"(steps {step - streak + 1} to {step}); stopping. {where}. Lower --lr, "
                    "use --clip-grad or check the data, then resume."
                )
        elif skip == "empty" and acc.is_main_process:
            logger.warning("step %d: every sample of the step failed to load; step skipped", step)
        if n_losses > 0 and skip is None:
            result["loss"] = loss_total / n_losses
        return result

    def _validate(self, acc: Any, model: Any, ema: Any) -> dict[str, float]:
        target = ema.module if ema is not None else acc.unwrap_model(model)
        was_training = target.training
        target.eval()
        try:
            # Validation must not shift the training's random stream.
            with isolated_rng(), torch.no_grad(), acc.autocast():
                values = dict(self.val_fn(target))
        finally:
            target.train(was_training)
        keys = sorted(values)
        local = torch.tensor([float(values[k]) for k in keys], device=acc.device)
        if acc.num_processes > 1:
            local = acc.reduce(local, reduction="mean")
        return dict(zip(keys, local.tolist()))

    def _is_better(self, value: float) -> bool:
        best = self.state.best_value
        if best is None:
            return True
        return value < best if self.config.best_mode == "min" else value > best

    # --------------------------------------------------------------------- fit

    def _optimizer(self, spec: AuxModel) -> torch.optim.Optimizer:
        if spec.optimizer_fn is not None:
            return spec.optimizer_fn(spec.module)
        cfg = self.config
        params = [p for p in spec.module.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _build_scheduler(self, optimizer: Any, total: int) -> Any:
        if self.scheduler_fn is not None:
            return self.scheduler_fn(optimizer.optimizer, total)
        cfg = self.config
        return build_scheduler(
            optimizer.optimizer,
            kind=cfg.lr_schedule,
            warmup_steps=cfg.warmup_steps,
            total_steps=total,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
        )

    def total_steps(self, sampler: EpochBatchSampler) -> int:
        """Optimizer steps of the run (``--max-steps``, else ``--epochs`` worth)."""
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        total = cfg.epochs * sampler.batches_left(0) // cfg.grad_accum
        if total < 1:
            raise ValueError("--epochs give no complete optimizer step; use --max-steps")
        return total

    def fit(self) -> TrainResult:
        """Train, validate, checkpoint and export; returns where the results are."""
        cfg = self.config
        acc = self.accelerator = self.accelerator or self._build_accelerator()
        _ensure_log_handler(acc)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if acc.is_main_process:
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
        resume_from = self._decide_start(acc)

        model = self.model
        if resume_from is None and cfg.init_from is not None:
            self._load_initial_weights(model)
        ema = ModelEMA(model, cfg.ema) if cfg.ema > 0 else None
        optimizer = self._optimizer(AuxModel(model, self.optimizer_fn))
        sampler = EpochBatchSampler(
            len(self.train_dataset),  # type: ignore[arg-type]
            cfg.batch_size,
            seed=cfg.seed,
            shuffle=self.shuffle,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        total = self.total_steps(sampler)
        model, optimizer = acc.prepare(model, optimizer)
        scheduler = self._build_scheduler(optimizer, total)
        self._aux = {}
        if self.aux_models and acc.scaler is not None:
            raise ValueError("auxiliary models are not supported with --precision fp16")
        for name, spec in self.aux_models.items():
            aux_module, aux_optimizer = acc.prepare(spec.module, self._optimizer(spec))
            self._aux[name] = _Aux(
                aux_module, aux_optimizer, self._build_scheduler(aux_optimizer, total)
            )
        if ema is not None:
            ema.to(acc.device)

        self.state = TrainState(
            world_size=acc.num_processes, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum
        )
        self.last_checkpoint = None
        if resume_from is not None:
            self._restore(acc, resume_from, model, optimizer, scheduler, ema)
        else:
            seed_everything(cfg.seed + acc.process_index)
        state = self.state
        state.world_size, state.batch_size, state.grad_accum = (
            acc.num_processes,
            cfg.batch_size,
            cfg.grad_accum,
        )
        self.budget = BadSampleBudget(len(self.train_dataset), cfg.max_bad_fraction)  # type: ignore[arg-type]
        self.budget.drawn, self.budget.failed = state.samples_drawn, state.samples_failed

        if acc.is_main_process:
            record = {**cfg.to_json(), "world_size": acc.num_processes, "total_steps": total}
            (cfg.output_dir / CONFIG_RECORD).write_text(
                json.dumps(record, indent=2, default=str) + "\n"
            )
        metrics = MetricsLogger(cfg.output_dir, start_step=state.step, enabled=acc.is_main_process)
        stream = BatchStream(
            self.train_dataset,
            sampler,
            collate_fn=self.collate_fn,
            num_workers=cfg.num_workers,
            pin_memory=acc.device.type == "cuda",
            epoch=state.epoch,
            position=state.position,
            loader_kwargs=self.loader_kwargs,
        )
        bar = tqdm(
            total=total,
            initial=min(state.step, total),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (acc.is_main_process and cfg.progress),
        )
        model.train()
        stopped_early = False
        window: dict[str, list[float]] = {}
        window_start = time.perf_counter()
        try:
            while state.step < total:
                out = self._train_step(acc, model, optimizer, stream, ema)
                state.step += 1
                state.epoch, state.position = stream.epoch, stream.position
                advance_scheduler(scheduler, state.step)
                for aux in self._aux.values():
                    advance_scheduler(aux.scheduler, state.step)
                bar.update(1)
                for key, value in out.items():
                    window.setdefault(key, []).append(value)
                last = state.step == total
                if state.step % cfg.log_every == 0 or last:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    logged = _summarise(window, elapsed, state, len(self.train_dataset))  # type: ignore[arg-type]
                    metrics.log(state.step, logged)
                    bar.set_postfix(
                        loss=f"{logged.get('train/loss', math.nan):.4g}",
                        lr=f"{logged['train/lr']:.3g}",
                        samples_s=f"{logged['train/samples_per_s']:.1f}",
                        refresh=False,
                    )
                    window, window_start = {}, time.perf_counter()
                if self.val_fn is not None and (state.step % cfg.val_interval == 0 or last):
                    stopped_early = self._after_validation(
                        acc, metrics, self._validate(acc, model, ema), model, ema
                    )
                if state.step % cfg.save_every == 0 or last or stopped_early:
                    self._save(acc, model, optimizer, scheduler, ema)
                    metrics.flush()
                if stopped_early:
                    break
            if self.last_checkpoint is None or checkpoint_step(self.last_checkpoint) != state.step:
                self._save(acc, model, optimizer, scheduler, ema)
            final_dir = cfg.output_dir / FINAL_DIR
            self._export(acc, final_dir, model, ema)
            if acc.is_main_process:
                plot_curves(metrics, cfg.output_dir / PLOT_NAME, title=cfg.output_dir.name)
                logger.info("finished at step %d; model exported to %s", state.step, final_dir)
        finally:
            bar.close()
            metrics.close()
            stream.close()
        best_dir = cfg.output_dir / BEST_DIR
        assert self.last_checkpoint is not None
        return TrainResult(
            step=state.step,
            final_dir=final_dir,
            last_checkpoint=self.last_checkpoint,
            best_dir=best_dir if state.best_step is not None else None,
            best_value=state.best_value,
            stopped_early=stopped_early,
            samples_failed=state.samples_failed,
            skipped_steps=state.skipped_steps,
        )

    def _after_validation(
        self, acc: Any, metrics: MetricsLogger, values: dict[str, float], model: Any, ema: Any
    ) -> bool:
        """Log, track the best model; returns whether to stop early."""
        cfg, state = self.config, self.state
        metrics.log(state.step, {f"val/{k}": v for k, v in values.items()})
        if cfg.best_metric not in values:
            raise KeyError(
                f"--best-metric {cfg.best_metric!r} is not among the validation metrics "
                f"({', '.join(sorted(values))})"
            )
        value = values[cfg.best_metric]
        if acc.is_main_process:
            logger.info(
                "step %d validation: %s",
                state.step,
                ", ".join(f"{k}={v:.5g}" for k, v in sorted(values.items())),
            )
        if math.isfinite(value) and self._is_better(value):
            state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
            record = {"metric": cfg.best_metric, "mode": cfg.best_mode, "value": value}
            self._export(
                acc,
                cfg.output_dir / BEST_DIR,
                model,
                ema,
                {"best.json": {**record, "step": state.step}},
            )
            return False
        state.evals_since_best += 1
        if cfg.early_stop and state.evals_since_best >= cfg.early_stop:
            if acc.is_main_process:
                logger.info(
                    "early stop at step %d: %s has not improved on %.5g (step %d) for %d "
                    "validations",
                    state.step,
                    cfg.best_metric,
                    state.best_value,
                    state.best_step,
                    state.evals_since_best,
                )
            return True
        return False


def _model_config(model: torch.nn.Module, given: Mapping[str, Any] | None) -> dict[str, Any]:
    if given is not None:
        return dict(given)
    if isinstance(model, PretrainedMixin):
        return model.pretrained_config
    hub = getattr(model, "_hub_mixin_config", None)
    if isinstance(hub, Mapping):
        return dict(hub)
    raise ValueError(
        f"the exported config.json needs the arguments that rebuild {type(model).__name__}: "
        "pass model_config=... or make the model a PretrainedMixin"
    )


def _split_loss(out: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
    if isinstance(out, tuple):
        loss, values = out
        return loss, values
    return out, {}


def _to_device(data: Any, acc: Any) -> Any:
    from accelerate.utils import send_to_device

    return send_to_device(data, acc.device, non_blocking=acc.device.type == "cuda")


def _summarise(
    window: dict[str, list[float]], elapsed: float, state: TrainState, dataset_size: int
) -> dict[str, float]:
    """Means over the logging window plus run-wide counters, keyed ``train/...``."""
    out: dict[str, float] = {}
    for key, values in window.items():
        if key == "samples":
            out["train/samples_per_s"] = sum(values) / elapsed
        elif key == "lr":
            out["train/lr"] = values[-1]
        else:
            out[f"train/{key}"] = sum(values) / len(values)
    out["train/epoch"] = state.epoch + state.position / dataset_size
    out["train/samples_failed"] = float(state.samples_failed)
    out["train/skipped_steps"] = float(state.skipped_steps)
    return out


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _ensure_log_handler(acc: Any) -> None:
    """Show the library's messages when the app configured no logging at all."""
    lib = logging.getLogger("attn_training")
    if lib.handlers or logging.getLogger().handlers:
        return
    handler = _TqdmHandler()
    prefix = f"[rank {acc.process_index}] " if acc.num_processes > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(levelname)s {prefix}%(message)s"))
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)
