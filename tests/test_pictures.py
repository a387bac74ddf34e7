"""Writing words, the steps grid and the denoising animation (the pictures of the seed documents)."""

import re
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from common.data.devanagari import CLASSES, class_fields
from pipelines import LatentPipeline
from pipelines.generate import STEPS_GRID, cli as generate_cli, denoising_frames, slug, steps_grid
from pipelines.glyphs import LineLayout, ink_box, lay_out_line


def test_run_folder_carries_the_class_table(pipe):
    assert [c["fields"]["symbol"] for c in pipe.classes] == [str(d) for d in range(10)]
    assert pipe.classes[6]["prompt"] == "Draw a six"


def test_segment_digits_names_and_devanagari(pipe):
    assert pipe.segment("2026") == [2, 0, 2, 6]
    assert pipe.segment("20 26") == [2, 0, None, 2, 6]
    assert pipe.segment("two zero") == [2, 0]
    with pytest.raises(ValueError, match="Known characters: 0 1 2 3 4 5 6 7 8 9"):
        pipe.segment("20x6")
    devanagari = LatentPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler)
    devanagari.classes = [{"key": k, "fields": class_fields(k), "prompt": f"Draw {s}"} for k, _, s in CLASSES]
    ksha, tra, ka, three = 33, 34, 0, 39
    assert devanagari.segment("क्षत्र") == [ksha, tra]  # conjuncts are matched whole
    assert devanagari.segment("क ३") == [ka, None, three]
    assert devanagari.segment("ka ksha three") == [ka, ksha, three]
    assert devanagari.segment("kna") == [4]  # the dataset's own folder spelling works too
    with pytest.raises(ValueError, match="no class draws 'ि'"):
        devanagari.segment("कि")


@pytest.mark.parametrize("text", ["20\n26", "20\r\n26", "20\u2028 26"])
def test_write_refuses_a_line_break_inside_the_text(pipe, text):
    """Before: "20\n26" was drawn as "20 26" on one line (a line break read as a space)."""
    with pytest.raises(ValueError, match="^" + re.escape(f"write() draws one line, and {text!r} has a line break: "
                                                         f"write each line separately") + "$"):
        pipe.write(text)
    assert pipe.segment(" 2026\n") == [None, 2, 0, 2, 6, None]  # leading and trailing white space: spaces, as before


