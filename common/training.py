"""What every training stage shares: accelerate, optimizers, EMA copies, resume state and logging.

Each stage's loop reads top to bottom and calls each piece of bookkeeping by name:

    trainer = Trainer("vae", config, config.vae)
    model = trainer.add("vae", model, ema=True)
    start = trainer.resume()
    with trainer.running(total_steps):                  # progress bar; Ctrl-C/SIGTERM become a flag
        for step in range(start, total_steps):
            trainer.set_learning_rate(step)             # warm-up + cosine
            trainer.reseed(step)                        # every random draw of the step from (seed, stage, rank, step)
            loss = ...
            trainer.backward(loss)
            finite = trainer.optimizer_step("vae")      # clips; a non-finite gradient skips the step
            trainer.check_finite(finite, step)          # too many skipped in a row: stop
            trainer.update_ema(step)
            trainer.log(step, loss=loss)
            trainer.save_if_due(step)                   # every save_every steps, or on Ctrl-C (then exit)
    trainer.save_final()

Resume is exact: the step's randomness comes from a generator reseeded from (seed, stage, rank,
step) (as EDM2 does), the data order from (seed, epoch), and the learning rate is a function of
the step, so the state file only needs weights, EMA and optimizer moments.
"""

from __future__ import annotations

import copy
import json
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import PIL.Image
import torch
from tqdm.auto import tqdm

from common.checkpoint import (finite_or_none, load_tensors, optimizer_from_tensors, optimizer_to_tensors, remove_leftovers,
                               save_tensors, writable_folder)
from common.config import Config, TrainConfig, dump_config, to_dict
from common.devices import (check_launcher, deterministic_refusal, make_accelerator, precision_change,
                            resolve_mixed_precision, resolve_trackers, stage_setup)
from common.errors import RunFolderError
from common.images import save_image
from common.loop import (StopSignals, TrainingDiverged, TrainingInterrupted, ema_decay_at, ema_tensors, lr_factor,
                         scaled_step, update_ema)
from common.pretrained import check_init_elsewhere
from common.run import RunFolder, RunLock
from common.tracking import hyperparameters, log_images, plot_curves
from common.seeding import seed_from

INPUT_CHANGES = {  # why an input of a stage changes, for the message when a checkpoint no longer matches
    "dataset": "images, captions or data.* settings changed",
    "latent_cache": "the VAE was retrained or the dataset changed, and encode-dataset re-ran",
    "text_encoder": "train-clip re-ran, or text_encoder.pretrained points elsewhere",
}


