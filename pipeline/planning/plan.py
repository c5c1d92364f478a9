"""The auto mode's plan: which candidates, at which image size, for how many epochs, with
which TTA candidates and whether to refit, so that everything finishes inside the time left.

Pure functions of the profile, the measured speeds and the time left. Costs are estimated
from the measured speeds (scaled by how the finished experiments' real times compared with
their plan); values from each candidate's prior, its epochs and image size. The portfolio
score rewards a strong best member most and diverse other members a little (an ensemble beats
its best member by a small margin). The first experiment is a cheap one, so that a submission
exists early (anytime); then every candidate that fits gets a member, added greedily by score
gained per second; members are upgraded (more epochs, a larger size) while time is left; only
then may a candidate come back as another member (another seed, size or epochs: up to
REPEATS), upgraded in turn; last, the strongest one refits if time is still left.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pipeline.models.tta import VIEW_SETS
from pipeline.planning.candidates import Candidate, Choice
from pipeline.planning.measure import Profile, Speed

FIRST_SHARE = 0.25  # the first experiment's most of the time left: a submission early
OTHERS_WEIGHT = 0.15  # what a member other than the best adds to the portfolio, per value
REPEAT_NOVELTY = 0.3  # a second member of the same backbone adds this share of a new one
REPEATS = 3  # members of one candidate at most (another seed, size or epochs each)
TTA_SHARE = 0.2  # TTA candidates are added while their prediction cost stays under this share
TTA_ORDER = ("hflip", "multiscale", "five_crop", "dihedral8", "ten_crop")
EPOCH_OVERHEAD = {"cpu": 0.05, "cuda": 0.1}  # seconds per epoch beyond the images: logs, checkpoints
EXPERIMENT_OVERHEAD = 3.0  # seconds per experiment: reading the data, writing its files


@dataclass(frozen=True)
class Plan:
    choices: list[Choice]  # in run order
    estimates: dict[str, float]  # name: planned seconds, with its blend and submission
    dropped: dict[str, str]  # candidate: why it is not in the plan
    left: float  # the seconds left when planned
    reserve: float  # kept free: the margin


def n_views(view_sets: tuple[str, ...]) -> int:
    """Distinct views the view sets need (all predicted in one pass)."""
    return len({v for s in view_sets for v in VIEW_SETS[s]})


def train_seconds(p: Profile, s: Speed, epochs: int, refit: bool) -> float:
    """Training and per-epoch validation of every fold (and the refit)."""
    fits = p.folds + refit
    images = epochs * p.n_train * (p.folds - 1 + refit)
    return (images / s.train_ips + epochs * p.n_train / s.predict_ips
            + fits * (s.setup_seconds + epochs * EPOCH_OVERHEAD.get(p.device_type, 0.1)))


def predict_seconds(p: Profile, s: Speed, views: tuple[str, ...], refit: bool) -> float:
    """The predict stage: every fold model on its OOF rows, every test model on the test set."""
    return n_views(views) * (p.n_train + p.n_test * (p.folds + refit)) / s.predict_ips


def seconds(p: Profile, s: Speed, c: Choice) -> float:
    return (train_seconds(p, s, c.epochs, c.refit) + predict_seconds(p, s, c.views, c.refit)
            + EXPERIMENT_OVERHEAD)


def cache_seconds(p: Profile) -> float:
    """Decoding every image into the cache of a new size."""
    return p.decode_seconds * (p.n_train + p.n_test)


def size_cap(c: Candidate, p: Profile) -> int:
    """The size past which the candidate gains nothing: twice the images' own side for a
    pretrained model (its features were learnt on larger objects), their side from scratch."""
    return max(min(c.sizes), p.side * (2 if c.pretrained else 1))


def useful_sizes(c: Candidate, p: Profile) -> list[int]:
    """The candidate's sizes up to the first that reaches its cap (larger ones cost more and
    gain nothing): the only ones measured and planned."""
    sizes = sorted(c.sizes)
    reach = next((i for i, s in enumerate(sizes) if s >= size_cap(c, p)), len(sizes) - 1)
    return sizes[:reach + 1]


def value(c: Candidate, size: int, epochs: int, p: Profile) -> float:
    """How good the candidate is expected to be: its prior, times its epochs' share of what
    training can give (flat past `epochs.good`), times its size's (up to size_cap)."""
    cap = size_cap(c, p)
    size_gain = (min(size, cap) / cap) ** 0.25
    epoch_gain = 1 - math.exp(-3 * epochs / c.epochs.good)
    return c.prior * size_gain * epoch_gain


