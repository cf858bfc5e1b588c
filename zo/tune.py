"""A short, budgeted search over ``lr``, ``eps`` (and ``estimator.scale``) by successive halving.

Every candidate trains through :func:`zo.train.train` in its own run directory
(``OUT/cand-XX``). Rung ``r`` trains the surviving candidates to ``steps * eta**r`` steps
(continuing their runs with ``resume=true``, so a candidate's curve is one run) and keeps
the best ``1/eta`` of them by **dev loss**: the task's training objective averaged over the
dev examples (``task.eval_limit`` of them), the same examples for every candidate.

Noise. The dev examples are cut into batches of ``train.batch_size``; a candidate's
improvement is the mean over batches of (zero-shot loss - its loss) on the same batch, and it
*moved* the dev loss when that improvement exceeds both twice its standard error over the
batches and ``min_improvement`` times the zero-shot dev loss. The winner is the last rung's
lowest dev loss among the candidates that moved it (a lower loss within noise is passed over,
and said so); when none moved, the tune reports "no setting moved the dev loss" and writes no
``best.yaml``.

State. ``OUT/tune.json`` (written atomically after every evaluation) holds the settings,
the candidates and every result; a second tune on the same ``OUT`` checks that the settings
match, skips what is recorded and resumes a candidate's killed run from its checkpoint. Run
directories are never overwritten.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import io
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zo.config import ConfigError, RunConfig, config_from_data, dump_yaml, to_dict
from zo.run_directory import RunDirectory
from zo.run_files import atomic_write_text

TUNE_FORMAT = 1
FLAT_MESSAGE = "no setting moved the dev loss: the trainable set or the budget is the problem"


@dataclass(frozen=True)
class Axis:
    """One searched setting: a list of values, or a log-uniform range ``(low, high)``."""

    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    def is_range(self) -> bool:
        return self.low is not None

    def draw(self, rng: random.Random) -> Any:
        if self.is_range():
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return (
            self.values[rng.randrange(len(self.values))] if len(self.values) > 1 else self.values[0]
        )

    def to_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "low": self.low, "high": self.high}


def parse_axis(text: str, name: str, positive: bool = True) -> Axis:
    """``a,b,c`` (a list) or ``low:high`` (log-uniform); a ConfigError names the problem."""
    try:
        if ":" in text:
            low, high = (float(part) for part in text.split(":"))
            if not 0 < low <= high:
                raise ValueError
            return Axis(low=low, high=high)
        values = tuple(float(part) for part in text.split(",") if part.strip())
        if not values or any(v < 0 or (positive and v == 0) for v in values):
            raise ValueError
        return Axis(values=values)
    except ValueError:
        raise ConfigError(
            f"--{name} {text!r}: give a comma-separated list of "
            f"{'positive' if positive else 'non-negative'} numbers (1e-4,1e-3) or a log-uniform "
            "range low:high with 0 < low <= high (1e-5:1e-2)"
        ) from None


@dataclass(frozen=True)
class TuneOptions:
    candidates: int = 8
    rungs: int = 3
    steps: int = 20
    """Steps of the first rung; rung ``r`` trains its survivors to ``steps * eta**r``."""
    eta: int = 2
    """Keep ``ceil(n / eta)`` candidates per rung."""
    lr: Axis = field(default_factory=Axis)
    eps: Axis = field(default_factory=Axis)
    scale: tuple[str, ...] = ()
    """``estimator.scale`` values to try; empty: the config's own."""
    seed: int = 0
    """Seed of the candidates' draw (training uses the config's train.seed for all)."""
    min_improvement: float = 1e-3
    """Relative floor of a 'moved' dev loss, as a fraction of the zero-shot dev loss."""

    def __post_init__(self) -> None:
        for key in ("candidates", "rungs", "steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key} must be >= 1, got {getattr(self, key)}")
        if self.eta < 2:
            raise ConfigError(f"--eta must be >= 2, got {self.eta}")
        if self.min_improvement < 0:
            raise ConfigError(f"--min-improvement must be >= 0, got {self.min_improvement}")

    def rung_steps(self, rung: int) -> int:
        return self.steps * self.eta**rung

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(lr=self.lr.to_dict(), eps=self.eps.to_dict(), scale=list(self.scale))
        return data


