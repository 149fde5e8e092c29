"""Training recipes: one YAML file per stage in this directory, loaded as `Recipe`.

A recipe may carry `variants`: partial recipes merged over it by name. Every recipe has
`tiny`, the CPU-sized version (the tiny preset, the sample dataset, a few steps).
"""

from pathlib import Path

from unilip.config import ConfigError, Recipe, apply_overrides, from_dict, read_yaml

RECIPE_DIR = Path(__file__).parent


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def merge(base: dict, over: dict) -> dict:
    """Deep-merge mappings; lists and scalars in `over` replace those in `base`."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(name_or_path: str, overrides: list[str] | None = None, variant: str | None = None) -> Recipe:
    """A recipe by name (`recon-stage1`) or YAML path, with a variant merged in, then overrides."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown recipe {name_or_path!r}; available: {', '.join(recipe_names())}")
    data = read_yaml(path)
    if variant is not None:
        variants = data.get("variants") or {}
        if variant not in variants:
            raise ConfigError(
                f"recipe {data.get('name', path.stem)!r} has no variant {variant!r}; it has: {', '.join(variants) or 'none'}"
            )
        data = merge(data, variants[variant])
    return apply_overrides(from_dict(Recipe, data), overrides or [])


def chain() -> list[str]:
    """Every recipe in training order (each after the one it starts from)."""
    recipes = {n: load_recipe(n) for n in recipe_names()}
    order, done = [], set()
    while len(order) < len(recipes):
        ready = [n for n, r in sorted(recipes.items()) if n not in done and (r.after is None or r.after in done)]
        if not ready:
            raise ConfigError(f"recipes {sorted(set(recipes) - done)} form a cycle or follow an unknown recipe")
        nxt = min(ready, key=lambda n: (recipes[n].kind != "reconstruction", n))
        order.append(nxt)
        done.add(nxt)
    return order