def portfolio(members: list[tuple[str, float]]) -> float:
    """The score of (backbone, value) members: the best's value, plus OTHERS_WEIGHT of each
    other's (REPEAT_NOVELTY of it for a backbone already in)."""
    if not members:
        return 0.0
    ranked = sorted(members, key=lambda m: -m[1])
    seen, score = {ranked[0][0]}, ranked[0][1]
    for name, v in ranked[1:]:
        score += OTHERS_WEIGHT * v * (REPEAT_NOVELTY if name in seen else 1.0)
        seen.add(name)
    return score


def epoch_grid(c: Candidate) -> list[int]:
    e = c.epochs
    grid = {e.min, round(e.good / 2), e.good, round(e.good * 1.5), e.good * 2, e.max}
    return sorted(x for x in grid if e.min <= x <= e.max)


def tta_views(p: Profile, s: Speed, epochs: int) -> tuple[str, ...]:
    """The view sets `tta.views: auto` chooses among: each added while the prediction cost of
    all of them stays under TTA_SHARE of the training cost."""
    views, limit = ("none",), TTA_SHARE * train_seconds(p, s, epochs, False)
    for extra in TTA_ORDER:
        if predict_seconds(p, s, views + (extra,), False) <= limit:
            views += (extra,)
    return views


@dataclass(frozen=True)
class Option:
    choice: Choice
    cost: float
    value: float


def options(c: Candidate, p: Profile, speeds: dict[tuple[str, int], Speed], ratio: float,
            blend: float, cached: set[int], seed: int = 0) -> list[Option]:
    """Every size measured x epochs of the grid, with its cost (the blend after it and a new
    size's cache included) and value; `seed`: the candidate's how-manieth member this is."""
    out = []
    for size in useful_sizes(c, p):
        s = speeds.get((c.name, size))
        if s is None:
            continue
        for epochs in epoch_grid(c):
            choice = Choice(c.name, size, epochs, tta_views(p, s, epochs), seed=seed)
            cost = seconds(p, s, choice) * ratio + blend + (0 if size in cached else
                                                              cache_seconds(p))
            out.append(Option(choice, cost, value(c, size, epochs, p)))
    return out


def _why(o: Option, role: str) -> str:
    c = o.choice
    again = f", its member {c.seed + 1} (seed +{c.seed})" if c.seed else ""
    return (f"{role}: {c.candidate}{again} at {c.size} px for {c.epochs} epochs, expected value "
            f"{o.value:.3f}, planned {o.cost:.0f} s; TTA candidates {', '.join(c.views)}")


