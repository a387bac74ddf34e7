"""Property tests (hypothesis) of config validation: any value either loads into a run that trains a
step, or is refused with a message that names the key."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import ConfigError
from common.errors import UserError
from conftest import tiny_config
from vae.train import main as train_vae


def yaml_text(value) -> str:
    """How a user would type `value` after `--set key=`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    return str(value)


numbers = st.one_of(st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 2**63]))
anything = st.one_of(numbers, st.booleans(), st.text(max_size=8), st.lists(st.integers(-2, 40), max_size=4))

ALL_KEYS = ["seed", "data.image_size", "data.channels", "data.holdout_fraction", "data.max_per_class", "data.per_class",
            "data.augment.rotate_degrees", "data.augment.translate", "data.augment.scale", "data.captions",
            "vae.block_out_channels", "vae.norm_num_groups", "vae.latent_channels", "vae.layers_per_block", "vae.kl_weight",
            "vae.lr", "vae.batch_size", "vae.grad_clip", "vae.ema_decay", "vae.adam_betas", "vae.disc_layers",
            "clip.patch_size", "clip.text_heads", "clip.max_length", "clip.vocab_size", "encode.shard_size",
            "encode.batch_size", "ldm.block_out_channels", "ldm.cross_attention", "ldm.attention_heads",
            "ldm.norm_num_groups", "ldm.cond_dropout", "ldm.num_train_timesteps", "ldm.snr_gamma",
            "sample.num_inference_steps", "sample.guidance_scale", "sample.guidance_interval", "evaluate.images_per_class", "evaluate.paraphrases",
            "evaluate.tune_guidance_intervals", "evaluate.tune_min_class", "evaluate.classifier_print_fonts"]


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(ALL_KEYS), value=anything)
def test_any_value_loads_or_is_refused_naming_its_key(key, value):
    try:
        tiny_config("/tmp/property-run", f"{key}={yaml_text(value)}")
    except ConfigError as error:
        assert key in str(error), str(error)  # the key itself, or the other key of a relation between two


# values a careless user might type for the keys stage one reads
VAE_VALUES = {
    "data.image_size": st.integers(-4, 48),
    "data.holdout_fraction": st.floats(-0.5, 1.5) | st.just(float("nan")),
    "data.augment.rotate_degrees": st.floats(-10, 400) | st.just(float("inf")),
    "data.augment.translate": st.floats(-0.2, 1.5),
    "vae.block_out_channels": st.lists(st.integers(-2, 24), max_size=3),
    "vae.norm_num_groups": st.integers(-1, 17),
    "vae.latent_channels": st.integers(-1, 9),
    "vae.layers_per_block": st.integers(-1, 3),
    "vae.lr": st.floats(-1, 1e3) | st.just(float("nan")),
    "vae.kl_weight": st.floats(-1, 10),
    "vae.batch_size": st.integers(-1, 12),
    "vae.grad_clip": st.floats(-1, 10),
    "vae.ema_decay": st.floats(-0.5, 1.5),
    "vae.adam_betas": st.lists(st.floats(-0.5, 1.5), max_size=3),
    "seed": st.integers(-2, 2**64),
}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_accepted_stage_one_value_trains_a_step(tmp_path_factory, data):
    key = data.draw(st.sampled_from(sorted(VAE_VALUES)))
    value = data.draw(VAE_VALUES[key])
    run = tmp_path_factory.mktemp("property")
    try:
        config = tiny_config(run, f"{key}={yaml_text(value)}", "vae.max_steps=1", "vae.disc_start=-1")
    except ConfigError as error:
        assert key in str(error), str(error)
        return
    try:
        train_vae(config)
    except UserError as error:  # a refusal found once the data is read must still name the key to change
        assert key in str(error), str(error)
        return
    assert (run / "vae" / "diffusion_pytorch_model.safetensors").is_file()
