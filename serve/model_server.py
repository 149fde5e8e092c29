"""The model deployment: one UniLIP per replica, loaded in its constructor, requests batched.

Serve routes nothing to a replica before its constructor returns, so a replica added by the
autoscaler or replacing one on a lost node never answers before its model is loaded. A
model that fails to load leaves the replica up to report why (`status`), and its failing
health check has Serve replace it.

Generation and editing requests that arrive together are run as one model call per
(task, guidance, steps) group; the sampler computes each call's conditional and
unconditional (CFG) halves in the same forward pass. Every image has its own seed, so a
request's images do not depend on what else was in its batch.
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
from itertools import groupby

from ray import serve

from unilip.errors import UserError


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@serve.deployment
class UniLIPModel:
    def __init__(
        self, model_uri: str, max_batch_size: int = 4, batch_wait_timeout_s: float = 0.05, dtype: str = "auto"
    ):
        self.model_uri, self.dtype, self.model, self.error = model_uri, dtype, None, None
        self.images.set_max_batch_size(max_batch_size)
        self.images.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._load()

    def _load(self) -> None:
        try:
            import torch

            from cluster.registry import load_model

            torch.set_grad_enabled(False)
            # bf16 on a GPU, fp32 on a CPU, unless the application's `dtype` says otherwise
            self.model = load_model(self.model_uri, dtype=self.dtype)
        except Exception as e:  # reported by status(); the replica stays up to say why
            self.error = f"{type(e).__name__}: {e}"
            if not isinstance(e, UserError):  # a bug of ours: its traceback in the replica's log
                logging.getLogger("ray.serve").exception("the model failed to load")

    def _ready_model(self):
        if self.model is None:
            raise RuntimeError(f"model failed to load: {self.error}")
        return self.model

    def status(self) -> dict:
        from unilip.presets import dit_pos_embed_of

        loaded = self.model is not None
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.") if loaded else None
        pos_embed = dit_pos_embed_of(self.model.generator.dit) if loaded else None  # what the built DiT adds
        return {
            "ready": loaded,
            "error": self.error,
            "model": self.model_uri,
            "dtype": dtype,
            "dit_pos_embed": pos_embed,
        }

    def check_health(self) -> None:
        self._ready_model()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def images(self, requests: list[dict]) -> list[dict]:
        """Each request: task (generation|editing), prompt, n, guidance_scale, steps, seed,
        image (PIL, editing). Returns {"images": [PNG bytes]} or {"error": message}."""
        return await asyncio.to_thread(self._run_images, requests)

    def _run_images(self, requests: list[dict]) -> list[dict]:
        model = self._ready_model()
        results: list[dict | None] = [None] * len(requests)
        jobs = []
        for i, r in enumerate(requests):
            try:
                model.check_prompts([r["prompt"]])
            except UserError as e:
                results[i] = {"error": str(e)}
                continue
            seed = r["seed"] if r["seed"] is not None else random.randrange(2**31)
            jobs.append((i, r, [seed + k for k in range(r["n"])]))
        key = lambda job: (job[1]["task"], job[1]["guidance_scale"], job[1]["steps"])  # noqa: E731
        for (task, guidance, steps), group in groupby(sorted(jobs, key=key), key=key):
            group = list(group)
            prompts = [r["prompt"] for _, r, seeds in group for _ in seeds]
            seeds = [s for _, _, seeds in group for s in seeds]
            sampling = dict(guidance_scale=guidance, steps=steps, seed=seeds)
            if task == "editing":
                out = model.edit([r["image"] for _, r, s in group for _ in s], prompts, **sampling)
            else:
                out = model.generate(prompts, **sampling)
            for i, _, s in group:
                results[i] = {"images": [png(im) for im in out[: len(s)]]}
                out = out[len(s) :]
        return results

    async def reconstruct(self, image) -> bytes:
        return png((await asyncio.to_thread(self._ready_model().reconstruct, [image]))[0])

    async def understand(self, image, question: str, max_tokens: int) -> str:
        return await asyncio.to_thread(self._ready_model().understand, image, question, max_tokens)
