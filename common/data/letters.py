"""The built-in `letters` source: A-Z, a-z and 0-9 rendered from six handwriting fonts, EMNIST-style.

Each image is one glyph, white on black, centred and scaled to fill its box like EMNIST, drawn with a
hand's variation (`glyph_render`: stroke width, slant, rotation, size, elastic distortion). The fonts
take turns within each class, and every image of one font, `data.holdout_font` (default: the last,
Indie Flower), is the held-out split: a hand the model never trains on, for `evaluate` to measure
generalisation across hands. The font of each image is recorded (`Listing.fonts`). Print fonts
(`PRINT_FONTS`) are rendered on demand for evaluate's classifier only (`Listing.print_fonts`).

The classes own their caption fields: a capital says "capital" and a small letter "small" in its
first caption, so they stay apart after CLIP's lowercasing tokenizer ("Write a capital A", "Write a
small a"); `symbol` is the character (what `write()` spells with) and `name` a readable name.
"""

from __future__ import annotations

import string

import numpy as np

from common.config import DataConfig
from common.data.glyph_render import GlyphSet, Hand, Jitter, cache_path, fontpkg_hands, held_out_hand, render_classes
from common.data.listing import ImageClass, Listing

RENDER_VERSION = 1  # bump when the renderer changes, so cached renders are not reused

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CLASS_FIELDS = {
    **{f"capital_{c}": {"symbol": c, "name": f"capital {c}", "letter": c, "case": "capital", "casing": "uppercase",
                        "uppercase": c, "kind": "letter"} for c in string.ascii_uppercase},
    **{f"small_{c}": {"symbol": c, "name": f"small {c}", "letter": c, "case": "small", "casing": "lowercase",
                      "lowercase": c, "kind": "letter"} for c in string.ascii_lowercase},
    **{f"digit_{d}": {"symbol": str(d), "name": DIGIT_WORDS[d], "digit": DIGIT_WORDS[d], "numeral": str(d),
                      "kind": "digit"} for d in range(10)},
}
for _letter in "cosvwxz":  # one shape in both cases once centred and scaled: recognition counts them as one
    CLASS_FIELDS[f"capital_{_letter.upper()}"]["shape"] = CLASS_FIELDS[f"small_{_letter}"]["shape"] = _letter
KEYS = list(CLASS_FIELDS)  # A-Z, a-z, 0-9

# The first template that fits a class is its prompt. No template shows a letter without its case:
# "A" and "a" are the same text to a lowercasing tokenizer.
CAPTIONS = [
    "Write a {case} {letter}", "Write the digit {digit}", "a {case} letter {letter}", "the {case} letter {letter}",
    "an uppercase {uppercase}", "a lowercase {lowercase}", "a handwritten {case} {letter}", "Draw a {case} {letter}",
    "{name}", "the digit {numeral}", "the number {digit}", "a handwritten {numeral}", "{numeral}",
]

# Latin handwriting. Caveat and Dancing Script are variable fonts (wght 400-700); Kalam ships three
# weights. Permanent Marker's lowercase letters are small capitals, so it draws only capitals and digits
# (why_not_drawn finds it). Every font draws every capital and digit; the held-out one draws every class.
HANDS = (
    Hand("caveat", "fontpkg_caveat", tuple((w,) for w in (400.0, 475.0, 550.0, 625.0, 700.0))),
    Hand("kalam", "fontpkg_kalam"),
    Hand("shadows-into-light", "fontpkg_shadows_into_light"),
    Hand("dancing-script", "fontpkg_dancing_script", tuple((w,) for w in (400.0, 500.0, 600.0, 700.0))),
    Hand("permanent-marker", "fontpkg_permanent_marker"),
    Hand("indie-flower", "fontpkg_indie_flower"),
)
# Print fonts, for evaluate's classifier only (never the model): with the held-out hand they teach it what
# a letter is beyond one hand's way of writing it. DejaVu, STIX and Computer Modern ship inside
# matplotlib; the rest are fontpkgs (Google Fonts families: casual and script hands, rounded, sans,
# serif and monospaced faces). Measured (a classifier tested on the five training hands' renders; BENCHMARKS.md):
# the held-out hand alone reads 39% of them; with the eight matplotlib/Hind/Mukta fonts, 120 renders per
# class and 1,200 steps, 71%; with every font below (and Luckiest Guy, since dropped: its small letters
# are capitals), 360 per class, 79%, and 3,000 steps, 81% (80.2% in evaluate).
_MPL = "mpl-data/fonts/ttf/"