def make_plan(p: Profile, candidates: list[Candidate], speeds: dict[tuple[str, int], Speed],
              left: float, budget: float, done: list[tuple[Choice, float]],
              ratios: dict[str, float] | None = None, blend: float = 5.0,
              unavailable: dict[str, str] | None = None) -> Plan:
    """The experiments to run next, in order, within `left` seconds less a margin (5% of the
    budget); `done`: (choice, value) of the experiments finished already; `ratios`: per
    candidate, its real times over its estimates (default 1)."""
    ratios = ratios or {}
    reserve = max(0.05 * budget, 2.0)
    room = left - reserve
    dropped = dict(unavailable or {})
    by_name = {c.name: c for c in candidates}
    plan: list[Option] = []

    def menu(name: str, seed: int | None = None) -> list[Option]:
        """The candidate's options as its next member (or as member `seed`)."""
        if seed is None:
            used = {c.seed for c, _ in done if c.candidate == name} | \
                {o.choice.seed for o in plan if o.choice.candidate == name}
            free = sorted(set(range(REPEATS)) - used)
            if not free:
                return []
            seed = free[0]
        cached = {c.size for c, _ in done} | {o.choice.size for o in plan}
        return options(by_name[name], p, speeds, ratios.get(name, 1.0), blend, cached, seed)

    def score(planned: list[Option]) -> float:
        return portfolio([(c.candidate, v) for c, v in done] +
                         [(o.choice.candidate, o.value) for o in planned])

    measured = [c.name for c in candidates if menu(c.name, 0)]
    for c in candidates:
        if c.name not in measured:
            dropped.setdefault(c.name, "not measured: the measuring share of the budget ran "
                                       "out before it")
    spent = 0.0
    if not done:  # anytime: a cheap first experiment, so a submission exists early
        every = [o for name in measured for o in menu(name)]
        quick = [o for o in every if o.cost <= FIRST_SHARE * room]
        pool = quick or [o for o in every if o.cost <= room]
        if pool:
            first = max(pool, key=lambda o: (o.value, -o.cost)) if quick else \
                min(pool, key=lambda o: o.cost)
            plan.append(dataclasses.replace(first, choice=dataclasses.replace(
                first.choice, why=_why(first, "the first experiment (a submission early)"))))
            spent += first.cost
    first_fixed = not done and bool(plan)

    def has_member(name: str) -> bool:
        return any(c.candidate == name for c, _ in done) or \
            any(o.choice.candidate == name for o in plan)

    def grow(repeats: bool) -> None:
        """Add the option with the best score gained per second while one fits: of candidates
        without a member yet, or (`repeats`) another member of one that has one."""
        nonlocal spent
        while True:
            base = score(plan)
            best, best_rate = None, 0.0
            for name in measured:
                if has_member(name) != repeats:
                    continue
                for o in menu(name):
                    if o.cost <= room - spent:
                        rate = (score(plan + [o]) - base) / o.cost
                        if rate > best_rate:
                            best, best_rate = o, rate
            if best is None:
                return
            plan.append(best)
            spent += best.cost

    def upgrade() -> None:
        """Replace a planned option by a dearer one of its candidate (more epochs, a larger
        size) while that gains the most score per extra second and fits."""
        nonlocal spent
        while True:
            base = score(plan)
            best, best_rate = None, 0.0
            for i, current in enumerate(plan):
                if i == 0 and first_fixed:
                    continue
                for o in menu(current.choice.candidate, current.choice.seed):
                    extra = o.cost - current.cost
                    if 0 < extra <= room - spent:
                        gain = score(plan[:i] + [o] + plan[i + 1:]) - base
                        if gain > 1e-9 and gain / extra > best_rate:
                            best, best_rate = (i, o), gain / extra
            if best is None:
                return
            i, o = best
            spent += o.cost - plan[i].cost
            plan[i] = o

    grow(repeats=False)  # diversity first: every candidate that fits gets a member
    upgrade()
    grow(repeats=True)  # then the time left buys other members of the same candidates
    upgrade()
    for i, o in enumerate(plan):
        if not o.choice.why:
            plan[i] = dataclasses.replace(o, choice=dataclasses.replace(
                o.choice, why=_why(o, "chosen for the best portfolio score per second")))
    refittable = range(1 if first_fixed else 0, len(plan))  # the first stays quick
    if refittable:  # the time still left refits the strongest planned member on every train row
        i = max(refittable, key=lambda j: plan[j].value)
        o = plan[i]
        s, refitted = speeds[(o.choice.candidate, o.choice.size)], \
            dataclasses.replace(o.choice, refit=True)
        extra = (seconds(p, s, refitted) - seconds(p, s, o.choice)) * \
            ratios.get(o.choice.candidate, 1.0)
        if extra <= room - spent:
            plan[i] = dataclasses.replace(o, cost=o.cost + extra, choice=dataclasses.replace(
                refitted, notes=o.choice.notes + (
                    f"refit: the time left ({room - spent:.0f} s) covers a full-data refit "
                    f"({extra:.0f} s); its gain shows on the leaderboard, not in CV",)))
            spent += extra
    used = {c.candidate for c, _ in done} | {o.choice.candidate for o in plan}
    for name in measured:
        if name in used:
            continue
        cheapest = min(menu(name, 0), key=lambda o: o.cost)
        dropped.setdefault(name, (
            f"too slow here: its cheapest run ({cheapest.choice.size} px, "
            f"{cheapest.choice.epochs} epochs) needs {cheapest.cost:.0f} s, "
            f"{max(0.0, room - spent):.0f} s were left" if cheapest.cost > room - spent else
            f"left out: other options gained more per second (its cheapest run needs "
            f"{cheapest.cost:.0f} s)"))
    order = plan[:1] + sorted(plan[1:], key=lambda o: o.cost) if not done else \
        sorted(plan, key=lambda o: o.cost)
    return Plan([o.choice for o in order], {o.choice.name: o.cost for o in order}, dropped,
                left, reserve)