def draw_candidates(config: RunConfig, options: TuneOptions) -> list[dict[str, Any]]:
    """The candidates' estimator settings: the product of the lists when every axis is a
    list, else ``options.candidates`` draws (log-uniform on ranges) from ``options.seed``."""
    from zo.train import resolve_estimator

    _, resolved = resolve_estimator(config)
    section = to_dict(resolved)
    lr = options.lr if options.lr.values or options.lr.is_range() else _around(section, "lr")
    axes = {"lr": lr}
    if options.eps.values or options.eps.is_range():
        axes["eps"] = options.eps
    elif "eps" in section:
        axes["eps"] = Axis(values=(section["eps"],))
    if options.scale:
        axes["scale"] = Axis(values=options.scale)
    if not any(axis.is_range() for axis in axes.values()):
        combos: list[dict[str, Any]] = [{}]
        for key, axis in axes.items():
            combos = [{**c, key: v} for c in combos for v in axis.values]
        return combos
    rng = random.Random(options.seed)
    return [{key: axis.draw(rng) for key, axis in axes.items()} for _ in range(options.candidates)]


def _around(section: dict[str, Any], key: str) -> Axis:
    value = float(section.get(key) or 0.0)
    if value <= 0:
        raise ConfigError(f"estimator.{key} is not set in the config: give --{key}")
    return Axis(low=value / 10, high=value * 10)


# ---------------------------------------------------------------------------- dev loss


@dataclass
class DevLoss:
    """Per-batch dev losses of the base model, and the trained tensors' on the same batches."""

    setup: Any
    batches: list[list]
    base_state: dict[str, torch.Tensor]

    @classmethod
    def build(cls, config: RunConfig) -> DevLoss:
        from zo.train import build_setup

        setup = build_setup(config)
        examples = setup.task.load("dev")[: config.task.eval_limit]
        size = config.train.batch_size
        batches = [examples[i : i + size] for i in range(0, len(examples), size)]
        if not batches:
            raise ConfigError("the task's dev split is empty: zo tune ranks by dev loss")
        state = {k: v.detach().clone() for k, v in setup.trainable.state_dict().items()}
        return cls(setup, batches, state)

    def losses(self, tensors: dict[str, torch.Tensor] | None = None) -> list[float]:
        from tasks.objectives import objective_closure

        setup = self.setup
        setup.trainable.load_state_dict(tensors if tensors is not None else self.base_state)
        try:
            with torch.no_grad():
                return [
                    float(
                        objective_closure(
                            setup.model,
                            setup.tokenizer,
                            setup.task,
                            batch,
                            max_length=setup.config.task.max_length,
                        )()
                    )
                    for batch in self.batches
                ]
        finally:
            setup.trainable.load_state_dict(self.base_state)

    def of_run(self, path: Path) -> list[float]:
        return self.losses(RunDirectory(path).load_checkpoint(self.setup.device).tensors)


def improvement(base: Sequence[float], losses: Sequence[float], min_relative: float) -> dict:
    """Paired improvement over the zero-shot dev loss, its noise, and whether it moved."""
    n = len(base)
    zero_shot = sum(base) / n
    if not all(math.isfinite(v) for v in losses):
        return {"improvement": -math.inf, "noise": math.inf, "moved": False}
    diffs = [b - c for b, c in zip(base, losses, strict=True)]
    mean = sum(diffs) / n
    spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.inf
    noise = max(2 * spread / math.sqrt(n), min_relative * abs(zero_shot))
    return {"improvement": mean, "noise": noise, "moved": mean > noise}


# ---------------------------------------------------------------------------- the search


@dataclass
class TuneResult:
    state: dict[str, Any]
    winner: str | None
    best_yaml: Path | None
    table: str

    @property
    def flat(self) -> bool:
        return self.winner is None


def tune(
    config: RunConfig,
    out: str | Path,
    options: TuneOptions,
    log: Callable[[str], None] = print,
    train_fn: Callable[..., dict[str, Any]] | None = None,
) -> TuneResult:
    """Successive halving as the module doc says; resumes what ``out`` already holds."""
    from zo.train import train as default_train

    train_fn = train_fn or default_train
    out = Path(out)
    _check_config(config)
    with _locked(out):
        state = _load_or_start(out, config, options)
        dev = DevLoss.build(config)
        if state.get("zero_shot") is None:
            base = dev.losses()
            state["zero_shot"] = {"batch_losses": base, "dev_loss": sum(base) / len(base)}
            _save(out, state)
        log(f"zero-shot dev loss {state['zero_shot']['dev_loss']:.4f} ({len(dev.batches)} batches)")
        entrants = [c["name"] for c in state["candidates"]]
        for rung in range(options.rungs):
            steps = options.rung_steps(rung)
            results = state["rungs"].setdefault(str(rung), {})
            for name in entrants:
                if name not in results:
                    results[name] = _run_candidate(config, out, state, name, steps, dev, train_fn)
                    _save(out, state)
                    log(_line(rung, name, state, results[name]))
            ranked = sorted(entrants, key=lambda n: (_sort_key(results[n]), n))
            entrants = ranked[: max(1, math.ceil(len(ranked) / options.eta))]
        final = state["rungs"][str(options.rungs - 1)]
        winner = choose_winner(final)
        best = min(final, key=lambda n: (_sort_key(final[n]), n))
        if winner is not None and winner != best:
            log(
                f"{best} has the lowest dev loss ({_sort_key(final[best]):.4f}) but its "
                f"improvement is within noise ({final[best]['improvement']:+.4f}, noise "
                f"{final[best]['noise']:.4f}); the winner is the best candidate that moved: "
                f"{winner}"
            )
        state["winner"] = winner
        _save(out, state)
        table = write_table(out, state)
        plot_candidates(out, state)
        best_yaml = _write_best(out, config, state, winner) if winner else None
        if best_yaml is None:
            (out / "best.yaml").unlink(missing_ok=True)  # a stale one would lie
        return TuneResult(state, winner, best_yaml, table)


