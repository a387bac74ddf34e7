"""Device hygiene that a CPU can check: no host sync inside a training step, precision chosen per stage,
accelerate's launcher settings respected. The CUDA variants run on a GPU and skip here."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common.devices
from common.devices import make_accelerator, resolve_mixed_precision
from common.errors import UserError
from common.training import Trainer
from conftest import tiny_config
from ldm.train import main as ldm_main
from ldm.train_clip import main as clip_main
from pipelines.generate import SCHEDULERS
from vae.train import main as vae_main

SYNCING = ["item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"]


def count_calls(monkeypatch, owner: type, names: list[str]) -> dict:
    """Count every call of the methods `names` of the class `owner` (they still run)."""
    counts = {name: 0 for name in names}
    for name in names:
        original = getattr(owner, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)
    return counts


def count_host_syncs(monkeypatch) -> dict:
    """Count every call that copies a tensor's value to Python or the host (what would wait for a GPU)."""
    return count_calls(monkeypatch, torch.Tensor, SYNCING)


STAGES = {"vae": vae_main, "clip": clip_main, "ldm": ldm_main}


def quiet_overrides(stage: str, steps: int) -> list[str]:
    """Train `stage` for `steps` steps with no logs, saves or previews on the way."""
    keys = ("log_every", "save_every") + (("sample_every",) if stage != "clip" else ())
    return [f"{stage}.max_steps={steps}", *(f"{stage}.{key}=1000" for key in keys)]


def untrained_copy(tiny_run: Path, run: Path, stage: str) -> Path:
    """A copy of the tiny run at `run` without `stage`'s resume states, so the stage trains again from scratch."""
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "train_state" / stage)
    return run


def stage_syncs(tiny_run, tmp_path, monkeypatch, stage: str, steps: int) -> dict:
    """Host syncs of training `stage` of the tiny run again for `steps` steps."""
    run = untrained_copy(tiny_run, tmp_path / f"{stage}{steps}", stage)
    config = tiny_config(run, *quiet_overrides(stage, steps))
    with monkeypatch.context() as patch:
        counts = count_host_syncs(patch)
        STAGES[stage](config)
    return counts


@pytest.mark.parametrize("stage", ["ldm", "vae", "clip"])
def test_a_training_step_does_not_wait_for_the_device(tiny_run, tmp_path, monkeypatch, stage):
    """3 steps and 9 steps of a stage read tensors to the host equally often: the 6 extra steps never do.
    (Logging, checkpoints and previews do, every log_every / save_every / sample_every steps.) train-vae and
    train-clip gather their images and captions on the device; train-ldm its latents and text states."""
    short = stage_syncs(tiny_run, tmp_path, monkeypatch, stage, 3)
    long = stage_syncs(tiny_run, tmp_path, monkeypatch, stage, 9)
    assert sum(short.values()) > 0  # the counter sees the syncs of setup, the final log and the export
    assert long == short


def train_strictly(tiny_run, tmp_path, monkeypatch, stage: str, strict, relaxed, *options: str) -> Path:
    """Train `stage` of the tiny run again for 6 steps, its middle steps (2 to 5, from reseed to save_if_due)
    under `strict()`, the rest (setup, logging, checkpoints, export) under `relaxed()`."""
    run = untrained_copy(tiny_run, tmp_path / "run", stage)
    reseed, save_if_due = Trainer.reseed, Trainer.save_if_due

    def strict_reseed(self, step):
        reseed(self, step)
        if 1 <= step < self.total_steps - 1:
            strict()

    def relaxed_save(self, step):
        relaxed()
        save_if_due(self, step)

    monkeypatch.setattr(Trainer, "reseed", strict_reseed)
    monkeypatch.setattr(Trainer, "save_if_due", relaxed_save)
    try:
        STAGES[stage](tiny_config(run, *quiet_overrides(stage, 6), *options))
    finally:
        relaxed()
    return run


@pytest.mark.parametrize("stage, options", [("vae", ["vae.augment=true"]), ("clip", ["clip.augment=true"]),
                                             ("ldm", ["ldm.offset_noise=0.1", "ldm.snr_gamma=5"]),
                                             # 160 training images: step 2 (items 128-191) starts epoch 1
                                             ("vae", ["vae.batch_size=64"]), ("ldm", ["ldm.batch_size=64"])])
def test_a_training_step_makes_every_tensor_on_the_training_device(tiny_run, tmp_path, monkeypatch, stage, options):
    """What a CPU can check of device placement: the middle steps run with torch's default device set to
    'meta', so a tensor made without naming its device (on a GPU: made on the host, then copied over,
    which waits for the device, or mixed with device tensors, which fails) cannot be copied or computed
    with, and the step fails. Logging and checkpoints (every log_every / save_every steps) may read to
    the host. Before: augmentation drew its random numbers on the host in train-vae and train-clip, and a
    new epoch's order (the first step of every epoch, and the first after a resume) on the default device."""
    run = train_strictly(tiny_run, tmp_path, monkeypatch, stage, lambda: torch.set_default_device("meta"),
                         lambda: torch.set_default_device(None), *options)
    assert (run / "train_state" / stage / "state-00000006.safetensors").is_file()


