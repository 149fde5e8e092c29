"""`unilip recipe list|show`: the training recipes (`jobs/training/recipes/*.yaml`)."""

from __future__ import annotations

from cli.options import overrides


def add(sub) -> None:
    p = sub.add_parser("recipe", help="training recipes: list them, show one with overrides")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", help="recipe name or YAML path (for show)")
    overrides(p, "a field, e.g. train.lr=2e-4")
    p.set_defaults(func=recipe)


def recipe(args) -> int:
    import yaml

    from jobs.training.recipes import load_recipe, recipe_names
    from unilip.config import to_dict
    from unilip.errors import UserError

    if args.action == "list":
        for name in recipe_names():
            print(f"{name:<18} {load_recipe(name).description}")
        return 0
    if not args.name:
        raise UserError("recipe show needs a recipe name")
    print(yaml.safe_dump(to_dict(load_recipe(args.name, args.set)), sort_keys=False), end="")
    return 0
