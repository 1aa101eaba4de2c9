"""Each quantizer's recommended training recipe: what `hypervq-train-vqvae --recipe recommended` (the default) sets
beyond the paper's settings, which `--recipe paper` keeps. The quantizer classes themselves always keep the paper's
settings.

A recipe's settings are chosen on the validation split of the study (`study/grid.py`, `study/ablate.py`), never on
its test split, by the rule docs/study.md states: a setting enters a recipe only if its gain is beyond the noise and
every loss (MSE, accuracy, silhouette) is within its declared margin. Until the study's runs decide, a quantizer's
recipe is the paper's settings (an empty dict). The study runs each recipe as its own row, so the report shows
"paper settings" and "recommended recipe" side by side, and a model's card says which one it was trained with.
"""

# quantizer -> {train_vqvae flag (without the dashes): value}; every flag here has default None in train_vqvae, so a
# value the user gives on the command line always wins
RECIPES: dict[str, dict] = {
    "hyperbolic": {},
    "kmeans": {},
    "gumbel": {},
    "hyperbolic_kmeans": {},
    "hyperbolic_embedding": {},
}
# The flags a recipe may set, with the value `--recipe paper` gives them (the paper's).
PAPER_SETTINGS = {"diversity_weight": 0.0}


def recipe_settings(quantizer: str, recipe: str) -> dict:
    """The flag values `recipe` ("recommended" or "paper") gives `quantizer`, for every flag of `PAPER_SETTINGS`."""
    if recipe not in ("recommended", "paper"):
        raise ValueError(f"recipe must be 'recommended' or 'paper', got {recipe!r}")
    return {**PAPER_SETTINGS, **(RECIPES[quantizer] if recipe == "recommended" else {})}


def describe(quantizer: str, recipe: str) -> str:
    """One line for a card and a log: which recipe, and what it sets beyond the paper."""
    extra = {k: v for k, v in recipe_settings(quantizer, recipe).items() if PAPER_SETTINGS.get(k) != v}
    if recipe == "paper":
        return "the paper's settings (`--recipe paper`)"
    if not extra:
        return "the recommended recipe (`--recipe recommended`), for this quantizer the paper's settings"
    settings = ", ".join(f"`--{k} {v}`" for k, v in extra.items())
    return f"the recommended recipe (`--recipe recommended`): the paper's settings with {settings}"