def _matplotlib_fonts(name: str, *files: str) -> Hand:
    return Hand(name, "matplotlib", paths=tuple(_MPL + f for f in files))


PRINT_FONTS = (
    _matplotlib_fonts("dejavu-sans", "DejaVuSans.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf"),
    _matplotlib_fonts("dejavu-serif", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf"),
    _matplotlib_fonts("stix", "STIXGeneral.ttf", "STIXGeneralItalic.ttf"),
    *fontpkg_hands("hind mukta"),
    _matplotlib_fonts("dejavu-bold-and-oblique", "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono-Oblique.ttf",
                      "DejaVuSerif-Bold.ttf", "DejaVuSerif-BoldItalic.ttf"),
    _matplotlib_fonts("stix-bold", "STIXGeneralBol.ttf", "STIXGeneralBolIta.ttf"),
    _matplotlib_fonts("computer-modern", "cmr10.ttf", "cmss10.ttf", "cmti10.ttf", "cmb10.ttf", "cmtt10.ttf"),
    *fontpkg_hands("delius great-vibes lobster lobster-two oleo-script pacifico satisfy yellowtail zeyada"),  # casual, script
    *fontpkg_hands("atkinson-hyperlegible comfortaa fredoka quicksand varela-round nunito baloo-2 rowdies righteous acme"),
    *fontpkg_hands("poppins roboto open-sans lato montserrat raleway josefin-sans lexend fira-sans source-sans-3 work-sans "
               "karla ibm-plex-sans noto-sans pt-sans exo-2 titillium-web oswald dosis cabin rubik kanit"),
    *fontpkg_hands("merriweather lora eb-garamond playfair-display crimson-text libre-baskerville bitter arvo zilla-slab "
               "roboto-slab ibm-plex-serif noto-serif pt-serif"),
    *fontpkg_hands("fira-code jetbrains-mono space-mono ibm-plex-mono source-code-pro inconsolata"),
)
PRINT_PER_CLASS = 360
JITTER = Jitter(fill=(0.70, 0.86), stretch=0.1, rotate=8.0, shear=0.15, shift=0.04, strokes=(-1, 0, 0, 1, 2))
GLYPHS = GlyphSet("letters", RENDER_VERSION, tuple(f["symbol"] for f in CLASS_FIELDS.values()), HANDS, JITTER,
                  lookalikes=tuple(f.get("lowercase", "").upper() for f in CLASS_FIELDS.values()))  # "a" must not be drawn as "A"
PRINTED = GlyphSet("letters-print", RENDER_VERSION, GLYPHS.texts, PRINT_FONTS, JITTER)


def class_fields(key: str) -> dict | None:
    """Caption fields of a class key ("capital_A", "small_a", "digit_7"), or None for any other key."""
    fields = CLASS_FIELDS.get(key)
    return dict(fields) if fields is not None else None


def render_dataset(per_class: int, seed: int = 0, processes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 62 classes, `per_class` images each, in class order: pixels (62 * per_class, 32, 32) uint8 and
    the index into HANDS of the font that drew each image. Deterministic in (per_class, seed); cached."""
    return render_classes(GLYPHS, per_class, seed, processes)


def render_print_fonts(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PRINT_PER_CLASS renders of every class in the print fonts, the fonts taking turns: pixels
    (62 * PRINT_PER_CLASS, 32, 32) uint8 and their class labels. Deterministic in the seed; cached."""
    pixels, _ = render_classes(PRINTED, PRINT_PER_CLASS, seed)
    return pixels, np.repeat(np.arange(len(KEYS)), PRINT_PER_CLASS)


def list_letters(config: DataConfig) -> Listing:
    """Rendered letters and digits; every image of the held-out font (`data.holdout_font`, default the
    last of HANDS) is the held-out split, whatever data.holdout_fraction says."""
    holdout_font = config.holdout_font or HANDS[-1].name
    held = held_out_hand(GLYPHS, holdout_font)
    pixels, hands = render_dataset(config.per_class, config.seed)
    labels = np.repeat(np.arange(len(KEYS)), config.per_class).tolist()
    classes = [ImageClass(key, class_fields(key)) for key in KEYS]
    identity = (f"letters:v{RENDER_VERSION}:{config.per_class}:{config.seed}:"
                f"{cache_path(GLYPHS, config.per_class, config.seed).stem}:holdout_font={holdout_font}")
    return Listing(list(range(len(labels))), labels, [bool(h == held) for h in hands], classes, CAPTIONS,
                   pixels=pixels, identity=identity, fonts=[HANDS[h].name for h in hands],
                   print_fonts=lambda: render_print_fonts(config.seed))
