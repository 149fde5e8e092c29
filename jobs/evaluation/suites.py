"""The paper's benchmarks: what each official scorer reads, and its published aggregation.

    from jobs.evaluation.suites import benchmark
    bench = benchmark("geneval")               # geneval | wise | wise-verified | imgedit | dpg
    items = bench.items(bench.locate(PATH), n=4, seed=42)
    problems = bench.check(OUT, files)         # the layout as the scorer reads it
    scores = bench.summarize(OUT, files)       # the scorer's outputs -> the published formula

Per benchmark (the official repositories at the commits pinned below):

| bench | prompt files (`--bench`) | layout under OUT | images | scorer, aggregation |
|---|---|---|---|---|
| geneval | `evaluation_metadata.jsonl` (shipped, MIT) | `geneval/<i:05d>/metadata.jsonl` (the prompt's line), `samples/<k:05d>.png` | 553 x 4 | `evaluation/evaluate_images.py` (Mask2Former + CLIP, offline); overall = mean of the 6 tag means |
| wise | a WISE checkout: `WISE_legacy/data/*.json` (the paper's protocol) | `wise/<prompt_id>.png` | 1000 x 1 | `WISE_legacy/gpt_eval.py` (GPT-4o-2024-05-13); WiScore (0.7 C + 0.2 R + 0.1 A) / 2, overall 0.4/0.167/0.133/0.1/0.1/0.1 |
| wise-verified | a WISE checkout: `data_verified/merge.json` (the current version) | `wise-verified/<prompt_id>.png` | 1000 x 1 | `vllm_eval.py` (Qwen3.5-35B-A3B); binary, overall 0.4 + 5 x 0.12 |
| imgedit | `basic_edit.json` + the extracted Benchmark images | `imgedit/<key>.png` | 737 x 1 | `Benchmark/Basic/basic_bench.py` (GPT-4o); per-edit mean of 3 scores, per-type means, overall = mean of the 9 type means |
| dpg | an ELLA checkout: `dpg_bench/prompts/*.txt` | `dpg/<key>.png`: a 2x2 grid of 448 px samples (tiles in `dpg.tiles/`) | 1065 x 4 | `dpg_bench/compute_dpg_bench.py` (mPLUG, offline); DPG = 100 x mean over images |

Seeds: image k of every prompt has seed `seed + k` (the papers re-seed 42 before each
prompt), drawn per image, so an image does not depend on the batch or the GPU count.
Prompt files are checked against their pinned sha256 (`--allow-unpinned` to use others).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unilip.errors import UserError

SUITE_FILES = Path(__file__).with_name("suite_files")
RESOLUTION = 448


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Item:
    """One image to produce."""

    key: str  # the benchmark's id for the prompt
    k: int  # the image's index among the prompt's images
    task: str  # generation | editing
    prompt: str
    seed: int
    path: str  # where it goes, relative to OUT
    ref: str | None = None  # editing: the reference image


class BenchError(UserError):
    """A benchmark's files or options that cannot work."""


class Output:
    """OUT: a local directory or an s3:// prefix. Writes are atomic (a killed run leaves no
    partial image to be taken for a finished one)."""

    def __init__(self, root: str | Path, s3=None):
        from unilip.s3 import is_s3, s3_access

        root = str(root).rstrip("/")
        self.root = root if is_s3(root) else str(Path(root))
        self.s3 = s3 or s3_access()

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def keys(self) -> set[str]:
        """Every file under OUT, relative to it."""
        return {u[len(self.root) + 1 :] for u in self.s3.list_files(self.root)}

    def exists(self, rel: str) -> bool:
        return self.s3.exists(self.uri(rel))

    def write(self, rel: str, data: bytes) -> None:
        self.s3.write_bytes(self.uri(rel), data)

    def read(self, rel: str) -> bytes:
        return self.s3.read_bytes(self.uri(rel))


