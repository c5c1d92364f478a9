"""runs/<comp>/auto/report.md: the budget used, plan vs actual per experiment (seconds, epochs,
CV), why each candidate was kept or dropped, the speeds measured and every plan made."""
from __future__ import annotations

from pathlib import Path

from pipeline.core.artifacts import write_text
from pipeline.planning.state import State


def _num(v, digits: int = 5) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def lines(state: State) -> list[str]:
    d = state.data
    out = [f"# make auto: {Path(state.path).parent.parent.name}", "",
           f"Budget {d['budget_seconds']:.0f} s; spent {d['spent_seconds']:.0f} s over "
           f"{d['invocations']} invocation(s), {d['measure_seconds']:.0f} s of it measuring; "
           f"device {d['device']}.", ""]
    ens = d.get("ensemble")
    out += ([f"Submission {ens['submission']}: {ens['basis']} {ens['metric']} "
             f"{ens['cv']:.5f} (in-sample {_num(ens['in_sample'])}, optimistic) from "
             f"{', '.join(ens['members'])}.", ""] if ens else
            ["No experiment finished: no submission.", ""])
    out += ["The plan never looks at a CV score: candidates, sizes and epochs come from priors "
            "and measured times, so the ensemble's nested CV stays the honest headline.", "",
            "## Experiments: plan vs actual", "",
            "| experiment | status | size | epochs | TTA candidates | refit | planned s | "
            "actual s | CV | CV with TTA |", "| --- | --- | --- | --- | --- | --- | --- | --- | "
            "--- | --- |"]
    for name, e in d["experiments"].items():
        c = e["choice"]
        out.append(f"| {name} | {e['status']} | {c['size']} | {c['epochs']} | "
                   f"{', '.join(c['views'])} | {'yes' if c['refit'] else ''} | "
                   f"{e['planned_seconds']:.0f} | {e['actual_seconds']:.0f} | {_num(e['cv'])} | "
                   f"{_num(e['cv_tta'])} |")
    out += ["", "## Why each was chosen", ""]
    for name, e in d["experiments"].items():
        out.append(f"- {name}: {e['choice']['why']}"
                   + "".join(f"; {n}" for n in e["choice"]["notes"]))
    if d["plans"]:
        out += ["", "## Candidates left out (the last plan)", "", "| candidate | why |",
                "| --- | --- |"]
        out += [f"| {k} | {v} |" for k, v in d["plans"][-1]["dropped"].items()]
    out += ["", "## Speeds measured", "", "| candidate @ size | train img/s | predict img/s | "
            "setup s |", "| --- | --- | --- | --- |"]
    out += [f"| {k} | {v['train_ips']:.0f} | {v['predict_ips']:.0f} | {v['setup_seconds']:.2f} |"
            for k, v in d["speeds"].items()]
    out += ["", "## Plans (each made before an experiment, with the real times so far)", "",
            "| at s | left s | real / planned times | order (planned s) |",
            "| --- | --- | --- | --- |"]
    out += [f"| {p['spent']:.0f} | {p['left']:.0f} | "
            + (", ".join(f"{k} {v:.2f}" for k, v in p["ratios"].items()) or "-") + " | "
            + ", ".join(f"{n} ({p['estimates'][n]:.0f})" for n in p["order"]) + " |"
            for p in d["plans"]]
    out += ["", "## Events", ""] + [f"- {e}" for e in d["events"]]
    return out


def write(state: State, path: Path) -> None:
    write_text("\n".join(lines(state)) + "\n", path)
