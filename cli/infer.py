"""`unilip generate|edit|reconstruct|understand`: one model, in this process."""

from __future__ import annotations

from cli.options import MODEL, inference


def add(sub) -> None:
    for name, text in (("generate", "text -> images"), ("edit", "image + instruction -> edited image")):
        p = sub.add_parser(name, help=f"{text} (PNG files)")
        p.add_argument("--model", required=True, help=MODEL)
        p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
        if name == "edit":
            p.add_argument("--image", action="append", required=True, help="reference image (repeatable)")
        else:
            p.add_argument("--n", type=int, default=1, help="images per prompt")
        p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 4.5)")
        p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
        p.add_argument("--solver", choices=["euler", "dpm"], default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--out", default="outputs", help="output directory")
        inference(p)
        p.set_defaults(func=generate)

    p = sub.add_parser("reconstruct", help="image -> UniLIP features -> pixels (PNG files)")
    p.add_argument("--model", required=True, help=MODEL)
    p.add_argument("--image", action="append", required=True)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--out", default="outputs")
    inference(p)
    p.set_defaults(func=reconstruct)

    p = sub.add_parser("understand", help="answer a question about an image (InternVL3 with the UniLIP encoder)")
    p.add_argument("--model", required=True, help=MODEL)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    inference(p)
    p.set_defaults(func=understand)


def load_model(args):
    from cluster.registry import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def open_images(paths: list[str]):
    """Image files, read and decoded as any untrusted image (`unilip.images`)."""
    from unilip.errors import UserError
    from unilip.images import ImageError, read_image

    images = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                images.append(read_image(f.read()))
        except (OSError, ImageError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
    return images


def write_images(images, out: str, stem: str) -> None:
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = Path(out) / f"{stem}-{i:02d}.png"
        image.save(path)
        print(path)


def generate(args) -> int:
    from unilip.errors import UserError

    model = load_model(args)
    sampling = dict(guidance_scale=args.guidance, steps=args.steps, seed=args.seed, solver=args.solver)
    if args.command == "generate":
        images = model.generate(args.prompt * args.n, **sampling)
    else:
        references = open_images(args.image)
        if len(args.prompt) not in (1, len(references)):
            raise UserError(f"give one instruction, or one per image ({len(references)})")
        prompts = args.prompt * len(references) if len(args.prompt) == 1 else args.prompt
        images = model.edit(references, prompts, **sampling)
    write_images(images, args.out, args.command)
    return 0


def reconstruct(args) -> int:
    write_images(load_model(args).reconstruct(open_images(args.image), args.size), args.out, "reconstruction")
    return 0


def understand(args) -> int:
    print(load_model(args).understand(open_images([args.image])[0], args.question, args.max_new_tokens))
    return 0