class Trainer:
    def __init__(self, stage: str, config: Config, train: TrainConfig):
        self.stage, self.config, self.train = stage, config, train
        self.run = RunFolder(writable_folder(config.run_dir, "run_dir"))
        self.run.check_shared_settings(config, stage)
        check_init_elsewhere(train.init_from, self.run.root, stage)  # before anything is written
        self.trackers = resolve_trackers(train.report_to, f"{stage}.report_to")
        check_launcher(stage, train.compile, train.grad_accum)
        self.run.check_writable(stage, self.run.logs, self.run.logs / stage, self.run.train_state(stage), self.run.samples)
        self.accelerator = make_accelerator(resolve_mixed_precision(train.mixed_precision, f"{stage}.mixed_precision"),
                                            train.compile, self.trackers, self.run.logs, config.deterministic)
        self.device = self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.state_dir = self.run.train_state(stage)
        self.inputs: dict[str, str] = {}  # fingerprints of what this stage is built from (record_inputs)
        self._lock = RunLock(self.run.root, stage)
        self.global_batch = train.batch_size * self.world_size * train.grad_accum
        self.lr_scale = self.world_size * train.grad_accum if train.scale_lr else 1
        self.setup = stage_setup(self.accelerator, self.global_batch)  # what runs, where config.yaml has what was asked
        self.models: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.base_lrs: dict[str, float] = {}
        self.emas: dict[str, tuple[torch.nn.Module, list, list]] = {}  # EMA copy, its tensors, the model's
        self.step = 0  # steps completed
        self.total_steps = 0
        # skipped-step counters live on the device and are read at log and save boundaries only, so
        # a step never waits for the GPU (see optimizer_step)
        self._bad_in_row = torch.zeros((), dtype=torch.int64, device=self.device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self._grad_norms: dict[str, torch.Tensor] = {}  # each model's last gradient norm, on the device
        self._sums: dict[str, torch.Tensor | float] = {}
        self._count = 0
        self.last_logged: dict[str, float] = {}  # the means of the last log line (the stage's final loss)
        self._signals, self._saved_step, self._progress = StopSignals(), -1, None
        self._started = time.time()
        self._first_step_started: float | None = None
        self.print(dump_config(config))  # saved as run/config.yaml once the inputs are checked (running)
        # models are built next: their initial weights come from the seed too (same on every rank)
        torch.manual_seed(seed_from(config.seed, stage, "init"))

    # ---- setup -------------------------------------------------------------------------------

    def __enter__(self) -> "Trainer":
        """Hold the stage's run-folder lock (main process) until the stage is done, however it ends."""
        if self.is_main:
            self._lock.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.accelerator.end_training()  # flush and close the trackers, however the stage ended
        finally:
            self._lock.__exit__(*exc)

    def record_inputs(self, **fingerprints: str) -> None:
        """What this stage is built from (the dataset, the latent cache, the text encoder). Checkpoints
        carry it, and resuming from one built from other inputs is refused (see `resume`)."""
        self.inputs.update(fingerprints)

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def add(self, name: str, model: torch.nn.Module, lr: float | None = None, ema: bool = False) -> torch.nn.Module:
        """Register a trainable model with its own AdamW; returns it prepared (on device, DDP-wrapped)."""
        base_lr = (lr if lr is not None else self.train.lr) * self.lr_scale
        params = [p for p in model.parameters() if p.requires_grad]
        fused = self.device.type in ("cuda", "cpu") and all(p.dtype.is_floating_point for p in params)
        optimizer = torch.optim.AdamW(params, lr=base_lr, betas=tuple(self.train.adam_betas),
                                      weight_decay=self.train.weight_decay, fused=fused)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.models[name], self.optimizers[name], self.base_lrs[name] = model, optimizer, base_lr
        if ema and self.train.ema_decay > 0:
            ema_model = copy.deepcopy(self.unwrap(name)).requires_grad_(False).eval()
            self.emas[name] = (ema_model, ema_tensors(ema_model), ema_tensors(self.unwrap(name)))
        return model

    def unwrap(self, name: str) -> torch.nn.Module:
        """The model itself: no DDP, no torch.compile wrapper (whose class name and `_orig_mod.` keys would be saved)."""
        return self.accelerator.unwrap_model(self.models[name], keep_torch_compile=False)

    def inference_model(self, name: str) -> torch.nn.Module:
        """The EMA weights where there are some, else the trained ones."""
        return self.emas[name][0] if name in self.emas else self.unwrap(name)

    @property
    def skipped_steps(self) -> int:
        return int(self._skipped)

    @property
    def bad_steps_in_row(self) -> int:
        return int(self._bad_in_row)

    def describe_batch(self) -> None:
        t = self.train
        lrs = ", ".join(f"{name} {lr:.3g}" for name, lr in self.base_lrs.items())
        self.print(f"[{self.stage}] device {self.device} | mixed precision {self.accelerator.mixed_precision} | "
                   f"torch.compile {'on' if self.setup['compiled'] else 'off'} | effective batch {t.batch_size} per process "
                   f"x {self.world_size} processes x {t.grad_accum} accumulation = {self.global_batch} | lr {lrs}"
                   f"{' (scaled with the batch)' if t.scale_lr else ''}")

    # ---- the step ----------------------------------------------------------------------------

    @contextmanager
    def running(self, total_steps: int) -> Iterator[None]:
        """The progress bar, and Ctrl-C/SIGTERM turned into a flag that `save_if_due` acts on."""
        self.total_steps = total_steps
        if self.is_main:  # every input has been checked by now: a command that failed them wrote nothing
            for note in self.run.save_config(self.config, self.stage):
                self.print(f"[{self.stage}] {note}")
            self.write_log({"event": "setup", "step": self.step, **self.setup})  # before init_trackers: the log only
        if self.trackers:  # TensorBoard & co: run/logs/<stage>/, with the config and the setup as hyperparameters
            self.accelerator.init_trackers(self.stage, config=hyperparameters(self.config, self.stage, self.setup))
        self._first_step_started = time.time()
        self._progress = tqdm(total=total_steps, initial=self.step, desc=self.stage, dynamic_ncols=True,
                              disable=not self.accelerator.is_local_main_process, smoothing=0.05)
        try:
            with self._signals:
                yield
        except RuntimeError as error:  # torch refusing a kernel under deterministic=true: name the key
            raise deterministic_refusal(error) or error
        finally:
            self._progress.close()

    def set_learning_rate(self, step: int) -> None:
        """Linear warm-up, then cosine decay: a function of the step alone, so resume is exact."""
        factor = lr_factor(step, self.train.warmup_steps, self.total_steps, self.train.min_lr_ratio)
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self.base_lrs[name] * factor

    def reseed(self, step: int) -> None:
        """Noise, timesteps, dropout and augmentation of this step come from (seed, stage, rank, step)."""
        torch.manual_seed(seed_from(self.config.seed, self.stage, self.rank, step))

    def no_sync(self, name: str, micro: int):
        """Skip the DDP gradient all-reduce on all but the last micro-batch of a step."""
        last = micro == self.train.grad_accum - 1
        return nullcontext() if last else self.accelerator.no_sync(self.models[name])

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self, name: str) -> torch.Tensor:
        """Clip and apply the gradients (the optimizer's list of them: walking the model costs host time every step);
        a non-finite gradient norm applies nothing. Returns that norm's finiteness as a device tensor: nothing here
        waits for the GPU (fused AdamW skips the update on the device through its `found_inf` input, as for GradScaler)."""
        optimizer, params = self.optimizers[name], self.optimizers[name].param_groups[0]["params"]
        max_norm = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        if self.accelerator.scaler is not None:  # fp16: GradScaler skips overflowing steps itself (routine, not divergence)
            self._grad_norms[name] = scaled_step(self.accelerator.scaler, optimizer.optimizer, params, max_norm)
            optimizer.zero_grad(set_to_none=True)
            return torch.ones((), dtype=torch.bool, device=self.device)
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        if norm is None:  # accelerate returns None where it cannot compute it (e.g. some sharded setups)
            finite = torch.ones((), dtype=torch.bool, device=self.device)
        else:
            finite = torch.isfinite(norm)
            self._grad_norms[name] = norm.detach()
        if optimizer.optimizer.defaults.get("fused"):
            optimizer.optimizer.found_inf = (~finite).float()
        elif not bool(finite):  # an unfused optimizer can only skip from the host
            optimizer.zero_grad(set_to_none=True)
            return finite
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return finite

    def check_finite(self, finite: torch.Tensor | bool, step: int) -> None:
        """Count skipped steps; `max_bad_steps` in a row stop training, keeping the last good checkpoint.

        The streak is kept on the device and read every `log_every` steps (and before each checkpoint).
        """
        if self.accelerator.scaler is not None:  # fp16: one loss-scale update per step, once every optimizer stepped
            self.accelerator.scaler.update()
        bad = ~torch.as_tensor(finite, device=self.device)
        self._skipped += bad
        self._bad_in_row = (self._bad_in_row + 1) * bad
        if (step + 1) % self.train.log_every == 0 and self.bad_steps_in_row >= self.train.max_bad_steps:
            raise TrainingDiverged(
                f"[{self.stage}] {self.bad_steps_in_row} steps in a row had a non-finite loss (up to step {step + 1}); "
                f"stopped. The last good checkpoint is in {self.state_dir}. Lower {self.stage}.lr or check the data")

    def update_ema(self, step: int) -> None:
        """One fused update of every EMA tensor (torch._foreach_lerp_), parameters and float buffers alike."""
        decay = ema_decay_at(step, self.train.ema_decay, self.train.ema_warmup)
        for _, ema, model in self.emas.values():
            update_ema(ema, model, decay)

    def log(self, step: int, **values: float | torch.Tensor) -> None:
        """Tick the progress bar; average values (and each model's gradient norm, before clipping) over
        `log_every` steps into the bar, logs/<stage>.jsonl and the trackers."""
        self._progress.update(1)
        if self._first_step_started is not None:  # compilation, if any, happens in the first step
            seconds, self._first_step_started, compiled = time.time() - self._first_step_started, None, self.setup["compiled"]
            self.print(f"\n[{self.stage}] first step took {seconds:.1f} s{' (torch.compile included)' if compiled else ''}")
            self.write_log({"event": "first_step", "step": step + 1, "seconds": round(seconds, 3), "compiled": compiled})
        norms = {("grad_norm" if len(self.models) == 1 else f"grad_norm_{name}"): norm
                 for name, norm in self._grad_norms.items()}
        for key, value in {**values, **norms}.items():  # summed on the device; read once per log line
            self._sums[key] = self._sums.get(key, 0.0) + (value.detach().float() if torch.is_tensor(value) else value)
        self._count += 1
        done = step + 1
        if done % self.train.log_every and done != self.total_steps:
            return
        means = {k: float(v) / self._count for k, v in self._sums.items()}
        self._sums, self._count, self.last_logged = {}, 0, means
        lr = next(iter(self.optimizers.values())).param_groups[0]["lr"] if self.optimizers else 0.0
        self._progress.set_postfix({k: f"{v:.4g}" for k, v in means.items() if not k.startswith("grad_norm")}, refresh=False)
        self.write_log({"step": done, "lr": lr, **means})
        if self.trackers:
            self.accelerator.log({f"train/{k}": v for k, v in {"lr": lr, **means}.items()}, step=done)

    def log_image(self, path: Path, image: PIL.Image.Image, step: int) -> Path:
        """Save a sample grid as `path` and show it in the trackers (TensorBoard's Images tab) at `step`."""
        save_image(image, path)
        log_images(self.accelerator.trackers, f"samples/{self.stage}", image, step)
        return path

    def save_if_due(self, step: int) -> None:
        """A checkpoint every `save_every` steps (never mid non-finite streak); on Ctrl-C/SIGTERM, save and exit."""
        self.step = step + 1
        if self._stop_requested(step):
            self.save()
            code = 128 + self._signals.received
            self.print(f"\n[{self.stage}] stopped at step {self.step}; checkpoint saved in {self.state_dir}. "
                       f"Re-run the same command to resume.")
            raise TrainingInterrupted(code)
        if self.step % self.train.save_every == 0 and self.step < self.total_steps and self.bad_steps_in_row == 0:
            self.save()

    def save_final(self) -> None:
        """The last checkpoint (unless it is already saved, or the run ended on non-finite steps)."""
        if self._saved_step != self.step and self.bad_steps_in_row == 0:
            self.save()
        if self.skipped_steps:
            self.print(f"[{self.stage}] skipped {self.skipped_steps} step(s) with a non-finite loss")
        final = ", ".join(f"{k} {v:.4g}" for k, v in self.last_logged.items()) or "no step run"
        curves = plot_curves(self.run.logs, self.run.root / "loss.png") if self.is_main else None
        self.print(f"[{self.stage}] trained to step {self.step} in {time.time() - self._started:.0f} s; "
                   f"last logged: {final}; resume state in {self.state_dir}"
                   f"{f'; curves in {curves}' if curves else ''}"
                   f"{f' and TensorBoard (tensorboard --logdir {self.run.logs})' if 'tensorboard' in self.trackers else ''}")

    def _stop_requested(self, step: int) -> bool:
        stop = self._signals.received is not None
        # every rank must stop at the same step, or the collectives hang: agree every log_every steps
        if self.world_size > 1 and (step + 1) % self.train.log_every == 0:
            flag = torch.tensor([float(stop)], device=self.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
            if stop and self._signals.received is None:
                self._signals.received = signal.SIGTERM  # as the rank that got one
        return stop

    def write_log(self, record: dict) -> None:
        """One record in logs/<stage>.jsonl; an event's numbers (a stage's final metrics) go to the trackers too."""
        if not self.is_main:
            return
        if self.trackers and "event" in record:
            self.accelerator.log({f"{record['event']}/{k}": v for k, v in record.items()
                                  if k not in ("event", "step") and isinstance(v, (int, float))}, step=record.get("step"))
        self.run.logs.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time() - self._started, 3), **record}
        with open(self.run.logs / f"{self.stage}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")  # strict JSON: NaN is null

    # ---- resume state ------------------------------------------------------------------------

    def save(self) -> None:
        """Write the full resume state atomically (main process only) and prune old ones."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            tensors, optimizers = {}, {}
            for name in self.models:
                for key, value in self.unwrap(name).state_dict().items():
                    tensors[f"model.{name}.{key}"] = value
                opt_tensors, optimizers[name] = optimizer_to_tensors(self.optimizers[name], f"optim.{name}")
                tensors.update(opt_tensors)
            for name, (ema, _, _) in self.emas.items():
                for key, value in ema.state_dict().items():
                    tensors[f"ema.{name}.{key}"] = value
            meta = {"stage": self.stage, "step": self.step, "world_size": self.world_size, "setup": self.setup,
                    "skipped_steps": self.skipped_steps, "bad_steps_in_row": self.bad_steps_in_row,
                    "optimizers": optimizers, "config": to_dict(self.config), "inputs": self.inputs,
                    "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None}
            save_tensors(self.state_dir / f"state-{self.step:08d}.safetensors", tensors, meta)
            for old in self.run.state_files(self.stage)[max(1, self.train.keep_checkpoints):]:
                old.unlink(missing_ok=True)
        self._saved_step = self.step
        self.accelerator.wait_for_everyone()

    def resume(self) -> int:
        """Load the newest complete state file, if any; returns the step to continue from."""
        if self.is_main and self.state_dir.is_dir():
            remove_leftovers(self.state_dir, "state-*")  # from a process killed mid-write
        for path in self.run.state_files(self.stage):
            try:
                tensors, meta = load_tensors(path)
            except Exception as error:  # a damaged file (e.g. a disk error): fall back to the one before
                self.print(f"[{self.stage}] ignoring unreadable checkpoint {path.name}: {error}")
                continue
            if not meta or meta.get("stage") != self.stage:
                continue
            self._load(path, tensors, meta)
            return self.step
        return 0

    def _load(self, path: Path, tensors: dict, meta: dict) -> None:
        self.run.check_resumable(self.stage, meta.get("config"), self.config, path, meta["step"])
        tensors = {key.replace("._orig_mod.", ".", 1): value for key, value in tensors.items()}  # compiled runs before d4e90a2
        saved = meta.get("inputs") or {}
        changed = sorted(k for k in self.inputs if k in saved and saved[k] != self.inputs[k])
        if changed:
            raise RunFolderError(
                f"the {self.stage} checkpoint {path.name} (step {meta['step']}) was trained on another {' and '.join(changed)} "
                f"than this run has now ({INPUT_CHANGES.get(changed[0], 'it changed since')}). Resuming it would give a "
                f"{self.stage} model that does not match; delete {self.state_dir} to train this stage again, or use a new run_dir")
        try:
            for name in self.models:
                prefix = f"model.{name}."
                self.unwrap(name).load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
                optimizer_from_tensors(self.optimizers[name], tensors, meta["optimizers"][name], f"optim.{name}")
            for name, (ema, _, _) in self.emas.items():
                prefix = f"ema.{name}."
                ema_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                ema.load_state_dict(ema_state if ema_state else self.unwrap(name).state_dict())
        except (RuntimeError, KeyError, ValueError) as error:
            raise RunFolderError(
                f"the checkpoint {path} was written by a different {self.stage} model or optimizer setup "
                f"({str(error).splitlines()[0][:200]}). Use a new run_dir, or delete {self.state_dir} to start "
                f"this stage over") from None
        if meta.get("scaler") and self.accelerator.scaler:
            self.accelerator.scaler.load_state_dict(meta["scaler"])
        self.step = self._saved_step = meta["step"]
        self._skipped.fill_(meta.get("skipped_steps", 0))
        self._bad_in_row.fill_(meta.get("bad_steps_in_row", 0))
        saved_by = meta.get("world_size", 1)
        note = f" (saved by {saved_by} processes, resumed on {self.world_size})" if saved_by != self.world_size else ""
        note += precision_change((meta.get("setup") or {}).get("mixed_precision"), self.accelerator.mixed_precision)
        self.print(f"[{self.stage}] resumed from {path} at step {self.step}{note}")
