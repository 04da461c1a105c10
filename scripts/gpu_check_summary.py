"""Summarise a ``scripts/gpu_check.sh`` run: OUT_DIR/summary.md, summary.json, one screen printed.

    python scripts/gpu_check_summary.py OUT_DIR [ELAPSED_S]

Reads what the stages left (stages.tsv, check.json, pytest-cuda.xml, the sanitizer logs,
bench.json, train-*.json); a missing file means its stage did not get that far, and says so.
Standard library only.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stages(out: Path) -> List[Dict[str, str]]:
    rows = []
    for line in (
        (out / "stages.tsv").read_text().splitlines() if (out / "stages.tsv").exists() else []
    ):
        name, status, rc, secs, note = (line.split("\t") + [""] * 5)[:5]
        rows.append({"stage": name, "status": status, "rc": rc, "seconds": secs, "note": note})
    return rows


def check_summary(out: Path) -> Dict[str, object]:
    data = _read_json(out / "check.json")
    if data is None:
        return {"ran": False}
    rows = data["rows"]
    failed = [
        f"{r['op']} / {r['case']}: {r['note'] or 'beyond tolerance'}"
        for r in rows
        if not r["passed"]
    ]
    return {"ran": True, "checks": len(rows), "failed": failed, **data.get("meta", {})}


def pytest_summary(out: Path) -> Dict[str, object]:
    path = out / "pytest-cuda.xml"
    if not path.exists():
        return pytest_log_summary(out / "logs" / "pytest.log")
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {"ran": True, **counts, "failed": failed}


def pytest_log_summary(log: Path) -> Dict[str, object]:
    """Counts from ``pytest -v`` lines when no JUnit XML was written (the run was stopped)."""
    if not log.exists():
        return {"ran": False}
    results = re.findall(
        r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)",
        log.read_text(errors="replace"),
        flags=re.M,
    )
    if not results:
        return {"ran": False}
    status = [s for _, s in results]
    return {
        "ran": True,
        "tests": len(results),
        "failures": status.count("FAILED"),
        "errors": status.count("ERROR"),
        "skipped": status.count("SKIPPED"),
        "failed": [name for name, s in results if s in ("FAILED", "ERROR")],
        "note": "stopped before the end: counts of the tests that finished",
    }


def sanitizer_summary(out: Path, tool: str) -> Optional[str]:
    log = out / "logs" / f"{tool}.log"
    if not log.exists():
        return None
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
    found = [ln for ln in lines if re.search(r"(ERROR|RACECHECK) SUMMARY", ln)]
    return found[-1].lstrip("= ").strip() if found else "no summary line (see the log)"


def bench_rows(out: Path) -> Dict[str, object]:
    data = _read_json(out / "bench.json")
    if data is None:
        return {"ran": False}
    return {"ran": True, "meta": data.get("meta", {}), "results": data.get("results", [])}


def _speedup(rows: Dict[str, dict], peer: str, ours: dict) -> str:
    r = rows.get(peer)
    if r is None:
        return "-"
    if r.get("error"):
        return "failed"
    return f"{r['median_ms'] / ours['median_ms']:.2f}x"


def bench_table(bench: Dict[str, object]) -> List[str]:
    """fastmargin's time and % of copy bandwidth per case, and its speedup over each peer."""
    by_case: Dict[str, Dict[str, dict]] = {}
    for r in bench["results"]:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    lines = [
        "| case | fastmargin ms | % of copy bw | vs eager | vs compile | vs liger |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, rows in by_case.items():
        ours = rows.get("fastmargin")
        if ours is None or ours.get("error"):
            lines.append(f"| {case} | failed | | | | |")
            continue

        pct = ours.get("pct_copy")
        cells = [
            case,
            f"{ours['median_ms']:.3f}",
            "-" if pct is None else f"{pct:.0f}%",
            _speedup(rows, "eager", ours),
            _speedup(rows, "compile", ours),
            _speedup(rows, "liger", ours),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def train_lines(out: Path) -> List[str]:
    lines = []
    for method in ("maxup", "amo"):
        data = _read_json(out / f"train-{method}.json")
        if data is None:
            continue
        cells = ", ".join(f"{r['provider']} {r['median_ms']:.1f} ms" for r in data["rows"])
        lines.append(f"- {method} ({data.get('device', '?')}): {cells}")
    return lines


def main(argv: List[str]) -> int:
    out = Path(argv[1])
    elapsed = argv[2] if len(argv) > 2 else "?"
    env = (out / "env.txt").read_text().strip() if (out / "env.txt").exists() else ""
    st = stages(out)
    chk = check_summary(out)
    pyt = pytest_summary(out)
    san = {t: sanitizer_summary(out, t) for t in ("memcheck", "racecheck", "synccheck")}
    bench = bench_rows(out)
    train = train_lines(out)

    md = [
        "# make gpu-check",
        "",
        "```",
        env,
        f"wall: {elapsed} s",
        "```",
        "",
        "| stage | status | seconds | note |",
        "| --- | --- | ---: | --- |",
    ]
    md += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in st]
    md += ["", "## Self-check"]
    if chk["ran"]:
        md.append(
            f"{chk['checks']} checks, {len(chk['failed'])} failed "
            f"({chk.get('mode', '?')}, {chk.get('seconds', 0):.1f} s on {chk.get('device')})"
        )
        md += [f"- FAIL {f}" for f in chk["failed"]]
    else:
        md.append("no result (see logs/check.log)")
    md += ["", "## CUDA tests"]
    if pyt["ran"]:
        md.append(
            f"{pyt['tests']} tests: {pyt['failures']} failures, {pyt['errors']} errors, "
            f"{pyt['skipped']} skipped"
        )
        md += [f"- FAIL {f}" for f in pyt["failed"]]
        if pyt.get("note"):
            md.append(f"({pyt['note']})")
    else:
        md.append("not run")
    md += ["", "## compute-sanitizer (fastmargin check --quick)"]
    md += [f"- {t}: {v if v is not None else 'not run'}" for t, v in san.items()]
    md += ["", "## Benchmarks (bfloat16, gpu-check set)"]
    if bench["ran"]:
        meta = bench["meta"]
        md.append(
            f"{meta.get('device')}, torch {meta.get('torch')}, copy bandwidth "
            f"{meta.get('copy_gbps', 0):.0f} GB/s, cases done: {meta.get('cases_done', '?')}"
        )
        md += [""] + bench_table(bench)
        md += ["", "Every provider, GB/s and peak memory: logs/bench.log (and bench.json)."]
    else:
        md.append("not run")
    md += ["", "## Training steps"] + (train or ["not run"])
    (out / "summary.md").write_text("\n".join(md) + "\n")
    summary = {
        "stages": st,
        "check": chk,
        "pytest": pyt,
        "sanitizers": san,
        "bench": bench if bench["ran"] else None,
        "elapsed_s": elapsed,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    # one screen
    print("\n================ gpu-check summary ================")
    print(env.replace("\n", " | "))
    for s in st:
        print(f"  {s['stage']:<12} {s['status']:<8} {s['seconds']:>4} s  {s['note']}")
    if chk["ran"]:
        print(f"check: {chk['checks']} checks, {len(chk['failed'])} failed")
        for f in chk["failed"][:8]:
            print(f"  FAIL {f}"[:160])
    if pyt["ran"]:
        print(
            f"pytest -m cuda: {pyt['tests']} tests, {pyt['failures']} failures, "
            f"{pyt['errors']} errors, {pyt['skipped']} skipped"
        )
        for f in pyt["failed"][:8]:
            print(f"  FAIL {f}")
    for t, v in san.items():
        if v is not None:
            print(f"{t}: {v}")
    if bench["ran"]:
        print(f"bench: {bench['meta'].get('cases_done', '?')} cases; fastmargin ms / % copy bw:")
        for line in bench_table(bench)[2:14]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            print(
                f"  {cells[0]:<48} {cells[1]:>9} {cells[2]:>5}  eager {cells[3]}"
                f"  compile {cells[4]}"
            )
    for line in train:
        print(line[:160])
    bad = [s["stage"] for s in st if s["status"] in ("fail", "timeout")]
    print(
        f"wall {elapsed} s; files in {out}; "
        + (f"NOT OK: {', '.join(bad)}" if bad else "all stages ok")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