def test_write_composes_one_glyph_per_character_with_one_seed(pipe):
    line = pipe.write("2026", num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    again = pipe.write("2026", num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(line), np.asarray(again))
    glyphs = pipe(["Draw a two", "Draw a zero", "Draw a two", "Draw a six"], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(3)).images  # write() samples with the run's defaults too
    assert line.height == 16  # digits: no descender room
    assert np.array_equal(np.asarray(line), np.asarray(lay_out_line(list("2026"), glyphs, 16)))  # glyph 2 in slot 2
    spaced = pipe.write("2 6", num_inference_steps=2, generator=torch.Generator().manual_seed(3), gap=2)
    two, six = pipe(["Draw a two", "Draw a six"], num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images
    assert np.array_equal(np.asarray(spaced), np.asarray(lay_out_line(["2", None, "6"], [two, six], 16, LineLayout(gap=2))))
    ink_width = lambda image: ink_box(image, 64)[2] - ink_box(image, 64)[0]  # noqa: E731
    assert spaced.width == 2 + ink_width(two) + 16 // 2 + ink_width(six) + 2  # margin, 2, word gap, 6, margin


def test_steps_grid_and_denoising_frames(pipe):
    grid = steps_grid(pipe, "Draw a six", seed=0, guidance_scale=2.0, steps=(1, 2, 3))
    assert grid.width > 3 * 16 * 4  # three labelled tiles at 4x
    frames = denoising_frames(pipe, "Draw a six", steps=5, seed=0, guidance_scale=2.0)
    assert len(frames) == 5 and all(f.size == (16, 16) for f in frames)
    final = pipe("Draw a six", num_inference_steps=5, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).images[0]
    # the last prediction of the clean image is the image the run ends with
    assert np.abs(np.asarray(frames[-1], float) - np.asarray(final, float)).mean() < 2.0
    assert len({np.asarray(f).tobytes() for f in frames}) > 1  # the prediction changes along the way


def test_generate_write_steps_grid_and_gif(tiny_run, pipe, tmp_path):
    generate_cli(["--run", str(tiny_run), "Draw a six", "--num", "1", "--steps", "2", "--out", str(tmp_path),
                  "--write", "2026", "--steps-grid", "--gif"])
    written = PIL.Image.open(tmp_path / "write-2026.png")
    assert np.array_equal(np.asarray(written), np.asarray(
        pipe.write("2026", num_inference_steps=2, generator=torch.Generator().manual_seed(0))))  # the config's seed
    assert PIL.Image.open(tmp_path / "steps-grid.png").width > len(STEPS_GRID) * 16 * 4  # one labelled tile per step count
    gif = PIL.Image.open(tmp_path / "denoising-00-draw-a-six.gif")
    assert gif.n_frames == 2  # one frame per sampling step


@pytest.mark.parametrize("flag", [["--negative", "Draw a one"], ["--guidance-interval", "0.5", "1.0"]],
                         ids=["negative", "interval"])
def test_generate_sampling_flags_reach_every_picture(tiny_run, tmp_path, flag):
    """Before: --negative and --guidance-interval changed the prompts' images only; --write (--negative), --steps-grid
    and --gif sampled without them, silently."""
    common = ["--run", str(tiny_run), "Draw a six", "--num", "1", "--steps", "3", "--guidance", "4", "--write", "26",
              "--steps-grid", "--gif"]
    generate_cli([*common, "--out", str(tmp_path / "plain")])
    generate_cli([*common, *flag, "--out", str(tmp_path / "flagged")])
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == ["00-draw-a-six-0.png", "denoising-00-draw-a-six.gif", "grid.png", "steps-grid.png", "write-26.png"]
    changed = [name for name in names if (tmp_path / "plain" / name).read_bytes() != (tmp_path / "flagged" / name).read_bytes()]
    assert changed == names


def test_generate_with_a_file_as_run_names_the_run_not_out(tmp_path, capsys):
    """Before: "error: --out '<file>/samples/generate' cannot be created: '<file>' is a file", about a flag not given."""
    run = tmp_path / "run.txt"
    run.write_text("not a run")
    with pytest.raises(SystemExit) as exit_info:
        generate_cli(["--run", str(run), "Draw a six"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {run} is not a finished run (no model_index.json); train it with "
                                       f"`train-ldm`, or pass --run checkpoints/mnist for the ready-made model\n")


def test_generate_with_a_guidance_scale_that_overflows_is_a_one_line_error(tiny_run, tmp_path, capsys):
    """Before: a FloatingPointError traceback."""
    with pytest.raises(SystemExit) as exit_info:
        generate_cli(["--run", str(tiny_run), "Draw a six", "--num", "1", "--steps", "2", "--guidance", "1e30",
                      "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: sampling gave non-finite latents (DPMSolverMultistepScheduler, 2 steps, guidance 1e+30); try fewer "
        "steps, another scheduler or a lower guidance scale")
    assert not (tmp_path / "out").exists()  # before: left behind, empty


def test_generate_a_prompt_with_a_line_break(tiny_run, tmp_path):
    """Before: "error: can't measure length of multiline text" from the grid's label, after the prompt's PNG was written.
    CLIP's tokenizer reads a line break as a space, and so does the label now."""
    generate_cli(["--run", str(tiny_run), "Draw a\nsix", "--num", "1", "--steps", "2", "--steps-grid", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-draw-a-six-0.png", "grid.png", "steps-grid.png"]


@pytest.mark.parametrize("text, expected", [
    ("Draw किताब", "draw-किताब"),  # before: "draw-क-त-ब", the vowel signs read as separators
    ("क्ष त्र", "क्ष-त्र"),  # before: "क-ष-त-र"
    ("Draw a six!", "draw-a-six"),
    ("../../etc/passwd", "etc-passwd"),
    ("C:\\x<y>|z?*", "c-x-y-z"),
    ("snake_case", "snake_case"),
    ("a" * 39 + " b", "a" * 39),  # cut at 40 characters, with no "-" left at the end
    ("?!", "unconditional"),
])
def test_slug_keeps_words_whole_and_only_words(text, expected):
    assert slug(text) == expected


def test_generate_refuses_a_prompt_that_is_not_utf8(tiny_run, tmp_path, capsys):
    """Before: a TypeError traceback from the tokenizer ("TextEncodeInput must be Union[...]")."""
    prompt = b"Draw a \xff six".decode("utf-8", "surrogateescape")  # what Python makes of such command-line bytes
    with pytest.raises(SystemExit) as exit_info:
        generate_cli(["--run", str(tiny_run), prompt, "--num", "1", "--steps", "1", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: prompts must be valid Unicode text; 'Draw a \\udcff six' has characters that are not (on a command "
        "line: bytes that are not UTF-8); pass the text in UTF-8")
    assert not (tmp_path / "out").exists()  # before: left behind, empty


def test_generate_steps_grid_on_a_run_with_fewer_timesteps_than_50(tiny_run, tmp_path, capsys):
    """Before: the prompt's images and grid were written, then "DPMSolverMultistepScheduler with 50 steps repeats 11
    timestep(s) ... use fewer steps", advice the fixed grid could not follow."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = run / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"num_train_timesteps": 1000', '"num_train_timesteps": 40'))
    generate_cli(["--run", str(run), "Draw a six", "--num", "1", "--steps", "2", "--steps-grid", "--out", str(tmp_path / "out")])
    assert ("[generate] the steps grid leaves out 50 steps: more than DPMSolverMultistepScheduler takes on this run's 40 "
            "timesteps") in capsys.readouterr().out.splitlines()
    wide = PIL.Image.open(tmp_path / "out" / "steps-grid.png").width
    assert wide == steps_grid(LatentPipeline.from_pretrained(run), "Draw a six", 0, 2.0, STEPS_GRID[:-1]).width


def test_generate_gifs_of_prompts_with_one_slug_are_all_kept(tiny_run, tmp_path):
    """Before: "Draw a six" and "draw a SIX!" both wrote denoising-draw-a-six.gif; the second replaced the first."""
    generate_cli(["--run", str(tiny_run), "Draw a six", "draw a SIX!", "--num", "1", "--steps", "2", "--out", str(tmp_path),
                  "--gif"])
    gifs = sorted(p.name for p in tmp_path.glob("*.gif"))
    assert gifs == ["denoising-00-draw-a-six.gif", "denoising-01-draw-a-six.gif"]


def test_generate_unknown_character_is_a_one_line_error(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_cli(["--run", str(tiny_run), "--write", "20x6", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no class draws 'x'" in capsys.readouterr().err


def test_generate_refuses_unknown_characters_before_writing_the_prompts_images(tiny_run, tmp_path, capsys):
    """Before: the prompts' PNGs and grid.png were written (over any earlier ones), then --write failed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"an earlier grid")
    with pytest.raises(SystemExit) as exit_info:
        generate_cli(["--run", str(tiny_run), "Draw a six", "--num", "1", "--steps", "1", "--write", "20x6", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "\nerror: no class draws 'x' (in '20x6'). Known characters: 0 1 2 3 4 5 6 7 8 9" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["grid.png"] and (out / "grid.png").read_bytes() == b"an earlier grid"


def test_generate_refuses_to_replace_an_earlier_calls_files_unless_told(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    generate_cli(["--run", str(tiny_run), "Draw a six", "--num", "2", "--steps", "1", "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # another seed, same names: the first call's images would be lost
        generate_cli(["--run", str(tiny_run), "Draw a six", "--num", "2", "--steps", "1", "--seed", "5", "--out", str(out)])
    assert exit_info.value.code == 2
    assert (f"\nerror: --out {out} already holds 00-draw-a-six-0.png, 00-draw-a-six-1.png, grid.png from an earlier "
            f"call; pass another --out, or --overwrite to replace them") in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    generate_cli(["--run", str(tiny_run), "Draw a six", "--write", "2026", "--num", "2", "--steps", "1", "--seed", "5",
                  "--out", str(out), "--overwrite"])
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() | {"write-2026.png"} and after["00-draw-a-six-0.png"] != before["00-draw-a-six-0.png"]


@pytest.mark.parametrize("command", ["generate", "evaluate"])
@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be at least 1 (got 0); leave it out for the run's own"),
    (["--guidance", "nan"], "--guidance must be a finite number, e.g. --guidance 1.75 (got nan); leave it out for the "
                            "run's tuned value"),
    (["--guidance-interval", "1", "0"], "--guidance-interval START STOP must have 0 <= START < STOP <= 1, the fraction of "
                                        "the steps that are guided, e.g. --guidance-interval 0.2 1.0 (got 1.0 0.0)"),
], ids=["steps", "guidance", "interval"])
def test_sampling_flags_are_checked_before_any_work(tiny_run, tmp_path, capsys, command, flags, message):
    """Before: evaluate read the data and trained its classifier, then stopped with the pipeline's traceback."""
    from pipelines.evaluate import cli as evaluate_cli

    run = tmp_path / "run"  # not even a run folder: the flags are refused first
    with pytest.raises(SystemExit) as exit_info:
        (generate_cli if command == "generate" else evaluate_cli)(["--run", str(run), *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not run.exists()


def test_evaluate_refuses_more_steps_than_the_sampler_takes_before_reading_the_data(tiny_run, tmp_path, capsys, monkeypatch):
    """Before: evaluate read the data and trained its classifier (writing evaluator/), then stopped with a traceback
    when sampling began."""
    import pipelines.evaluate
    from pipelines.evaluate import cli as evaluate_cli

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    monkeypatch.setattr(pipelines.evaluate, "load_train_and_holdout", lambda data: pytest.fail("the data was read"))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli(["--run", str(run), "--steps", "1001"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: DPMSolverMultistepScheduler with 1001 steps repeats 2 timestep(s) (the model was trained on 1000), "
        "which breaks the sampler; use fewer steps (e.g. 998)")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
