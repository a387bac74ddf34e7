"""The text side: a CLIP tokenizer trained on the captions, loading a CLIP text encoder, encoding prompts.

Whether the text encoder was trained here (`train-clip`) or is a pretrained CLIP, it is a transformers
`CLIPTextModel` + `CLIPTokenizer` pair in `run/text_encoder/` and `run/tokenizer/`, so one loading path
serves both and the run folder also loads in diffusers' StableDiffusionPipeline.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tokenizers import pre_tokenizers
from transformers import BatchEncoding, CLIPTextModel, CLIPTokenizer

from common.checkpoint import check_weights, folder_fingerprint
from common.config import Config
from common.errors import DatasetError, RunFolderError, UserError
from common.run import WRITTEN_BY, RunFolder

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_tokenizer(corpus: list[str], vocab_size: int, max_length: int) -> CLIPTokenizer:
    """A byte-level BPE with CLIP's normalisation and pre-tokenisation, learned from `corpus`.

    Every byte (alone and word-final) is in the vocabulary, so any prompt tokenizes, including
    words and scripts the captions never used. Ids: 0 = start, 1 = end (also the padding).
    The merges are learned here rather than by `tokenizers`' BpeTrainer, whose tie-breaking between
    equally frequent pairs follows hash-map order and so changes from run to run; caption corpora
    are full of such ties. Ties go to the smaller pair, so the tokenizer depends only on the corpus.
    """
    backend = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[]).backend_tokenizer
    counts: Counter[str] = Counter()
    for text in corpus:
        counts.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)))
    words = {word: [*word[:-1], word[-1] + "</w>"] for word in sorted(counts)}  # byte symbols, the last word-final
    vocab = {BOS: 0, EOS: 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for piece in (symbol, symbol + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break  # every word is one token
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for word, symbols in words.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[word] = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def perturb_caption(text: str, rng: np.random.Generator) -> str:
    """The caption with one or two made-up words inserted at random places (and sometimes a comma).

    Trained on a handful of caption templates, a text encoder learns nothing about words it never
    saw, and one unknown word can then change what a prompt means to it ("Sketch the number 4").
    Training on captions sprinkled with random non-words teaches the text side, and the UNet reading
    it, that such words do not change what is asked for.
    """
    words = text.split()
    for _ in range(int(rng.integers(1, 3))):
        word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 7))))
        words.insert(int(rng.integers(0, len(words) + 1)), word)
    if len(words) > 1 and rng.random() < 0.3:
        words[int(rng.integers(0, len(words) - 1))] += ","
    return " ".join(words)


def caption_variants(tokenizer: CLIPTokenizer, captions: list[str], count: int, seed: int) -> list[list[str]]:
    """Each caption followed by `count` perturbed versions that still fit the tokenizer's length."""
    variants = []
    for k, caption in enumerate(captions):
        rng = np.random.default_rng([seed, k])
        found = [caption]
        for _ in range(20 * count):
            if len(found) > count:
                break
            candidate = perturb_caption(caption, rng)
            if len(tokenizer(candidate, verbose=False).input_ids) <= tokenizer.model_max_length:
                found.append(candidate)
        variants.append(found + [caption] * (count + 1 - len(found)))  # a caption too long to perturb stays as is
    return variants


def text_encoder_source(config: Config) -> tuple[Path | str, Path | str]:
    """Where the text encoder and tokenizer come from: a pretrained CLIP, or the run's own."""
    name = config.text_encoder.pretrained
    if not name:
        run = RunFolder(config.run_dir)
        return run.component("text_encoder"), run.component("tokenizer")
    folder = Path(name).expanduser()
    if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():  # a diffusers pipeline folder
        return folder / "text_encoder", folder / "tokenizer"
    return name, name


def text_encoder_fingerprint(config: Config) -> str:
    """Hash of the text encoder's weights when it is a folder on disk (the run's own CLIP), else its name."""
    encoder_source, _ = text_encoder_source(config)
    folder = Path(encoder_source)
    return folder_fingerprint(folder) if folder.is_dir() else str(encoder_source)