@pytest.mark.parametrize("scheduler, options", [
    ("DPMSolverMultistepScheduler", {}), ("DDIMScheduler", {}), ("EulerAncestralDiscreteScheduler", {}),
    # every option that changes the loop: DDIM's noise (eta), rescaled and interval guidance, a negative prompt,
    # several images per prompt from one generator each
    ("DDIMScheduler", {"eta": 0.5, "guidance_rescale": 0.7, "guidance_interval": (0.25, 0.75),
                       "negative_prompt": "Draw a two", "num_images_per_prompt": 2})])
def test_a_sampling_step_makes_every_tensor_on_the_pipeline_device(pipe, scheduler, options):
    """As above, for the denoising loop: from the second step on, torch's default device is 'meta', so a
    tensor the loop made without naming its device would fail it (guidance, the scheduler's step, the
    stochastic schedulers' noise from the generator)."""
    import diffusers

    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)

    def strict_after_the_first_step(pipeline, i, t, tensors):
        torch.set_default_device("meta")
        return {}

    try:
        count = 2 * options.get("num_images_per_prompt", 1)
        generator = [torch.Generator().manual_seed(i) for i in range(count)] if count > 2 else torch.Generator().manual_seed(0)
        images = pipe(["Draw a six", "Draw a one"], num_inference_steps=4, generator=generator, output_type="pt",
                      callback_on_step_end=strict_after_the_first_step, **options).images
    finally:
        torch.set_default_device(None)
        pipe.scheduler = original
    assert images.shape[0] == count and images.device.type == "cpu" and torch.isfinite(images).all()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_sampling_step_never_reads_the_device(pipe, monkeypatch, name):
    """What a CPU can check of host syncs in sampling: the UNet, latents and text states live on the 'meta'
    device, whose values cannot be read, as a GPU's cannot without waiting for it. The schedule is set there as
    set_timesteps(device=...) sets it, readable once (the one wait the loop allows, before its first step); the
    finiteness check after the last step reads too. Every step of every scheduler `generate` offers must then run
    without reading a value (the stochastic ones draw from a host generator and copy to the device, which is
    diffusers' way of keeping a seed's images the same on every device). Before: DDIM and DDPM compared the
    timestep, on the device, at every step."""
    from ldm.sampling import denoise

    scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    scheduler.set_timesteps(6)
    host_timesteps = scheduler.timesteps
    scheduler.timesteps = device_timesteps = host_timesteps.to("meta")
    to_host = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: host_timesteps if self is device_timesteps else to_host(self))
    monkeypatch.setattr(torch, "isfinite", lambda tensor: torch.ones((), dtype=torch.bool))
    unet = copy.deepcopy(pipe.unet).to("meta")
    latents = torch.randn(2, unet.config.in_channels, 4, 4, device="meta")
    text_states = torch.randn(2, 16, unet.config.cross_attention_dim, device="meta")
    steps = []
    latents = denoise(unet, scheduler, latents, text_states, text_states, 3.0, torch.Generator().manual_seed(0),
                      lambda i, *rest: steps.append(i), eta=0.5, guidance_interval=(0.0, 0.5))
    assert steps == list(range(len(host_timesteps))) and latents.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_sampling_steps_run_under_cuda_sync_debug_mode_error(tiny_run, name):
    """On a GPU: from the end of the first step to the start of the last one, the pipeline runs with
    torch.cuda.set_sync_debug_mode('error'), with a CUDA generator (a CPU one copies its noise over at every
    step of the stochastic schedulers, diffusers' way of keeping a seed's images the same on every device)."""
    from pipelines import LatentPipeline

    pipe = LatentPipeline.from_pretrained(tiny_run).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)

    def strict_between_steps(pipeline, i, t, tensors):
        last = i == len(pipeline.scheduler.timesteps) - 1
        torch.cuda.set_sync_debug_mode("default" if last else "error")
        return {}

    try:
        images = pipe(["Draw a six", "Draw a one"], num_inference_steps=4, output_type="pt",
                      generator=torch.Generator("cuda").manual_seed(0), callback_on_step_end=strict_between_steps).images
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def test_evaluates_classifier_steps_make_every_tensor_on_its_device(monkeypatch):
    """As above, for the loop that trains evaluate's classifier (part of every quickstart): from its second
    step on the default device is 'meta'. Before: its augmentation drew on the host (copied to a GPU per step)."""
    import pipelines.quality as quality

    def strict_after_the_first_step(steps, **progress):
        for step in range(steps):
            if step == 1:
                torch.set_default_device("meta")
            yield step

    monkeypatch.setattr(quality, "trange", strict_after_the_first_step)
    torch.manual_seed(0)
    model = quality.DigitClassifier(1, 3)
    images, labels = torch.rand(12, 1, 16, 16) * 2 - 1, torch.arange(12) % 3
    try:
        quality.fit_classifier(model, images, labels, steps=4, batch_size=6)
    finally:
        torch.set_default_device(None)
    assert not model.training and all(torch.isfinite(p).all() for p in model.parameters())


