"""The 46 classes of the Devanagari Handwritten Character Dataset (Acharya et al. 2015).

Folder names are the dataset's own (`character_1_ka` ... `character_36_gya`, `digit_0` ... `digit_9`);
each class gets caption fields: a readable romanized `name`, its Devanagari `symbol`, its `kind`, and
`letter` or `digit` (so a template like "Draw the letter {letter}" only applies to letters).
"""

from __future__ import annotations

# (folder name, romanized name, Devanagari); the last three are conjuncts that need shaping.
CONSONANTS = [
    ("character_1_ka", "ka", "क"), ("character_2_kha", "kha", "ख"), ("character_3_ga", "ga", "ग"),
    ("character_4_gha", "gha", "घ"), ("character_5_kna", "nga", "ङ"), ("character_6_cha", "cha", "च"),
    ("character_7_chha", "chha", "छ"), ("character_8_ja", "ja", "ज"), ("character_9_jha", "jha", "झ"),
    ("character_10_yna", "nya", "ञ"), ("character_11_taamatar", "tta", "ट"), ("character_12_thaa", "ttha", "ठ"),
    ("character_13_daa", "dda", "ड"), ("character_14_dhaa", "ddha", "ढ"), ("character_15_adna", "nna", "ण"),
    ("character_16_tabala", "ta", "त"), ("character_17_tha", "tha", "थ"), ("character_18_da", "da", "द"),
    ("character_19_dha", "dha", "ध"), ("character_20_na", "na", "न"), ("character_21_pa", "pa", "प"),
    ("character_22_pha", "pha", "फ"), ("character_23_ba", "ba", "ब"), ("character_24_bha", "bha", "भ"),
    ("character_25_ma", "ma", "म"), ("character_26_yaw", "ya", "य"), ("character_27_ra", "ra", "र"),
    ("character_28_la", "la", "ल"), ("character_29_waw", "va", "व"), ("character_30_motosaw", "sha", "श"),
    ("character_31_petchiryakha", "ssa", "ष"), ("character_32_patalosaw", "sa", "स"), ("character_33_ha", "ha", "ह"),
    ("character_34_chhya", "ksha", "क्ष"), ("character_35_tra", "tra", "त्र"), ("character_36_gya", "gya", "ज्ञ"),
]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS = [(f"digit_{d}", DIGIT_WORDS[d], "०१२३४५६७८९"[d]) for d in range(10)]

CLASS_FIELDS = {
    **{folder: {"name": name, "symbol": symbol, "kind": "letter", "letter": name, "alias": folder.split("_", 2)[2]}
       for folder, name, symbol in CONSONANTS},
    **{folder: {"name": name, "symbol": symbol, "kind": "digit", "digit": name, "alias": folder.split("_")[1]}
       for folder, name, symbol in DIGITS},
}


def devanagari_class_fields(folder: str) -> dict | None:
    """Caption fields for a folder name of the Devanagari dataset, or None for any other name."""
    fields = CLASS_FIELDS.get(folder)
    return dict(fields) if fields is not None else None