def choose_winner(final: dict[str, dict[str, Any]]) -> str | None:
    """The candidate of the last rung with the lowest dev loss among those that moved it
    beyond noise (a lower but noisy loss is not evidence), or None when none moved."""
    moved = [name for name, result in final.items() if result.get("moved")]
    return min(moved, key=lambda n: (_sort_key(final[n]), n)) if moved else None


def _check_config(config: RunConfig) -> None:
    if config.train.lr_schedule != "constant":
        raise ConfigError(
            "zo tune continues each candidate's run from rung to rung, which a schedule over "
            f"train.steps would change; set train.lr_schedule=constant (got "
            f"{config.train.lr_schedule!r}) and add the schedule to best.yaml after tuning"
        )
    if config.resume:
        raise ConfigError("resume=true is not a tune setting: run zo tune again on --out to resume")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".tune.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another zo tune is running on {out}; wait for it") from None
        yield


def _settings(config: RunConfig, options: TuneOptions) -> dict[str, Any]:
    data = to_dict(config)
    data["train"].pop("out")  # where a plain run would go: not used by the tune
    data["train"].pop("progress")
    return {"config": data, "options": options.to_dict()}


def _load_or_start(out: Path, config: RunConfig, options: TuneOptions) -> dict[str, Any]:
    path = out / "tune.json"
    settings = _settings(config, options)
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error}); it cannot be resumed") from None
        if state.get("format") != TUNE_FORMAT:
            raise ConfigError(f"{path} has tune format {state.get('format')!r}, not {TUNE_FORMAT}")
        if json.loads(json.dumps(settings)) != state["settings"]:
            changed = [
                k
                for k in settings
                if json.loads(json.dumps(settings[k])) != state["settings"].get(k)
            ]
            raise ConfigError(
                f"{out} holds a tune with other settings ({', '.join(changed)} differ); "
                "rerun with the same config and options to resume it, or choose another --out"
            )
        return state
    if any(p.name != ".tune.lock" for p in out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no tune.json; choose another --out")
    candidates = [
        {"name": f"cand-{i:02d}", **values}
        for i, values in enumerate(draw_candidates(config, options))
    ]
    from zo.train import resolve_estimator

    for candidate in candidates:  # an estimator without eps or scale fails here, not mid-tune
        resolve_estimator(candidate_config(config, candidate, out / candidate["name"], 1, False))
    state = {"format": TUNE_FORMAT, "settings": settings, "candidates": candidates, "rungs": {}}
    _save(out, state)
    return state


def _save(out: Path, state: dict[str, Any]) -> None:
    atomic_write_text(out / "tune.json", json.dumps(state, indent=1) + "\n")


def candidate_config(
    config: RunConfig, candidate: dict[str, Any], path: Path, steps: int, resume: bool
) -> RunConfig:
    data = to_dict(config)
    data["estimator"].update({k: v for k, v in candidate.items() if k != "name" and v is not None})
    data["train"].update(
        out=str(path), steps=steps, eval_before=False, eval_every=0, progress=False
    )
    data["resume"] = resume
    return config_from_data(data)


def _run_candidate(config, out, state, name, steps, dev: DevLoss, train_fn) -> dict[str, Any]:
    candidate = next(c for c in state["candidates"] if c["name"] == name)
    path = out / name
    run = RunDirectory(path)
    done = run.load_checkpoint().step if run.holds_run() and run.has_checkpoint() else 0
    result: dict[str, Any] = {"steps": steps}
    if done < steps:
        try:
            summary = train_fn(
                candidate_config(config, candidate, path, steps, run.holds_run()), log=_quiet
            )
            result["dev_metric"] = summary.get("final_score")
            result["train_loss"] = summary.get("final_loss")
        except FloatingPointError as error:  # a diverging candidate loses, the tune goes on
            result.update(status="diverged", error=str(error))
            result.update(dev_loss=math.inf, improvement=-math.inf, noise=None, moved=False)
            return result
    losses = dev.of_run(path)
    result["batch_losses"] = losses
    result["dev_loss"] = sum(losses) / len(losses)
    result.update(improvement(state["zero_shot"]["batch_losses"], losses, _min_improvement(state)))
    result["status"] = "ok"
    return result


def _min_improvement(state: dict[str, Any]) -> float:
    return float(state["settings"]["options"]["min_improvement"])


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def _sort_key(result: dict[str, Any]) -> float:
    value = result.get("dev_loss", math.inf)
    return value if value is not None and math.isfinite(value) else math.inf


def _line(rung: int, name: str, state: dict[str, Any], result: dict[str, Any]) -> str:
    candidate = next(c for c in state["candidates"] if c["name"] == name)
    settings = " ".join(f"{k}={_fmt(v)}" for k, v in candidate.items() if k != "name")
    if result.get("status") == "diverged":
        return f"rung {rung} {name} {settings}: diverged"
    moved = "moved" if result["moved"] else "flat"
    return (
        f"rung {rung} {name} {settings}: {result['steps']} steps, dev loss "
        f"{result['dev_loss']:.4f} ({moved}: {result['improvement']:+.4f}, noise {result['noise']:.4f})"
    )


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------- outputs

COLUMNS = (
    "candidate",
    "lr",
    "eps",
    "scale",
    "rung",
    "steps",
    "dev_loss",
    "improvement",
    "noise",
    "moved",
    "dev_metric",
    "status",
)


def table_rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate: its last rung's result; the winner first, then by rung and loss."""
    rows = []
    for candidate in state["candidates"]:
        name = candidate["name"]
        rungs = [int(r) for r, results in state["rungs"].items() if name in results]
        if not rungs:
            continue
        last = max(rungs)
        result = state["rungs"][str(last)][name]
        status = "winner" if name == state.get("winner") else result.get("status", "ok")
        rows.append(
            {
                "candidate": name,
                "lr": candidate.get("lr"),
                "eps": candidate.get("eps"),
                "scale": candidate.get("scale", ""),
                "rung": last,
                "steps": result["steps"],
                "dev_loss": result.get("dev_loss"),
                "improvement": result.get("improvement"),
                "noise": result.get("noise"),
                "moved": result.get("moved"),
                "dev_metric": result.get("dev_metric"),
                "status": status,
            }
        )
    rows.sort(key=lambda r: (r["status"] != "winner", -r["rung"], _sort_key(r), r["candidate"]))
    return rows


def write_table(out: Path, state: dict[str, Any]) -> str:
    rows = table_rows(state)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "candidates.csv", buffer.getvalue())
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_candidates(out: Path, state: dict[str, Any]) -> Path:
    """candidates.png: each candidate's dev loss by steps (rung by rung), zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    zero_shot = state["zero_shot"]["dev_loss"]
    axis.axhline(zero_shot, color="gray", linestyle="--", label="zero-shot")
    for candidate in state["candidates"]:
        name = candidate["name"]
        points = sorted(
            (r[name]["steps"], r[name]["dev_loss"])
            for r in state["rungs"].values()
            if name in r
            and r[name].get("dev_loss") is not None
            and math.isfinite(r[name]["dev_loss"])
        )
        if not points:
            continue
        winner = name == state.get("winner")
        settings = " ".join(f"{k}={_fmt(v)}" for k, v in candidate.items() if k != "name")
        axis.plot(
            [0] + [p[0] for p in points],
            [zero_shot] + [p[1] for p in points],
            marker="o",
            linewidth=2.5 if winner else 1,
            label=f"{name} {settings}" + (" (winner)" if winner else ""),
        )
    axis.set_xlabel("training steps")
    axis.set_ylabel("dev loss")
    axis.legend(fontsize=6)
    figure.tight_layout()
    path = out / "candidates.png"
    tmp = out / ".candidates.tmp.png"
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
    return path


def _write_best(out: Path, config: RunConfig, state: dict[str, Any], winner: str) -> Path:
    candidate = next(c for c in state["candidates"] if c["name"] == winner)
    data = to_dict(config)
    data["estimator"].update({k: v for k, v in candidate.items() if k != "name" and v is not None})
    data["train"]["out"] = str(out / "best")
    best = config_from_data(data)
    result = state["rungs"][str(max(int(r) for r in state["rungs"]))][winner]
    settings = ", ".join(f"{k}={_fmt(v)}" for k, v in candidate.items() if k != "name")
    header = (
        f"# zo tune winner {winner} ({settings}): dev loss {result['dev_loss']:.4f} after "
        f"{result['steps']} steps\n# (zero-shot {state['zero_shot']['dev_loss']:.4f}); "
        f"train it with: zo train --config {out / 'best.yaml'}\n"
    )
    path = out / "best.yaml"
    atomic_write_text(path, header + dump_yaml(best))
    return path