class Benchmark:
    name: str
    images_per_prompt: int = 1
    pinned: dict[str, str] = {}  # bench file (relative) -> sha256 at the pinned commit
    source: str = ""  # the official repository and commit

    def locate(self, path: str | None) -> dict[str, Path]:
        """The bench files under `path` (a checkout, a directory or the file itself)."""
        if path is None:
            raise BenchError(f"{self.name} needs --bench: {self.bench_help}")
        root = Path(path)
        if root.is_file() and len(self.pinned) == 1:  # the bench's one file itself, under any name
            return {next(iter(self.pinned)): root}
        found = {}
        for rel in self.pinned:
            for candidate in (root / rel, root / Path(rel).name, root):
                if candidate.is_file() and candidate.name == Path(rel).name:
                    found[rel] = candidate
                    break
            else:
                raise BenchError(f"{self.name}: {rel} not found under {root} ({self.bench_help})")
        return found

    def verify(self, files: dict[str, Path], allow_unpinned: bool = False) -> dict[str, str]:
        """sha256 of each bench file; a file that is not the pinned one is refused unless allowed."""
        hashes = {rel: sha256(p) for rel, p in files.items()}
        for rel, digest in hashes.items():
            if digest != self.pinned[rel] and not allow_unpinned:
                raise BenchError(
                    f"{files[rel]}: sha256 {digest[:12]}..., the pinned {self.source} file has {self.pinned[rel][:12]}... "
                    "(another version of the benchmark; --allow-unpinned to use it anyway)"
                )
        return hashes

    bench_help = ""

    def items(self, files: dict[str, Path], n: int | None = None, seed: int = 42) -> list[Item]:
        raise NotImplementedError

    def finalize(self, out: Output, files: dict[str, Path], items: list[Item]) -> None:
        """Whatever the scorer reads besides the images (GenEval's metadata, DPG's grids)."""

    def check(self, out: Path, files: dict[str, Path], n: int | None = None) -> list[str]:
        raise NotImplementedError

    def summarize(self, out: Path, files: dict[str, Path]) -> dict[str, float]:
        raise NotImplementedError

    def results(self, out: Path, name: str) -> Path:
        """The scorer's results file under OUT, or an error that says how to make it."""
        path = out / name
        if not path.exists():
            raise BenchError(
                f"{path} missing: run the {self.name} scorer first (`unilip eval {self.name} --score`, or the commands it prints)"
            )
        return path

    def score_commands(self, out: Path, files: dict[str, Path]) -> list[str]:
        raise NotImplementedError

    def score_argv(
        self, out: Path, files: dict[str, Path], repo: Path, python: str, options: dict
    ) -> tuple[list[str], Path] | None:
        """The official scorer's command line and working directory, for scorers that run
        offline (GenEval, DPG); None for those that need an API key (their commands are printed)."""
        return None


def _pngs(folder: Path, pattern: str) -> set[str]:
    return (
        {p.name for p in folder.iterdir() if p.is_file() and re.fullmatch(pattern, p.name)}
        if folder.is_dir()
        else set()
    )


# ------------------------------------------------------------------------- GenEval


