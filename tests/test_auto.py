"""The auto mode (make auto): the planner's choices on fake measurements, the candidate file,
the settings, and a real run on a competition it has never seen, killed mid-way and resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_yaml
from pipeline.core.config import (check_folder, experiment_from_keys, load_competition,
                                  load_experiment)
from pipeline.core.splits import write_folds
from pipeline.core.errors import UserError
from pipeline.models.pretrained import check_backbone
from pipeline.planning import plan as planner
from pipeline.planning.candidates import (AutoSettings, Choice, experiment_keys, experiment_yaml,
                                          load_candidates, load_settings, unavailable)
from pipeline.planning.execute import HEADER, Auto, OutOfTime, owned, parse_budget
from pipeline.planning.measure import Profile, Speed
from task_data import make_task_competition

REPO = Path(__file__).resolve().parent.parent
# relative cost per image at 224 px (a stand-in for each model's measured speed)
COST = {"lenet5": 0.02, "resnet10t": 1.0, "lite0": 1.5, "resnet26d": 4.0, "convnext_tiny": 10.0,
        "efficientnet_b2": 6.0}


def machine(device_type: str, side: int = 512, n_train: int = 20000) -> Profile:
    return Profile(f"{device_type} (test)", device_type, "multiclass", n_train, n_train // 4, 5,
                   side, 0.002)


def fake_speeds(candidates, device_type: str) -> dict:
    """Speeds as a machine of that kind would measure them: a GPU ~100x a CPU."""
    per_second = {"cpu": 40.0, "cuda": 4000.0}[device_type]
    return {(c.name, s): Speed(per_second / (COST[c.name] * (s / 224) ** 2),
                               3 * per_second / (COST[c.name] * (s / 224) ** 2), 1.0, 0.1)
            for c in candidates for s in c.sizes}


def usable(device_type: str):
    return [c for c in load_candidates() if device_type in c.devices]


def total(p: planner.Plan) -> float:
    return sum(p.estimates.values())


def test_budget_parses_units_and_refuses_a_bare_number():
    assert parse_budget("90s") == 90
    assert parse_budget("30m") == 1800
    assert parse_budget("1h30m") == 5400
    assert parse_budget("1.5h") == 5400
    with pytest.raises(UserError, match=r"--budget '30': give a duration with its unit"):
        parse_budget("30")


def test_every_candidate_is_a_valid_experiment_of_a_known_backbone(tiny):
    settings = AutoSettings(experiment={"augment": {"hflip": False}})
    for c in load_candidates():
        check_backbone(c.config["model"]["backbone"])
        choice = Choice(c.name, c.sizes[0], c.epochs.min, ("none", "hflip"), refit=True,
                        why="test")
        cfg = experiment_from_keys("configs/tiny/auto-x.yaml",
                                   experiment_keys(c, choice, settings))
        assert (cfg.image_size, cfg.train.epochs, cfg.train.keep) == (c.sizes[0], c.epochs.min,
                                                                       "last")
        assert cfg.augment.hflip is False and cfg.tta.views == "auto" and cfg.refit.seeds == [0]
        assert cfg.seed == 0  # the competition's
        again = Choice(c.name, c.sizes[0], c.epochs.min, seed=2)
        assert again.name == f"auto-{c.name}-{c.sizes[0]}-s2"
        assert experiment_keys(c, again, settings, seed=42)["seed"] == 44
        assert c.epochs.min <= c.epochs.good <= c.epochs.max


def test_the_written_experiment_says_why_and_loads_as_an_ordinary_config(tiny):
    lenet = next(c for c in load_candidates() if c.name == "lenet5")
    choice = Choice("lenet5", 32, 12, ("none",), why="the first experiment")
    path = Path("configs/tiny") / f"{choice.name}.yaml"
    path.write_text(experiment_yaml(lenet, choice, AutoSettings()))
    assert path.read_text().startswith(f"{HEADER} (pipeline.planning): the first experiment")
    cfg = load_experiment(path)
    assert (cfg.experiment, cfg.train.epochs, cfg.tta.views) == ("auto-lenet5-32", 12, "none")
    written = path.read_text()
    assert owned(path, written) and owned(Path("configs/tiny/absent.yaml"))
    assert not owned(Path("configs/tiny/lenet5.yaml"))  # a hand-written config is left alone
    path.write_text(written.replace("epochs: 12", "epochs: 20"))
    assert not owned(path, written)  # nor one it wrote and you edited


def test_settings_file_is_skipped_by_the_folder_check_and_validated(tiny):
    write_yaml(Path("configs/tiny/auto.yaml"), {"experiment": {"augment": {"hflip": False}},
                                                "candidates": ["lenet5"]})
    assert "auto" not in check_folder("configs/tiny/competition.yaml")
    assert load_settings("configs/tiny/competition.yaml").candidates == ["lenet5"]
    write_yaml(Path("configs/tiny/auto.yaml"), {"candidate": ["lenet5"]})
    with pytest.raises(UserError, match=r"^configs/tiny/auto.yaml: candidate: unknown key$"):
        load_settings("configs/tiny/competition.yaml")
    with pytest.raises(UserError, match=r"candidates: 'lenet' is not in .*candidates.yaml"):
        load_candidates(only=["lenet"])


def test_unavailable_says_why_a_candidate_cannot_run(tiny):
    by_name = {c.name: c for c in load_candidates()}
    assert unavailable(by_name["resnet26d"], "cpu") == "not a cpu candidate (devices: cuda)"
    assert unavailable(by_name["lite0"], "cpu").startswith("cannot load: ")  # no weights/ here
    assert unavailable(by_name["lenet5"], "cpu") is None


@pytest.mark.parametrize("budget", [120, 600, 3600, 6 * 3600])
def test_the_plan_fits_the_time_left_and_starts_cheap(budget):
    cands = usable("cpu")
    p = planner.make_plan(machine("cpu", side=64, n_train=2000), cands, fake_speeds(cands, "cpu"),
                          budget, budget, [])
    assert p.choices, p.dropped
    assert total(p) <= budget - p.reserve + 1e-6
    room = budget - p.reserve
    first = p.estimates[p.choices[0].name]
    assert first <= planner.FIRST_SHARE * room or first == min(p.estimates.values())
    assert len({c.name for c in p.choices}) == len(p.choices) and all(c.why for c in p.choices)
    assert all(c.seed < planner.REPEATS for c in p.choices)  # a candidate's other members


def test_more_time_buys_more_value_and_a_refit():
    cands = usable("cpu")
    prof, speeds = machine("cpu", side=64, n_train=2000), fake_speeds(cands, "cpu")
    scores = []
    for budget in (120, 600, 3600, 100 * 3600):
        p = planner.make_plan(prof, cands, speeds, budget, budget, [])
        by_name = {c.name: c for c in cands}
        scores.append(planner.portfolio([(c.candidate, planner.value(
            by_name[c.candidate], c.size, c.epochs, prof)) for c in p.choices]))
    assert scores == sorted(scores) and scores[-1] > scores[0]
    assert any(c.refit for c in p.choices)  # 100 hours: every option maxed, time left to refit
    assert all(c.epochs == next(x for x in cands if x.name == c.candidate).epochs.max
               for c in p.choices)


def test_a_gpu_plans_larger_models_and_sizes_with_no_config_change():
    """The same competition (20k images of 512 px) and candidates file: on a GPU the plan
    takes the hub backbones and larger sizes that a CPU cannot afford."""
    budget = 3 * 3600
    plans = {}
    for device_type in ("cpu", "cuda"):
        cands = usable(device_type)
        plans[device_type] = planner.make_plan(machine(device_type), cands,
                                               fake_speeds(cands, device_type), budget, budget, [])
    cpu, gpu = plans["cpu"], plans["cuda"]
    assert max(c.size for c in gpu.choices) >= 224 > max(c.size for c in cpu.choices)
    assert {"convnext_tiny", "efficientnet_b2"} & {c.candidate for c in gpu.choices}
    assert not {"convnext_tiny", "efficientnet_b2"} & {c.candidate for c in cpu.choices}
    assert total(gpu) <= budget - gpu.reserve + 1e-6


def test_only_sizes_the_images_can_use_are_measured_and_planned():
    by_name = {c.name: c for c in load_candidates()}
    small, large = machine("cpu", side=32), machine("cuda", side=512)
    assert planner.useful_sizes(by_name["lite0"], small) == [48, 64]  # pretrained: up to 2x
    assert planner.useful_sizes(by_name["resnet10t"], small) == [32]  # from scratch: up to 1x
    assert planner.useful_sizes(by_name["convnext_tiny"], large) == [128, 224, 288, 384]


def test_slower_real_times_shrink_the_plan_and_done_work_is_not_planned_again():
    cands = usable("cpu")
    prof, speeds = machine("cpu", side=64, n_train=2000), fake_speeds(cands, "cpu")
    base = planner.make_plan(prof, cands, speeds, 900, 900, [])
    slow = planner.make_plan(prof, cands, speeds, 900, 900, [], {c.name: 3.0 for c in cands})
    assert total(slow) <= 900 - slow.reserve + 1e-6
    assert sum(c.epochs * c.size ** 2 for c in slow.choices) < \
        sum(c.epochs * c.size ** 2 for c in base.choices)
    done = [(Choice("lenet5", 32, 30, seed=s), 0.5) for s in (0, 2)]
    after = planner.make_plan(prof, cands, speeds, 600, 900, done)
    again = [c for c in after.choices if c.candidate == "lenet5"]
    assert [c.name for c in again] in ([], ["auto-lenet5-32-s1"])  # the free member number
    assert "lenet5" not in after.dropped


def test_candidates_that_cannot_fit_are_dropped_with_the_reason():
    cands = usable("cpu")
    p = planner.make_plan(machine("cpu", side=64, n_train=20000), cands,
                          fake_speeds(cands, "cpu"), 60, 60, [],
                          unavailable={"convnext_tiny": "not a cpu candidate"})
    assert p.dropped["convnext_tiny"] == "not a cpu candidate"
    assert p.dropped["lite0"].startswith("too slow here: its cheapest run (48 px, 3 epochs) needs")


def test_tta_candidates_follow_the_cost_of_predicting():
    prof = machine("cpu", side=64, n_train=2000)
    assert planner.tta_views(prof, Speed(100.0, 100000.0, 0.0, 0.0), 10) == \
        ("none",) + planner.TTA_ORDER
    assert planner.tta_views(prof, Speed(100.0, 20.0, 0.0, 0.0), 10) == ("none",)
    assert planner.n_views(("none", "hflip", "ten_crop")) == 10


def test_portfolio_rewards_the_best_member_and_diversity():
    assert planner.portfolio([("a", 0.8)]) == 0.8
    assert planner.portfolio([("a", 0.8), ("b", 0.5)]) == pytest.approx(0.8 + 0.15 * 0.5)
    assert planner.portfolio([("a", 0.8), ("a", 0.5)]) == pytest.approx(0.8 + 0.15 * 0.3 * 0.5)


def test_the_clock_stops_training_after_an_epoch_when_the_finish_would_not_fit(tiny):
    """5 s left and a finish (predictions, blend) estimated at ~6 s: the experiment stops after
    its first epoch, recorded as stopped, resumable (last.pt kept)."""
    write_folds(load_competition("configs/tiny/competition.yaml"))
    auto = Auto("configs/tiny/competition.yaml", 1000.0)
    auto.clock.before = 995.0
    auto.profile = Profile("cpu (CPU)", "cpu", "multiclass", 24, 6, 2, 20, 0.001)
    auto.state.set_profile(auto.profile)
    auto.state.set_speed("lenet5", 16, Speed(1e4, 1e4, 0.0, 0.0))
    lenet = next(c for c in load_candidates() if c.name == "lenet5")
    with pytest.raises(OutOfTime, match=r"auto-lenet5-16: stopped after epoch 1: the \d+ s left"):
        auto.run_experiment(lenet, Choice("lenet5", 16, 4, why="test"), 10.0)
    entry = auto.state.experiments()["auto-lenet5-16"]
    assert entry["status"] == "stopped" and entry["actual_seconds"] > 0
    assert Path("runs/tiny/auto-lenet5-16/fold0/last.pt").is_file()
    assert json.loads(Path("runs/tiny/auto/state.json").read_text())["experiments"][
        "auto-lenet5-16"]["status"] == "stopped"


def _state(work: Path) -> dict:
    path = work / "runs/multilabel/auto/state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_auto_on_an_unseen_competition_is_killed_resumes_and_stays_in_budget(tmp_path):
    """Only competition.yaml (multi-label, 2 folds, 16 px): the first run is killed (SIGKILL)
    after an epoch of an experiment; the second resumes it, keeps what was done, and the two
    stay inside the budget plus the work the kill lost; the submission is valid."""
    make_task_competition(tmp_path, "multilabel")
    for path in (tmp_path / "configs/multilabel").glob("*.yaml"):
        if path.name != "competition.yaml":
            path.unlink()
    budget = 40
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pipeline.auto", "configs/multilabel/competition.yaml",
               "--budget", f"{budget}s"]
    started = time.time()
    first = subprocess.Popen(command + ["--since", str(started)], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_in = None
    while first.poll() is None:
        running = [(n, e) for n, e in _state(tmp_path).get("experiments", {}).items()
                   if e["status"] == "running" and e["actual_seconds"] > 0]
        if running:
            first.send_signal(signal.SIGKILL)
            killed_in = running[0][0]
            break
        time.sleep(0.02)
    first.wait()
    wall_first = time.time() - started
    assert killed_in, first.stderr.read()[-3000:]
    lost = wall_first - _state(tmp_path)["spent_seconds"]
    log = tmp_path / f"runs/multilabel/{killed_in}/fold0/log.csv"
    before = log.read_text().splitlines()
    again = time.time()
    second = subprocess.run(command + ["--since", str(again)], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    wall_second = time.time() - again
    assert second.returncode == 0, second.stderr[-3000:]
    state = _state(tmp_path)
    assert state["invocations"] == 2
    assert any(f"{killed_in}: resuming" in e for e in state["events"])
    assert state["experiments"][killed_in]["status"] == "done"
    assert log.read_text().splitlines()[:len(before)] == before  # resumed, not retrained
    assert state["spent_seconds"] <= budget
    assert wall_first + wall_second <= budget + lost + 2
    # the submission: the sample's ids in its order, labels the train table knows
    sample = pd.read_csv(tmp_path / "data/multilabel/sample_submission.csv", dtype=str)
    sub = pd.read_csv(tmp_path / "submissions/multilabel.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns) == list(sample.columns) and list(sub["id"]) == list(sample["id"])
    assert set(" ".join(sub["tags"]).split()) <= {"d0", "d1", "d2", "d3"}
    # every experiment is an ordinary config; the ensemble names the finished ones
    done = [n for n, e in state["experiments"].items() if e["status"] == "done"]
    for name in done:
        assert load_experiment(tmp_path / f"configs/multilabel/{name}.yaml").experiment == name
    ensemble = (tmp_path / "configs/multilabel/ensemble.yaml").read_text()
    assert ensemble.startswith(HEADER) and all(n in ensemble for n in done)
    assert state["ensemble"]["members"] == sorted(done)
    assert state["plans"][-1]["dropped"]["lite0"].startswith("cannot load")
    report = (tmp_path / "runs/multilabel/auto/report.md").read_text()
    assert "## Experiments: plan vs actual" in report and f"| {killed_in} | done |" in report


def test_make_auto_needs_a_budget_and_passes_its_start(tiny):
    def make(*args):
        return subprocess.run(["make", "-f", str(REPO / "Makefile"), "--no-print-directory", "-n",
                               *args, f"PY={sys.executable}"], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})

    done = make("auto", "COMP=tiny")
    assert done.returncode == 2
    assert "BUDGET is not set: say how long, e.g. make auto COMP=tiny BUDGET=30m" in done.stderr
    done = make("auto", "COMP=tiny", "BUDGET=5m")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert "-m pipeline.auto configs/tiny/competition.yaml --budget 5m --since " in line