def test_measuring_loops_read_the_device_once_however_many_batches(tmp_path, monkeypatch):
    """train-vae's held-out PSNR/SSIM and latent scale, train-clip's zero-shot accuracy and evaluate's classifier
    and near-copy test read their result to the host once, at the end: one batch and several read equally
    often. Before: every batch read its sums (or copied its outputs) back, which waits for a GPU each time."""
    from common.data import load_train_and_holdout
    from ldm.train_clip import initial_clip, zero_shot_accuracy
    from pipelines.quality import DigitClassifier, classify, near_copy_rate
    from vae.model import build_vae
    from vae.reconstruct import latent_std, reconstruction_metrics

    config = tiny_config(tmp_path / "run")
    train_set, holdout_set = load_train_and_holdout(config.data)
    torch.manual_seed(0)
    vae = build_vae(config.vae, config.data.channels, config.data.image_size).eval()
    clip, tokenizer, _ = initial_clip(config, train_set.captions)
    classifier = DigitClassifier(config.data.channels, 10).eval()
    images = torch.rand(1100, 1, 16, 16) * 2 - 1
    measures = {  # (one batch, several batches)
        "reconstruction_metrics": [lambda size=size: reconstruction_metrics(vae, train_set, 64, size) for size in (64, 8)],
        "latent_std": [lambda size=size: latent_std(vae, train_set, 64, size) for size in (64, 8)],
        "zero_shot_accuracy": [lambda size=size: zero_shot_accuracy(clip.eval(), tokenizer, holdout_set, size)
                               for size in (256, 8)],
        "classify": [lambda n=n: classify(classifier, images[:n], torch.device("cpu")) for n in (100, 1100)],
        "near_copy_rate": [lambda n=n: near_copy_rate(images[:n], images[:300]) for n in (100, 1100)]}
    for name, (one_batch, several) in measures.items():
        reads = []
        for measure in (one_batch, several):
            with monkeypatch.context() as patch:
                counts = count_host_syncs(patch)
                measure()
            reads.append(counts)
        assert reads[0] == reads[1], name


def test_the_sync_counter_sees_a_sync(monkeypatch):
    counts = count_host_syncs(monkeypatch)
    value = torch.ones(3).sum()
    float(value), value.item(), bool(value > 0)
    assert (counts["__float__"], counts["item"], counts["__bool__"]) == (1, 1, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("stage, options", [("ldm", []), ("vae", []), ("clip", []),
                                             # 160 training images: step 2 (items 128-191) starts epoch 1
                                             ("vae", ["vae.batch_size=64"]), ("ldm", ["ldm.batch_size=64"])])
def test_training_steps_run_under_cuda_sync_debug_mode_error(tiny_run, tmp_path, monkeypatch, stage, options):
    """On a GPU: the middle steps of each training stage run with torch.cuda.set_sync_debug_mode('error'), a
    new epoch's first step included (its order is copied over from the host: a pageable copy would wait)."""
    run = train_strictly(tiny_run, tmp_path, monkeypatch, stage, lambda: torch.cuda.set_sync_debug_mode("error"),
                         lambda: torch.cuda.set_sync_debug_mode("default"), *options)
    assert (run / "train_state" / stage / "state-00000006.safetensors").is_file()


@pytest.mark.parametrize("stage", ["ldm", "vae", "clip"])
def test_a_training_step_never_walks_a_model(tiny_run, tmp_path, monkeypatch, stage):
    """Walking a model's modules or parameters (model.parameters(), accelerate's unwrap_model) is host work a GPU
    waits for at every step; the middle steps of each stage do none (train-vae's with its GAN on from step 2).
    Before: clipping walked the model being stepped, train-vae the discriminator it froze, train-clip the model to
    read its logit scale."""
    walks = []
    walking = []
    named_modules = torch.nn.Module.named_modules

    def recorded(self, *args, **kwargs):
        if walking:
            walks.append(type(self).__name__)
        return named_modules(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", recorded)
    train_strictly(tiny_run, tmp_path, monkeypatch, stage, lambda: walking.append(True), walking.clear)
    assert walks == []


class AtenOps(TorchDispatchMode):
    """Records the name ('packet.overload') of every aten op run under it, forward and backward, and counts the
    calls: on a GPU each is a kernel launch, or at least a trip through the dispatcher, the host's work per step."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(f"{func.overloadpacket.__name__}.{func._overloadname}")
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_train_ldm_step_dispatches_few_more_ops_than_its_bare_loop(tiny_run, tmp_path, monkeypatch):
    """A small UNet's step on a GPU is bound by the host dispatching its ops (the issue's bare loop took the same
    ~74 ms a step at batch 1,024 and 4,096), so every op train-ldm adds to the bare loop's forward, backward and
    fused AdamW costs time there. Its middle steps (batch assembly, loss, clipping, the non-finite guard, EMA,
    the log buffer) dispatch at most 60 ops more per step than the bare loop of the same UNet. Before: the EMA
    detached each of the UNet's parameters every step, ~250 more."""
    from diffusers import UNet2DConditionModel

    from ldm.model import build_noise_scheduler, diffusion_loss

    counters: list[AtenOps] = []  # one per middle step
    counting: list[AtenOps] = []

    def count_step():
        counters.append(AtenOps())
        counting.append(counters[-1].__enter__())

    def stop_counting():
        while counting:
            counting.pop().__exit__(None, None, None)

    run = train_strictly(tiny_run, tmp_path, monkeypatch, "ldm", count_step, stop_counting)
    command_ops = [counter.count for counter in counters]

    config = tiny_config(run)
    setup = [record for record in map(json.loads, (run / "logs" / "ldm.jsonl").read_text().splitlines())
             if record.get("event") == "setup"][-1]  # where and in what precision the Trainer trained, this time
    device = torch.device(setup["device"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setup["mixed_precision"])
    unet = UNet2DConditionModel.from_pretrained(run / "unet").to(device).train()
    noise_scheduler = build_noise_scheduler(config.ldm)
    size, batch = unet.config.sample_size, config.ldm.batch_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, device=device)
    text_states = torch.randn(batch, config.clip.max_length, unet.config.cross_attention_dim, device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), fused=True)

    def bare_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):  # as accelerate's, on a GPU
            loss = diffusion_loss(unet, noise_scheduler, latents, text_states, config.ldm)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    bare_step()  # the optimizer's state is made on its first step
    with AtenOps() as bare:
        bare_step()
    assert len(command_ops) == 4 and bare.count > 500
    assert max(command_ops) - bare.count <= 60, (command_ops, bare.count)