def load_text_encoder(config: Config) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The frozen CLIP tokenizer and text encoder this run is conditioned on, read offline."""
    encoder_source, tokenizer_source = text_encoder_source(config)
    if not config.text_encoder.pretrained:
        check_weights(encoder_source, WRITTEN_BY["text_encoder"])
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_source), local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(str(encoder_source), local_files_only=True,
                                                     use_safetensors=True)
    except (OSError, ValueError) as error:
        if config.text_encoder.pretrained:
            raise UserError(
                f"text_encoder.pretrained='{config.text_encoder.pretrained}' cannot be loaded offline "
                f"({str(error).splitlines()[0][:160]}). Point it at a local CLIP folder (or one in the "
                f"Hugging Face cache), or leave it empty and run `train-clip --config ...` to train a small "
                f"CLIP on this dataset") from None
        raise UserError(f"this run has no text encoder yet ({encoder_source} is missing). Run "
                        f"`train-clip --config ...` first, or set text_encoder.pretrained to a local CLIP") from None
    check_tokenizer(tokenizer, text_encoder)
    return tokenizer, text_encoder.eval().requires_grad_(False)


def check_tokenizer(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
    """Refuse a tokenizer whose vocabulary is not the text encoder's (train-clip sizes one by the other): a
    tokenizer/ without its tokenizer.json loads without a word as the two special tokens alone, and every
    prompt would then read the same (merged classes)."""
    size, expected = len(tokenizer), text_encoder.config.vocab_size
    if size == expected:
        return
    folder = Path(tokenizer.name_or_path)
    problem = (f"{folder / 'tokenizer.json'} is missing, so the tokenizer knows {size} tokens, not the text encoder's "
               f"{expected}, and would read every prompt alike" if not (folder / "tokenizer.json").is_file() else
               f"the tokenizer in {folder} has {size} tokens but the text encoder reads {expected}: they come from "
               f"different runs")
    raise RunFolderError(f"{problem}. Restore {folder.name}/ from the run that trained the text encoder, or re-run "
                         f"`train-clip --config ...`")


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> BatchEncoding:
    """(N,) prompts -> `input_ids` (N, L), padded/truncated to the tokenizer's max length as SD pipelines do.

    Prompts longer than that are truncated with a warning that shows what was cut.
    """
    limit = tokenizer.model_max_length
    for prompt, ids in zip(prompts, tokenizer(prompts, verbose=False).input_ids):
        if len(ids) > limit:
            kept = tokenizer.decode(ids[1:limit - 1])
            warnings.warn(f"prompt truncated to the text encoder's {limit} tokens: {prompt!r} is read as {kept!r}")
    return tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")


def check_classes_read_apart(tokenizer: CLIPTokenizer, keys: list[str], prompts: list[str], longer: str = "") -> None:
    """Refuse two classes whose prompts the tokenizer reads as the same ids: after its normalisation (Unicode
    NFC, lowercase) and truncation to its max length, the text encoder could not tell them apart, and the
    classes would merge silently. `longer`: the key that lengthens the tokenizer, if this run can."""
    if len(prompts) < 2:  # a caption dataset has no class prompts; one class has nothing to merge with
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is what is checked here, and named below
        readings = tokenize(tokenizer, prompts).input_ids.tolist()
    first: dict[tuple[int, ...], int] = {}
    for k, reading in enumerate(map(tuple, readings)):
        if reading not in first:
            first[reading] = k
            continue
        j, limit = first[reading], tokenizer.model_max_length
        cut = len(tokenizer(prompts[k], verbose=False).input_ids) > limit
        how = f"cut to its {limit} tokens" if cut else "normalised (Unicode NFC, lowercase)"
        fix = (f"{f'Raise {longer}, or s' if longer else 'S'}horten the class names or the templates (data.captions) so "
               f"that they differ within the first {limit} tokens" if cut else "Rename one of the class folders, or merge them")
        shown = repr if cut else ascii  # prompts that differ only in Unicode normalisation print alike
        raise DatasetError(f"classes '{keys[j]}' and '{keys[k]}' would be merged: the tokenizer reads their prompts "
                           f"{shown(prompts[j])} and {shown(prompts[k])}, {how}, as the same text "
                           f"{tokenizer.decode(reading, skip_special_tokens=True)!r}. {fix}")


@torch.no_grad()
def encode_text(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str],
                batch_size: int = 256) -> torch.Tensor:
    """Token states the UNet cross-attends to: (N,) prompts -> (N, L, D) `last_hidden_state`."""
    device = text_encoder.device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    states = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenize(tokenizer, prompts[start:start + batch_size])
        mask = inputs.attention_mask.to(device) if use_mask else None
        states.append(text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0])
    return torch.cat(states)


@torch.no_grad()
def prompt_separation(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> dict[str, float]:
    """How far each prompt's token states lie from the empty prompt's, as a fraction of the median distance
    between two of the prompts: {prompt: fraction}. Near 0, the UNet (which cross-attends to these
    states, and is guided away from the empty prompt's) cannot tell the prompt from no prompt at all."""
    states = encode_text(tokenizer, text_encoder, list(prompts) + [""]).flatten(1).float()  # (N + 1, L * D)
    between = torch.cdist(states[:-1], states[:-1])
    typical = between[~torch.eye(len(prompts), dtype=torch.bool, device=between.device)].median()
    if typical == 0:  # every prompt reads alike: none can be told from another, or from no prompt
        return dict.fromkeys(prompts, 0.0)
    to_empty = (states[:-1] - states[-1]).norm(dim=1) / typical
    return dict(zip(prompts, to_empty.tolist()))


# Below this fraction of the typical distance between two class prompts, a class prompt is read as the
# empty prompt: the run that showed it (0.03) drew random digits for "Draw a eight" at any guidance.
MIN_PROMPT_SEPARATION = 0.1


def check_prompts_apart(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str], source: str) -> None:
    """Refuse a text encoder that reads a class prompt like the empty prompt, before training on it: the
    model would learn that class as unconditional, and guidance could never draw it (merged classes)."""
    if len(prompts) < 2:
        return
    separation = prompt_separation(tokenizer, text_encoder, prompts)
    merged = {prompt: value for prompt, value in separation.items() if value < MIN_PROMPT_SEPARATION}
    if len(merged) == len(prompts) and not any(merged.values()):
        raise UserError(f"the text encoder {source} reads every class prompt alike, so the UNet could not tell the "
                        f"classes apart. Retrain it with train-clip, or set text_encoder.pretrained to another CLIP")
    if merged:
        listed = ", ".join(f"'{prompt}' ({value:.3f})" for prompt, value in merged.items())
        raise UserError(f"the text encoder {source} reads {listed} almost like the empty prompt (distance to it, as a "
                        f"fraction of the typical distance between two class prompts, under {MIN_PROMPT_SEPARATION}), "
                        f"so classifier-free guidance could not draw {'that class' if len(merged) == 1 else 'those classes'}. "
                        f"Retrain it with train-clip (which keeps every caption apart from the empty prompt), or set "
                        f"text_encoder.pretrained to another CLIP")