class GenEval(Benchmark):
    name, images_per_prompt = "geneval", 4
    pinned = {"prompts/evaluation_metadata.jsonl": "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"}
    source = "djghosh13/geneval@af4902f"
    bench_help = (
        "a geneval checkout or its prompts/evaluation_metadata.jsonl (default: the copy shipped with the project)"
    )

    def locate(self, path):
        if path is None:
            return {"prompts/evaluation_metadata.jsonl": SUITE_FILES / "geneval_evaluation_metadata.jsonl"}
        return super().locate(path)

    def lines(self, files) -> list[str]:
        return [line for line in files["prompts/evaluation_metadata.jsonl"].read_text().splitlines() if line.strip()]

    def items(self, files, n=None, seed=42):
        n = n or self.images_per_prompt
        return [
            Item(
                f"{i:05d}",
                k,
                "generation",
                json.loads(line)["prompt"],
                seed + k,
                f"geneval/{i:05d}/samples/{k:05d}.png",
            )
            for i, line in enumerate(self.lines(files))
            for k in range(n)
        ]

    def finalize(self, out, files, items):
        lines = self.lines(files)
        for key in sorted({it.key for it in items}):  # one JSON object: the scorer json.load()s it
            out.write(f"geneval/{key}/metadata.jsonl", (lines[int(key)] + "\n").encode())

    def check(self, out, files, n=None):
        # evaluate_images.py: digit folders, json.load(metadata.jsonl), samples/\d+\.png
        n, problems, root = n or self.images_per_prompt, [], out / "geneval"
        lines = self.lines(files)
        for i, line in enumerate(lines):
            folder = root / f"{i:05d}"
            try:
                meta = json.loads((folder / "metadata.jsonl").read_text())
            except (OSError, json.JSONDecodeError) as e:
                problems.append(f"{folder.name}/metadata.jsonl: {e}")
                continue
            if meta != json.loads(line):
                problems.append(f"{folder.name}/metadata.jsonl is not prompt {i}'s line")
            samples = _pngs(folder / "samples", r"\d+\.png")
            if len(samples) != n:
                problems.append(f"{folder.name}/samples: {len(samples)} images, expected {n}")
        extra = (
            [p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) >= len(lines)]
            if root.is_dir()
            else []
        )
        problems += [f"{e}: a folder for no prompt" for e in extra]
        return problems

    def summarize(self, out, files):
        # summary_scores.py: per-tag mean of `correct`, overall = the mean of the tag means
        path = self.results(out, "geneval.results.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        tags: dict[str, list[float]] = {}
        for row in rows:
            tags.setdefault(row["tag"], []).append(float(row["correct"]))
        scores = {f"geneval/{tag}": float(np.mean(v)) for tag, v in tags.items()}
        scores["geneval/overall"] = float(np.mean([np.mean(v) for v in tags.values()]))
        scores["geneval/images"] = float(len(rows))
        return scores

    def score_argv(self, out, files, repo, python, options):
        if not options.get("detector_dir"):
            raise BenchError(
                "geneval --score needs --detector-dir: the folder holding mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"
            )
        return [
            python,
            str(repo / "evaluation" / "evaluate_images.py"),
            str(out / "geneval"),
            "--outfile",
            str(out / "geneval.results.jsonl"),
            "--model-path",
            str(options["detector_dir"]),
        ], repo

    def score_commands(self, out, files):
        return [
            f"python $GENEVAL/evaluation/evaluate_images.py {out / 'geneval'} --outfile {out / 'geneval.results.jsonl'} --model-path $DETECTOR_DIR",
            f"python $GENEVAL/evaluation/summary_scores.py {out / 'geneval.results.jsonl'}",
        ]


# ---------------------------------------------------------------------------- WISE


WISE_CATEGORIES = ("CULTURE", "TIME", "SPACE", "BIOLOGY", "PHYSICS", "CHEMISTRY")


def id_ranges(*last_ids: int) -> dict[str, tuple[int, int]]:
    """WISE's categories as prompt id ranges (inclusive), from the last id of each in order."""
    firsts = (1, *(last + 1 for last in last_ids[:-1]))
    return dict(zip(WISE_CATEGORIES, zip(firsts, last_ids)))


class Wise(Benchmark):
    """WISE in its legacy version, the paper's protocol (GPT-4o-2024-05-13, WiScore)."""

    name = "wise"
    pinned = {
        "WISE_legacy/data/cultural_common_sense.json": "7a59216c768698280cea37caa574b52f3faf054d73b398b9bb6b3161baf8e3aa",
        "WISE_legacy/data/spatio-temporal_reasoning.json": "e27d797885ad86e64d857d0cc93d33e04be572a8dcae95692a2c7e7876233f9a",
        "WISE_legacy/data/natural_science.json": "b262fae58e413c7a4bd3c3d5a089f8c6529feac227e4b6606be261a949035544",
    }
    source = "PKU-YuanGroup/WISE@eb51174"
    bench_help = "a WISE checkout (PKU-YuanGroup/WISE); its data has no licence, so none ships with the project"
    # Calculate.py: id ranges, and the overall weights
    categories = id_ranges(400, 567, 700, 800, 900, 1000)
    weights = {"CULTURE": 0.4, "TIME": 0.167, "SPACE": 0.133, "BIOLOGY": 0.1, "PHYSICS": 0.1, "CHEMISTRY": 0.1}
    results = "Results"  # where the scorer's *_scores_results.jsonl go, under the image folder

    def prompts(self, files) -> list[dict]:
        return [row for rel in self.pinned for row in json.loads(files[rel].read_text())]

    def items(self, files, n=None, seed=42):
        return [
            Item(str(r["prompt_id"]), 0, "generation", r["Prompt"], seed, f"{self.name}/{r['prompt_id']}.png")
            for r in self.prompts(files)
        ]

    def check(self, out, files, n=None):
        have = _pngs(out / self.name, r"\d+\.png")
        want = {f"{r['prompt_id']}.png" for r in self.prompts(files)}
        problems = [f"{self.name}/{name} missing" for name in sorted(want - have, key=lambda s: int(s[:-4]))]
        return problems + [f"{self.name}/{name}: no such prompt_id" for name in sorted(have - want)]

    def wiscore(self, row: dict) -> float:
        return (0.7 * row["consistency"] + 0.2 * row["realism"] + 0.1 * row["aesthetic_quality"]) / 2

    def summarize(self, out, files):
        folder = out / self.name / self.results
        paths = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        paths = [p for p in paths if "full" not in p.name]
        if not paths:
            raise BenchError(
                f"no scorer results (*.jsonl) under {folder}: run the judge first (the commands `unilip eval {self.name}` printed)"
            )
        per: dict[str, list[float]] = {c: [] for c in self.categories}
        seen = set()
        for path in paths:
            for line in path.read_text().splitlines():
                row = json.loads(line) if line.strip() else {}
                pid = row.get("prompt_id")
                if not isinstance(pid, int):
                    continue
                seen.add(pid)
                try:
                    score = self.wiscore(row)
                except (KeyError, TypeError):
                    continue  # the scorer skips rows whose scores are not numeric
                for category, (lo, hi) in self.categories.items():
                    if lo <= pid <= hi:
                        per[category].append(score)
        missing = sorted(set(range(1, 1001)) - seen)
        if missing:
            raise BenchError(
                f"{len(missing)} prompt_ids have no score (first {missing[:5]}): the overall needs all 1000, as the scorer's --category all"
            )
        scores = {f"{self.name}/{c.lower()}": float(np.mean(v)) for c, v in per.items()}
        scores[f"{self.name}/overall"] = sum(w * scores[f"{self.name}/{c.lower()}"] for c, w in self.weights.items())
        return scores

    def score_commands(self, out, files):
        images = out / self.name
        cmds = []
        for rel in self.pinned:
            stem = Path(rel).stem
            cmds.append(
                f"python $WISE/WISE_legacy/gpt_eval.py --json_path {files[rel]} --output_dir {images}/{self.results}/{stem} "
                f"--image_dir {images} --api_key $OPENAI_API_KEY --model gpt-4o-2024-05-13 "
                f"--result_full {images}/{self.results}/{stem}_full_results.json "
                f"--result_scores {images}/{self.results}/{stem}_scores_results.jsonl --max_workers 16"
            )
        return cmds + [f"unilip eval summarize {self.name} {out} --bench $WISE"]


class WiseVerified(Wise):
    """WISE_Verified, the repository's default since 2026-04 (Qwen3.5-35B-A3B judge, binary
    scores): other prompts and id ranges, a number not comparable with the paper's."""

    name = "wise-verified"
    pinned = {"data_verified/merge.json": "10f2690624ed8f03f21bd3e9c535e26f791da8bab67ac857903bede65985b82d"}
    categories = id_ranges(400, 520, 640, 760, 880, 1000)
    weights = {"CULTURE": 0.4, "TIME": 0.12, "SPACE": 0.12, "BIOLOGY": 0.12, "PHYSICS": 0.12, "CHEMISTRY": 0.12}
    results = "Results-qwen35"

    def wiscore(self, row):
        if row["score"] not in (0, 1):
            raise TypeError("not binary")
        return float(row["score"])

    def score_commands(self, out, files):
        images = out / self.name
        return [
            f"IMAGE_DIR={images} VLLM_API_BASE=http://127.0.0.1:8000/v1 bash $WISE/eval_qwen.sh  "
            "# with vLLM serving Qwen3.5-35B-A3B there",
            f"unilip eval summarize {self.name} {out} --bench $WISE",
        ]


# ------------------------------------------------------------------------- ImgEdit


class ImgEdit(Benchmark):
    name = "imgedit"
    pinned = {"Benchmark/Basic/basic_edit.json": "5ee9b7d61e918692416f79896300f738598c83adff8de737b25be4aaff72dc69"}
    source = "PKU-YuanGroup/ImgEdit@547185d"
    bench_help = "a directory with basic_edit.json (or the tarball's singleturn.json) and the images of Benchmark.tar at their `id` paths"
    TYPES = ("add", "adjust", "extract", "replace", "remove", "background", "style", "compose", "action")

    def locate(self, path):
        if path is None:
            raise BenchError(f"imgedit needs --bench: {self.bench_help}")
        root = Path(path)
        for candidate in (root, root / "basic_edit.json", root / "singleturn.json"):
            if candidate.is_file():
                return {"Benchmark/Basic/basic_edit.json": candidate}
        raise BenchError(f"imgedit: basic_edit.json not found under {root} ({self.bench_help})")

    def edits(self, files) -> dict[str, dict]:
        return json.loads(files["Benchmark/Basic/basic_edit.json"].read_text())

    def image_root(self, files) -> Path:
        return files["Benchmark/Basic/basic_edit.json"].parent

    def items(self, files, n=None, seed=42):
        root, out = self.image_root(files), []
        for key, e in self.edits(files).items():
            ref = root / e["id"]
            if not ref.is_file():
                raise BenchError(
                    f"imgedit {key}: source image {ref} missing (extract Benchmark.tar next to basic_edit.json)"
                )
            out.append(Item(key, 0, "editing", e["prompt"], seed, f"imgedit/{key}.png", str(ref)))
        return out

    def check(self, out, files, n=None):
        # basic_bench.py opens RESULT_DIR/{key}.png for every key of the edit json
        have, want = _pngs(out / "imgedit", r".+\.png"), {f"{k}.png" for k in self.edits(files)}
        return [f"imgedit/{name} missing" for name in sorted(want - have)] + [
            f"imgedit/{name}: no such key" for name in sorted(have - want)
        ]

    def summarize(self, out, files):
        path = out / "imgedit" / "result.json"
        if not path.exists():
            raise BenchError(f"{path} missing: run the judge first (the commands `unilip eval imgedit` printed)")
        results, edits = json.loads(path.read_text()), self.edits(files)
        per_key, failed = {}, []
        for key, text in results.items():  # step1_get_avgscore.py: the mean of the `Name: N` lines, 2 decimals
            scores = [
                int(p[1])
                for p in (line.strip().split(": ") for line in str(text).splitlines())
                if len(p) == 2 and p[1].isdigit()
            ]
            if scores and isinstance(text, str):
                per_key[key] = round(sum(scores) / len(scores), 2)
            else:
                failed.append(key)
        types: dict[str, list[float]] = {}
        for key, score in per_key.items():  # step2_typescore.py: per edit_type, 2 decimals
            if key in edits:
                types.setdefault(edits[key]["edit_type"], []).append(score)
        scores = {f"imgedit/{t}": round(sum(v) / len(v), 2) for t, v in types.items()}
        missing = sorted(set(edits) - set(per_key))
        scores["imgedit/scored"] = float(len(per_key))
        if failed or missing:
            print(
                f"imgedit: {len(missing)} edits without a score ({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}); re-run the judge on them"
            )
        # the paper's overall (Table 20): the unweighted mean of the 9 type means
        if all(t in types for t in self.TYPES):
            scores["imgedit/overall"] = float(np.mean([scores[f"imgedit/{t}"] for t in self.TYPES]))
        return scores

    def score_commands(self, out, files):
        rel = "Benchmark/Basic/basic_edit.json"
        return [
            "# edit api_key and base_url in basic_bench.py first (they are hard-coded there)",
            f"python $IMGEDIT/Benchmark/Basic/basic_bench.py --result_img_folder {out / 'imgedit'} --edit_json {files[rel]} "
            f"--origin_img_root {self.image_root(files)} --prompts_json $IMGEDIT/Benchmark/Basic/prompts.json --num_processes 8",
            f"unilip eval summarize imgedit {out} --bench {self.image_root(files)}",
        ]


# ----------------------------------------------------------------------- DPG-Bench


def tree_hash(folder: Path, pattern: str = "*.txt") -> str:
    """sha256 over the sorted (name, sha256) of the files: one pin for a folder of prompts."""
    h = hashlib.sha256()
    for p in sorted(folder.glob(pattern)):
        h.update(f"{p.name}\0{sha256(p)}\n".encode())
    return h.hexdigest()


class DPG(Benchmark):
    name, images_per_prompt = "dpg", 4
    pinned = {
        "dpg_bench/prompts": "c9c75784dc4dbc8442fd749fdae3b425f55e659a6277fa090611d47912d48fb5"
    }  # tree_hash of the folder
    source = "TencentQQGYLab/ELLA@3c228f1"
    bench_help = "an ELLA checkout (TencentQQGYLab/ELLA) or its dpg_bench/prompts folder"
    TILES = ((0, 0), (1, 0), (0, 1), (1, 1))  # compute_dpg_bench.py's crop order, in tiles: (x, y)

    def locate(self, path):
        if path is None:
            raise BenchError(f"dpg needs --bench: {self.bench_help}")
        root = Path(path)
        for candidate in (root / "dpg_bench" / "prompts", root / "prompts", root):
            if candidate.is_dir() and any(candidate.glob("*.txt")):
                return {"dpg_bench/prompts": candidate}
        raise BenchError(f"dpg: no prompt .txt files under {root} ({self.bench_help})")

    def verify(self, files, allow_unpinned=False):
        digest = tree_hash(files["dpg_bench/prompts"])
        if digest != self.pinned["dpg_bench/prompts"] and not allow_unpinned:
            raise BenchError(
                f"{files['dpg_bench/prompts']}: prompt tree {digest[:12]}..., the pinned {self.source} one is "
                f"{self.pinned['dpg_bench/prompts'][:12]}... (--allow-unpinned to use it anyway)"
            )
        return {"dpg_bench/prompts": digest}

    def prompts(self, files) -> dict[str, str]:
        return {p.stem: p.read_text().strip() for p in sorted(files["dpg_bench/prompts"].glob("*.txt"))}

    def items(self, files, n=None, seed=42):
        n = n or self.images_per_prompt
        if n > 4:
            raise BenchError("dpg: at most 4 images per prompt (the scorer reads a 2x2 grid)")
        return [
            Item(key, k, "generation", text, seed + k, f"dpg.tiles/{key}/{k}.png")
            for key, text in self.prompts(files).items()
            for k in range(n)
        ]

    def finalize(self, out, files, items):
        import io

        from PIL import Image

        by_key: dict[str, list[Item]] = {}
        for it in items:
            by_key.setdefault(it.key, []).append(it)
        for key, tiles in by_key.items():
            grid = Image.new("RGB", (2 * RESOLUTION, 2 * RESOLUTION))
            for it in sorted(tiles, key=lambda t: t.k):
                x, y = self.TILES[it.k]
                with Image.open(io.BytesIO(out.read(it.path))) as tile:
                    grid.paste(tile.convert("RGB"), (x * RESOLUTION, y * RESOLUTION))
            buf = io.BytesIO()
            grid.save(buf, format="PNG")
            out.write(f"dpg/{key}.png", buf.getvalue())

    def check(self, out, files, n=None):
        # compute_dpg_bench.py lists every entry of the folder; a name must be a prompt's stem
        from PIL import Image

        folder, keys = out / "dpg", set(self.prompts(files))
        names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        problems = [f"dpg/{k}.png missing" for k in sorted(keys - {n.split(".")[0] for n in names})]
        for name in sorted(names):
            if name.split(".")[0] not in keys:
                problems.append(f"dpg/{name}: not a prompt's name (the scorer would fail on it)")
                continue
            with Image.open(folder / name) as im:
                if im.size != (2 * RESOLUTION, 2 * RESOLUTION):
                    problems.append(
                        f"dpg/{name}: {im.size[0]}x{im.size[1]}, the scorer crops a {2 * RESOLUTION}px 2x2 grid"
                    )
        return problems

    def summarize(self, out, files):
        path = self.results(out, "dpg.results.txt")
        per_image, reported = [], None
        for line in path.read_text().splitlines():  # "IMAGE, tile scores..., image score" per image
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 3 and parts[0].endswith(".png"):
                per_image.append(float(parts[-1]))
            elif line.startswith("DPG-Bench score:"):
                reported = float(line.split(":")[1])
        if not per_image:
            raise BenchError(f"{path}: no per-image scores")
        scores = {"dpg/overall": 100 * float(np.mean(per_image)), "dpg/images": float(len(per_image))}
        if reported is not None:
            scores["dpg/reported"] = reported
        return scores

    def score_argv(self, out, files, repo, python, options):
        gpus = int(options.get("gpus") or 1)
        return [
            python,
            "-m",
            "accelerate.commands.launch",
            "--num_machines",
            "1",
            "--num_processes",
            str(gpus),
            *(["--multi_gpu"] if gpus > 1 else []),
            "--mixed_precision",
            "fp16",
            "dpg_bench/compute_dpg_bench.py",
            "--image-root-path",
            str(out / "dpg"),
            "--resolution",
            str(RESOLUTION),
            "--pic-num",
            "4",
            "--vqa-model",
            "mplug",
            "--res-path",
            str(out / "dpg.results.txt"),
        ], repo

    def score_commands(self, out, files):
        ella = files["dpg_bench/prompts"].parent.parent
        return [
            f"cd {ella} && accelerate launch --num_machines 1 --num_processes $GPUS --multi_gpu --mixed_precision fp16 "
            f"dpg_bench/compute_dpg_bench.py --image-root-path {out / 'dpg'} --resolution {RESOLUTION} --pic-num 4 "
            f"--vqa-model mplug --res-path {out / 'dpg.results.txt'}"
        ]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (GenEval(), Wise(), WiseVerified(), ImgEdit(), DPG())}


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise BenchError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}, recon")
    return BENCHMARKS[name]