def test_deterministic_kernels_are_each_stages_choice(monkeypatch):
    """config.deterministic sets torch's deterministic algorithms, strictly (with warn_only, flash and
    memory-efficient attention keep their non-deterministic backward), cuDNN's deterministic mode and cuBLAS's
    workspace; the next stage's Accelerator sets its own choice, so a notebook's later run is not slowed by an
    earlier one's."""
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        make_accelerator("no", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        make_accelerator("no")
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        common.devices.use_deterministic_kernels(False)


# torch.use_deterministic_algorithms' list (torch 2.14) of ops that have no deterministic CUDA kernel, as aten
# names: under deterministic=true they stop a stage on a GPU. ("median.dim": only median with indices.)
NO_DETERMINISTIC_CUDA_KERNEL = {
    "avg_pool3d_backward", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
    "max_unpool2d", "max_unpool3d", "upsample_linear1d_backward", "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward", "upsample_trilinear3d_backward", "_upsample_bilinear2d_aa_backward",
    "_upsample_bicubic2d_aa_backward", "reflection_pad1d_backward", "reflection_pad2d_backward",
    "reflection_pad3d_backward", "nll_loss2d_forward", "_ctc_loss_backward", "_embedding_bag_backward",
    "_embedding_bag_dense_backward", "put", "put_", "histc", "bincount", "median.dim", "nanmedian.dim", "kthvalue",
    "grid_sampler_2d_backward", "scatter_reduce", "scatter_reduce_",
}


def without_deterministic_cuda_kernel(names: set[str]) -> set[str]:
    return {name for name in names if name in NO_DETERMINISTIC_CUDA_KERNEL or name.split(".")[0] in NO_DETERMINISTIC_CUDA_KERNEL}


def test_the_op_recorder_sees_an_op_without_a_deterministic_cuda_kernel():
    ops = AtenOps()
    with ops:
        image = torch.rand(1, 1, 4, 4, requires_grad=True)
        torch.nn.functional.interpolate(image, scale_factor=2, mode="bilinear").sum().backward()
    assert without_deterministic_cuda_kernel(ops.names) == {"upsample_bilinear2d_backward.default"}


@pytest.mark.parametrize("stage, options", [("vae", ["vae.augment=true"]), ("clip", ["clip.augment=true"]),
                                             ("ldm", ["ldm.offset_noise=0.1", "ldm.snr_gamma=5"])])
def test_training_steps_use_no_op_without_a_deterministic_cuda_kernel(tiny_run, tmp_path, monkeypatch, stage, options):
    """deterministic=true (configs/tiny.yaml's) stops a stage at an op with no deterministic kernel; on a GPU that
    would be one of torch's list. What a CPU can check: the ops of the middle steps, forward and backward (the
    VAE's PatchGAN included, from tiny's disc_start=2), are none of them. (On a GPU attention runs other
    kernels than on the CPU; flash and memory-efficient attention have deterministic backward paths.)"""
    ops, entered = AtenOps(), []

    def record():
        if not entered:
            entered.append(ops.__enter__())

    def stop():
        if entered:
            entered.pop().__exit__(None, None, None)

    train_strictly(tiny_run, tmp_path, monkeypatch, stage, record, stop, *options)
    assert "convolution_backward.default" in ops.names or "mm.default" in ops.names  # the backward pass was seen
    assert without_deterministic_cuda_kernel(ops.names) == set()


def test_evaluate_uses_no_op_without_a_deterministic_cuda_kernel(tiny_run, tmp_path):
    """evaluate runs in the process where a deterministic stage may have run (the quickstart, a notebook), and
    torch's setting is process-wide: it trains its classifier (whose global pooling to 1x1 is a mean, torch's own
    shortcut, not adaptive pooling's backward, which has no deterministic kernel), samples with the tuned
    guidance and decodes, and none of that uses an op of torch's list."""
    from pipelines.evaluate import main as evaluate_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ops = AtenOps()
    with ops:
        evaluate_main(tiny_config(run, "evaluate.tune=true", "evaluate.tune_images_per_class=2"))
    assert {"max_pool2d_with_indices_backward.default", "upsample_nearest2d.default"} <= ops.names  # trained, decoded
    assert without_deterministic_cuda_kernel(ops.names) == set()


def test_an_op_without_a_deterministic_kernel_stops_a_deterministic_stage_naming_the_key(tiny_run, tmp_path, monkeypatch):
    """torch's refusal (put_ has no deterministic kernel, on the CPU too) becomes a UserError naming the config
    key and the fix; with deterministic=false the same step trains."""
    reseed = Trainer.reseed

    def reseed_and_put(self, step):
        reseed(self, step)
        if step == 2:
            torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))

    monkeypatch.setattr(Trainer, "reseed", reseed_and_put)
    run = untrained_copy(tiny_run, tmp_path / "run", "ldm")
    try:
        with pytest.raises(UserError, match=r"^deterministic=true: put_ has no deterministic kernel on this device, so this "
                           r"stage cannot repeat bit for bit; set deterministic=false \(--set deterministic=false\) to "
                           r"train with the fastest kernels$") as caught:
            ldm_main(tiny_config(run, *quiet_overrides("ldm", 4)))
        assert isinstance(caught.value.__context__, RuntimeError)
        ldm_main(tiny_config(run, *quiet_overrides("ldm", 4), "deterministic=false"))
        assert (run / "train_state" / "ldm" / "state-00000004.safetensors").is_file()
    finally:
        common.devices.use_deterministic_kernels(False)


