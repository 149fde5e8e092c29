"""`unilip eval report`: reconstruction and understanding of one or more models next to the
paper's Table 1 and Table 3 rows, in the terminal and as Markdown and CSV.

    unilip eval report ./eval/internvit ./eval/recon-s2 --baseline ./eval/internvit --out ./eval/report

Each OUT is an eval directory: `recon-448.json` (`unilip eval recon --size 448`) and
`understanding.json` (`unilip eval understanding`), either or both. Scores are in the
paper's units (`jobs.evaluation.understanding.BENCHMARKS`). The harness's prompts are not
VLMEvalKit's, so the honest question "did this run keep understanding" is asked of a
baseline scored the same way: with `--baseline OUT` (the original InternViT's export, say),
each other model gets a row of differences from it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from jobs.evaluation.understanding import BENCHMARKS, RESULTS, BenchError

RECON = {"rFID": "recon/rfid", "PSNR": "recon/psnr", "SSIM": "recon/ssim", "SSIM (release's)": "recon/ssim_release"}
COLUMNS = [*RECON, *BENCHMARKS]
# The paper's rows (448 px reconstruction; understanding with the encoder inside InternVL3).
# Table 1: "Frozen CLIP" (InternViT with a trained pixel decoder) and UniLIP (1B); its SSIM is
# the release's computation. Table 3: InternVL3-1B/2B and UniLIP-1B/3B.
PAPER = {
    "paper: InternVL3-1B (InternViT)": {
        "rFID": 6.14,
        "PSNR": 16.26,
        "SSIM (release's)": 0.572,
        **dict(zip(BENCHMARKS, (1492, 72.6, 43.4, 59.5, 71.1, 69.4, 67.3, 74.1))),
    },
    "paper: UniLIP-1B": {
        "rFID": 0.31,
        "PSNR": 24.62,
        "SSIM (release's)": 0.788,
        **dict(zip(BENCHMARKS, (1499, 72.6, 43.3, 59.4, 71.0, 70.7, 68.7, 74.7))),
    },
    "paper: InternVL3-2B": dict(zip(BENCHMARKS, (1633, 80.6, 48.2, 62.2, 75.0, 78.5, 72.7))),
    "paper: UniLIP-3B": dict(zip(BENCHMARKS, (1636, 80.7, 48.7, 62.2, 75.0, 78.6, 73.0))),
}


def eval_row(out: Path) -> tuple[str, dict[str, float]]:
    """An eval directory's model and its figures in the paper's columns and units."""
    row, model = {}, None
    recon = out / "recon-448.json"
    if recon.exists():
        record = json.loads(recon.read_text())
        model = record["model"]
        row |= {col: record["metrics"][key] for col, key in RECON.items() if key in record["metrics"]}
    understanding = out / RESULTS
    if understanding.exists():
        record = json.loads(understanding.read_text())
        model = model or record["model"]
        for column, bench in BENCHMARKS.items():
            value = record["scores"].get(bench.task, {}).get(bench.metric)
            if value is not None:
                row[column] = value * bench.scale
        if record.get("limited"):
            model += " (--limit: not comparable)"
    if model is None:
        raise BenchError(
            f"{out} holds neither recon-448.json nor {RESULTS}: run `unilip eval recon --size 448` or `unilip eval understanding` into it"
        )
    return f"{out.name}: {model}", row


def build(outs: list[str], baseline: str | None = None) -> list[tuple[str, dict[str, float]]]:
    """The paper's rows, each eval's, and with `baseline` each other eval's differences from it."""
    rows = list(PAPER.items())
    evals = [(Path(o), *eval_row(Path(o))) for o in outs]
    rows += [(name, row) for _, name, row in evals]
    if baseline:
        base = next((row for path, _, row in evals if path.resolve() == Path(baseline).resolve()), None)
        if base is None:
            base = eval_row(Path(baseline))[1]
        for path, name, row in evals:
            if path.resolve() != Path(baseline).resolve():
                delta = {c: row[c] - base[c] for c in COLUMNS if c in row and c in base}
                rows.append((f"  difference from the baseline: {name}", delta))
    return rows


def _cell(value: float | None, column: str, signed: bool) -> str:
    if value is None:
        return "-"
    digits = 0 if column == "MME-P" else 3 if column.startswith(("SSIM", "rFID")) else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def cells(rows: list[tuple[str, dict[str, float]]]) -> list[list[str]]:
    return [[name] + [_cell(row.get(c), c, name.startswith("  ")) for c in COLUMNS] for name, row in rows]


def markdown(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + " | ".join(c.strip() for c in line) + " |" for line in cells(rows)]
    return "\n".join(lines) + "\n"


def text_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    table = [["model", *COLUMNS], *cells(rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in table
    )


def to_csv(rows: list[tuple[str, dict[str, float]]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", *COLUMNS])
    for name, row in rows:
        writer.writerow([name.strip(), *(row.get(c, "") for c in COLUMNS)])
    return buf.getvalue()


def report(outs: list[str], baseline: str | None = None, prefix: str | None = None, log=print) -> list:
    """Print the table; with `prefix`, write PREFIX.md and PREFIX.csv."""
    rows = build(outs, baseline)
    log(text_table(rows))
    if prefix:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{prefix}.md").write_text(markdown(rows))
        Path(f"{prefix}.csv").write_text(to_csv(rows))
        log(f"wrote {prefix}.md and {prefix}.csv")
    return rows
