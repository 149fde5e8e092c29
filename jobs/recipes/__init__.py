"""Training recipes: one YAML file per stage in this directory, loaded as `Recipe`."""

from pathlib import Path

from unilip.config import ConfigError, Recipe, load_yaml

RECIPE_DIR = Path(__file__).parent


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """A recipe by name (`recon-stage1`) or YAML path, with `key=value` overrides."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown recipe {name_or_path!r}; available: {', '.join(recipe_names())}")
    return load_yaml(Recipe, path, overrides)