def test_torchs_refusals_under_deterministic_kernels_name_the_key_and_other_errors_pass(monkeypatch):
    from common.devices import deterministic_refusal

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    cublas = RuntimeError("Deterministic behavior was enabled with either `torch.use_deterministic_algorithms(True)` or "
                          "`at::Context::setDeterministicAlgorithms(true)`, but this operation is not deterministic because "
                          "it uses CuBLAS and you have CUDA >= 10.2. To enable deterministic behavior in this case, you must "
                          "set an environment variable before running your PyTorch application: CUBLAS_WORKSPACE_CONFIG=:4096:8")
    assert str(deterministic_refusal(cublas)) == (
        "deterministic=true: cuBLAS repeats only with CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) in the environment, but "
        "it is ':0:0'; unset it or set it to :4096:8, or set deterministic=false")
    kernel = RuntimeError("upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you set "
                          "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation")
    assert str(deterministic_refusal(kernel)).startswith("deterministic=true: upsample_bilinear2d_backward_out_cuda has no ")
    assert deterministic_refusal(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None


def test_every_command_turns_tf32_on_on_a_gpu(tiny_run, monkeypatch):
    """torch leaves CUDA matmuls in fp32: the training stages, encode-dataset and the pipeline of generate and
    evaluate turn TF32 on, on a GPU (on the CPU there is nothing to set)."""
    import pipelines.generate

    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for cpu, expected in ((True, (False, False)), (False, (True, True))):  # as on a CPU, then as on a GPU
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            with monkeypatch.context() as machine:
                machine.setattr(common.devices, "on_cpu", lambda: cpu)
                common.devices.allow_tf32()
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == expected
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    calls = []
    monkeypatch.setattr(common.devices, "allow_tf32", lambda: calls.append("stage"))
    monkeypatch.setattr(pipelines.generate, "allow_tf32", lambda: calls.append("pipeline"))
    make_accelerator("no")
    common.devices.process_state()  # encode-dataset's
    pipelines.generate.load_pipeline(tiny_run, "cpu")
    assert calls == ["stage", "stage", "pipeline"]


def test_stages_in_one_process_may_use_different_precisions():
    """accelerate's process-wide state refuses a second precision; make_accelerator resets it per stage."""
    from accelerate import Accelerator

    first = make_accelerator("bf16")
    assert first.mixed_precision == "bf16"
    with pytest.raises(ValueError, match="AcceleratorState has already been initialized"):
        Accelerator(mixed_precision="no", cpu=True)  # what a second stage hit before
    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    make_accelerator("no")


@pytest.mark.parametrize("setting, launcher, bf16, expected, note", [
    ("auto", None, True, "bf16", None),
    ("auto", None, False, "fp16", None),
    ("auto", "fp16", True, "fp16", None),  # accelerate launch --mixed_precision fp16 / accelerate config
    ("auto", "no", True, "no", None),
    ("bf16", "fp16", True, "bf16", "ldm.mixed_precision=bf16 from the config overrides the launcher's mixed precision fp16"),
    ("no", None, True, "no", None),
])
def test_mixed_precision_on_cuda_defers_to_the_launcher_unless_the_config_says(
        monkeypatch, capsys, setting, launcher, bf16, expected, note):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert resolve_mixed_precision(setting, "ldm.mixed_precision") == expected
    printed = capsys.readouterr().out
    assert (note in printed) if note else printed == ""


def test_a_launchers_precision_this_toolkit_does_not_train_in_is_refused(monkeypatch, capsys):
    """accelerate config's fp8 (TransformerEngine, torchao or MS-AMP) taken by mixed_precision=auto: before, accelerate
    failed at the stage's start ("no FP8-compatible backend was installed"), or, with one installed, converted
    the models' linear layers. Refused up front, naming the key; an explicit config value overrides it; a CPU
    ignores it as it does bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UserError) as error:
        resolve_mixed_precision("auto", "ldm.mixed_precision")
    assert str(error.value) == (
        "ldm.mixed_precision=auto takes the launcher's mixed precision, fp8 (accelerate launch --mixed_precision or "
        "accelerate config), which this toolkit does not train in; set ldm.mixed_precision=bf16 (or fp16, no) to "
        "override it, or launch with --mixed_precision bf16")
    assert resolve_mixed_precision("bf16", "ldm.mixed_precision") == "bf16"
    assert "ldm.mixed_precision=bf16 from the config overrides the launcher's mixed precision fp8" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto", "ldm.mixed_precision") == "no"
    assert "the launcher's mixed precision fp8 ignored: no CUDA device, training in fp32 on the CPU" in capsys.readouterr().out


def test_never_mixed_precision_on_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision("auto") == "no"
    assert "mixed precision bf16 ignored: no CUDA device, training in fp32 on the CPU" in capsys.readouterr().out
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_mixed_precision("fp16") == "no"
    assert resolve_mixed_precision("auto") == "no"


def test_encoding_needs_no_accelerator(tiny_run, tmp_path, monkeypatch):
    """encode-dataset trains nothing: it runs without building an Accelerator (so no precision to clash)."""
    import ldm.encode

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "latents")

    def refuse(*args, **kwargs):
        raise AssertionError("encode-dataset built an Accelerator")

    monkeypatch.setattr(common.devices, "Accelerator", refuse)
    manifest = ldm.encode.main(tiny_config(run))
    assert manifest["num_images"] == 200 and (run / "latents" / "manifest.json").is_file()


def test_compile_is_per_stage_and_auto_defers_to_the_launcher(monkeypatch):
    """ldm.compile wraps the stage's models in torch.compile (through accelerate's dynamo plugin); a later
    stage with compile=auto gets what `accelerate launch --dynamo_backend` set (here: nothing)."""
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    compiled = make_accelerator("no", "reduce-overhead")
    assert type(compiled.prepare(torch.nn.Linear(2, 2))).__name__ == "OptimizedModule"
    assert compiled.state.dynamo_plugin.mode == "reduce-overhead"
    plain = make_accelerator("no", "auto")
    assert type(plain.prepare(torch.nn.Linear(2, 2))).__name__ == "Linear"
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    launched = make_accelerator("no", "auto")
    assert type(launched.prepare(torch.nn.Linear(2, 2))).__name__ == "OptimizedModule"
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    make_accelerator("no", "no")


def test_regional_compilation_of_the_unet_is_refused_before_training(tiny_run, tmp_path, monkeypatch):
    """accelerate's regional compilation compiles the UNet's layers one by one; diffusers' UNet then stopped at its
    first step with "TypeError: GroupNorm does not support len()" (its `if self.conv_norm_out:`). Refused with the
    fix, before the stage writes anything. (train-vae and train-clip run so: checked by hand.)"""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "aot_eager")  # graph capture without inductor's code generation
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
    run = untrained_copy(tiny_run, tmp_path / "run", "ldm")
    with pytest.raises(UserError) as error:
        ldm_main(tiny_config(run))
    assert str(error.value) == (
        "train-ldm: accelerate's regional compilation (--dynamo_use_regional_compilation, or accelerate config) "
        "compiles the UNet's layers one by one, which diffusers' UNet cannot run (its `if self.conv_norm_out:` fails "
        "on a compiled layer); compile the whole UNet: launch without regional compilation")
    assert not (run / "train_state" / "ldm").exists()


def test_compiled_stages_train_and_save_the_models_themselves(tiny_run, tmp_path, monkeypatch):
    """Every stage trains with compile on, and its checkpoints, EMA and export hold the models themselves,
    not torch.compile's wrapper. Before: the export declared the UNet as torch's `OptimizedModule`, which
    no pipeline loads; resume states' keys began `_orig_mod.`, so a run could not resume with compile
    off; and train-vae stopped at its first GAN step: the adaptive GAN weight backpropagates through the
    VAE three times (retain_graph), which a compiled model's donated buffers forbid. (The backend here is
    aot_eager: torch.compile's graph capture and autograd without inductor's code generation, which
    takes minutes on 2 cores; it has the same wrapper and donated buffers.)"""
    import json

    from common.checkpoint import load_tensors
    from ldm.encode import main as encode_main
    from pipelines import LatentPipeline

    plugin = common.devices.TorchDynamoPlugin
    monkeypatch.setattr(common.devices, "TorchDynamoPlugin",
                        lambda backend, mode: plugin(backend="no" if backend == "no" else "aot_eager"))
    run = tmp_path / "run"
    config = tiny_config(run, "clip.compile=default", "vae.compile=default", "ldm.compile=default")  # vae.disc_start=2
    for stage in (clip_main, vae_main, encode_main, ldm_main):
        stage(config)
    for stage in ("clip", "vae", "ldm"):
        setup = json.loads((run / "logs" / f"{stage}.jsonl").read_text().splitlines()[0])
        assert (setup["event"], setup["compiled"]) == ("setup", True)
        compiled = load_tensors(max((run / "train_state" / stage).glob("state-*.safetensors")))[0]
        eager = load_tensors(max((tiny_run / "train_state" / stage).glob("state-*.safetensors")))[0]
        assert sorted(compiled) == sorted(eager)
    index = json.loads((run / "model_index.json").read_text())
    assert (index["unet"], index["vae"], index["text_encoder"]) == (
        ["diffusers", "UNet2DConditionModel"], ["diffusers", "AutoencoderKL"], ["transformers", "CLIPTextModel"])
    assert type(LatentPipeline.from_pretrained(run).unet).__name__ == "UNet2DConditionModel"


def test_a_resume_state_saved_with_compiles_wrapper_keys_still_resumes(tiny_run, tmp_path, capsys):
    """States that compiled runs wrote before they saved the models themselves have keys with `_orig_mod.`
    (model.unet._orig_mod.conv_in.weight); they resume as the same weights."""
    from common.checkpoint import load_tensors, save_tensors

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = max((run / "train_state" / "ldm").glob("state-*.safetensors"))
    tensors, meta = load_tensors(state)
    wrapped = {"{}.{}._orig_mod.{}".format(*key.split(".", 2)) if key.startswith(("model.", "ema.")) else key: value
               for key, value in tensors.items()}
    assert {"model.unet._orig_mod.conv_in.weight", "ema.unet._orig_mod.conv_in.weight"} <= set(wrapped)
    save_tensors(state, wrapped, meta)
    ldm_main(tiny_config(run, *quiet_overrides("ldm", 4)))  # the state's step: nothing more to train
    assert f"resumed from {state} at step 4" in capsys.readouterr().out


def test_fp16_unscales_each_optimizer_once_and_updates_the_scale_once_a_step(tiny_run, tmp_path, monkeypatch):
    """fp16 (GPUs without bf16: a T4, a V100) scales the loss with a GradScaler. What a CPU can run of it: the
    accelerator set up as accelerate sets it up on CUDA (autocast, GradScaler), with the CPU's fp16 autocast and
    a CPU GradScaler. train-vae steps two optimizers once the GAN is on (tiny: from step 2 of 4). Before:
    accelerate's clip_grad_norm_ for the VAE unscaled both optimizers and its optimizer step updated the scale,
    so the discriminator's gradients were unscaled again (its logged norm 1/65,536 of fp32's) and the scale
    was updated twice a step."""
    import json

    import common.training

    calls = count_calls(monkeypatch, torch.amp.GradScaler, ["unscale_", "update"])
    build = common.training.make_accelerator

    def as_on_cuda(*args, **kwargs):
        accelerator = build(*args, **kwargs)
        if accelerator.scaler is None:  # the CPU's (on a GPU, accelerate's own)
            accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu")
        return accelerator

    monkeypatch.setattr(common.training, "make_accelerator", as_on_cuda)
    monkeypatch.setattr(common.training, "resolve_mixed_precision", lambda setting, key: "fp16")
    run = untrained_copy(tiny_run, tmp_path / "run", "vae")
    vae_main(tiny_config(run))
    assert calls == {"unscale_": 2 + 2 * 2, "update": 4}  # steps 0-1: the VAE's; steps 2-3: the VAE's and the disc's
    fp16, fp32 = ([record["grad_norm_disc"] for record in map(json.loads, (folder / "logs" / "vae.jsonl").read_text().splitlines())
                   if record.get("grad_norm_disc") is not None][-1] for folder in (run, tiny_run))  # None: overflowed
    assert 0.5 < fp16 / fp32 < 2


def test_accelerate_launch_cpu_on_a_cuda_machine_never_autocasts(monkeypatch, capsys):
    """`accelerate launch --cpu` puts the Accelerator on the CPU even where CUDA is present (ACCELERATE_USE_CPU);
    the precision must follow it, or the launcher's bf16 would autocast on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert common.devices.on_cpu()
    assert resolve_mixed_precision("auto", "ldm.mixed_precision") == "no"
    assert resolve_mixed_precision("fp16", "ldm.mixed_precision") == "no"
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "note: the launcher's mixed precision bf16 ignored: accelerate launch --cpu, training in fp32 on the CPU",
        "note: ldm.mixed_precision=fp16 ignored: accelerate launch --cpu, training in fp32 on the CPU"]
    monkeypatch.setenv("RANK", "1")  # the other processes of a launch stay quiet
    assert resolve_mixed_precision("fp16", "ldm.mixed_precision") == "no" and capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    assert not common.devices.on_cpu() and resolve_mixed_precision("auto") == "bf16"


def test_the_run_records_the_precision_it_trained_in_and_a_resume_that_changes_it(tmp_path, monkeypatch, capsys):
    """config.yaml keeps what was asked (here bf16, under a bf16 launcher); the log, the checkpoints and the
    trackers' hyperparameters say what ran (fp32 on the CPU), and a resume in another precision says so."""
    import json

    from common.checkpoint import load_tensors, save_tensors
    from ldm.train_clip import main as clip_main

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    run = tmp_path / "run"
    config = tiny_config(run, "clip.mixed_precision=bf16")
    clip_main(config)
    setup = {"mixed_precision": "no", "compiled": False, "device": "cpu", "processes": 1, "effective_batch": 16}
    first = json.loads((run / "logs" / "clip.jsonl").read_text().splitlines()[0])
    assert {k: v for k, v in first.items() if k != "time"} == {"event": "setup", "step": 0, **setup}
    assert "mixed_precision: bf16" in (run / "config.yaml").read_text()
    hparams = next((run / "logs" / "clip").rglob("hparams.yml")).read_text()
    assert "clip.mixed_precision_used: 'no'" in hparams
    states = sorted((run / "train_state" / "clip").glob("state-*.safetensors"))
    tensors, meta = load_tensors(states[0])
    assert meta["setup"] == setup
    save_tensors(states[0], tensors, {**meta, "setup": {**setup, "mixed_precision": "bf16"}})  # as a GPU would
    states[-1].unlink()
    capsys.readouterr()
    clip_main(config)
    assert (f"resumed from {states[0]} at step 2 (trained in mixed precision bf16 so far, continuing in no)"
            in capsys.readouterr().out)


def trainer_refusal(tmp_path, stage: str, *overrides: str) -> str:
    """The message of the UserError that `stage`'s Trainer raises on the tiny config with `overrides`, having
    written nothing."""
    config = tiny_config(tmp_path / "run", *overrides)
    with pytest.raises(UserError) as error:
        Trainer(stage, config, getattr(config, stage))
    assert not (tmp_path / "run").exists()
    return str(error.value)


@pytest.mark.parametrize("backend, mode, launcher", [("inductor", "reduce-overhead", "mode reduce-overhead"),
                                                    ("cudagraphs", "default", "backend cudagraphs")])
def test_the_launchers_cuda_graphs_with_gradient_accumulation_are_refused(tmp_path, monkeypatch, backend, mode, launcher):
    """compile=auto takes `accelerate launch --dynamo_backend/--dynamo_mode`; CUDA graphs from there, with
    grad_accum > 1, are refused as the config's own reduce-overhead is (see test_config), before anything is written."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", backend)
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", mode)
    assert trainer_refusal(tmp_path, "clip", "clip.grad_accum=2") == (
        f"accelerate launch's dynamo {launcher} (taken by clip.compile=auto) replays CUDA graphs, and each replay "
        f"writes its outputs into the same memory: with clip.grad_accum=2, the gradients one micro-batch leaves would "
        f"be overwritten by the next one's backward (pytorch/pytorch#169545). Set clip.grad_accum=1 with a larger "
        f"clip.batch_size, or clip.compile=default")


@pytest.mark.parametrize("flag, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                        ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")])
def test_a_launcher_that_shards_the_weights_is_refused(tmp_path, monkeypatch, flag, name):
    """`accelerate config` with FSDP or DeepSpeed shards each model across processes, where the EMA, the resume
    states and the export read it whole; refused, naming the setting and the fix, before anything is written."""
    monkeypatch.setenv(flag, "true")
    assert trainer_refusal(tmp_path, "vae") == (
        f"vae: accelerate launch runs this stage with {name} ({flag}=true, from accelerate config), which shards each "
        f"model's weights across processes; this toolkit's EMA, checkpoints and exported pipeline read them whole. Its "
        f"models fit on every GPU: run `accelerate config` again choosing multi-GPU without {name}, or launch with "
        f"--multi_gpu")


def test_more_processes_than_gpus_are_refused(tiny_run, tmp_path, monkeypatch):
    """accelerate gives local process k the GPU cuda:k; a launch with more processes than the machine has GPUs
    stopped with CUDA's bare 'invalid device ordinal'. Each stage that starts processes (the training stages
    and encode-dataset) refuses it, naming the fix, before anything is written. (A one-GPU machine is emulated.)"""
    import ldm.encode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    message = ("accelerate launch started process 1 on this machine, which has 1 GPU(s), one per process: launch with "
               "--num_processes 1 (or fewer), or add --cpu to train on the CPU")
    assert trainer_refusal(tmp_path, "clip") == message
    run = untrained_copy(tiny_run, tmp_path / "encoded", "ldm")
    shutil.rmtree(run / "latents")
    with pytest.raises(UserError) as error:
        ldm.encode.main(tiny_config(run))
    assert str(error.value) == message and not (run / "latents").exists()


def test_the_launchers_gradient_accumulation_is_refused_not_applied_on_top(tmp_path, monkeypatch):
    """ACCELERATE_GRADIENT_ACCUMULATION_STEPS (accelerate launch --gradient_accumulation_steps, a DeepSpeed
    accelerate config) made accelerator.backward divide every loss by it too: gradients 4x smaller, while the
    effective batch said "x 1 accumulation". The stages accumulate themselves (grad_accum)."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    assert make_accelerator("no").gradient_accumulation_steps == 1
    assert trainer_refusal(tmp_path, "ldm") == (
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4 (from accelerate launch --gradient_accumulation_steps or accelerate "
        "config) is not how this toolkit accumulates: unset it and set ldm.grad_accum=4 instead")
