"""Studies at a fixed compute budget: one cell of a grid trained for its FLOPs, then scored.

A cell is one point of the grid: a budget in training FLOPs, a model shape (``n_layer``,
``n_embd``) and the optimizer, peak learning rate, schedule and batch size. The budget is model
FLOPs, not seconds: a cell trains ``floor(budget / (flops_per_token x batch x context))`` steps,
``flops_per_token`` from :meth:`GPT.estimate_flops_per_token`, so the same cell takes the same
steps on any machine, however loaded, and DVC can cache it. Wall-clock time is measured and sent
to MLflow, never into the cell's result.

Training calls the train stage's own pieces (:func:`~openllm.train.train_step`,
:class:`~openllm.train.TrainingState`, the window sampler, :class:`~openllm.schedule.Schedule`,
:func:`~openllm.optim.build_optimizer`); scoring is the evaluate stage's: consecutive windows of
``context_length`` tokens over the validation split, stride ``context_length``, every token but
the first predicted once, bits per byte from :func:`~openllm.scoring.language_metrics`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

from .config import ConfigError, ModelConfig, Section, TrainConfig
from .fileio import read_json
from .levers import parse_levers

TERA = 1e12
CELL_AXES = ("tflops", "n_layer", "n_embd", "optimizer", "learning_rate", "schedule", "batch_size")
GRID_LEVERS = {"max_steps", "checkpoint_steps", "optimizer", "learning_rate", "min_learning_rate", "schedule",
               "batch_size", "ema_decay", "window_start"}  # set per cell, not in the shared train settings


class StudyError(ConfigError):
    """A study setting cannot work (budget too small for the warmup, unknown key, ...)."""


class ShapeConfig(Section):
    """What every cell's model shares; ``n_layer`` and ``n_embd`` come from the grid."""

    context_length: int = Field(256, gt=1, description="tokens the model attends over (also the scoring window)")
    head_dim: int = Field(32, gt=0, description="width of one attention head: n_head = n_embd / head_dim")
    mlp_ratio: float = Field(2.75, gt=0, description="SwiGLU width: intermediate_size = round(mlp_ratio x n_embd)")


class ScoreConfig(Section):
    batch_size: int = Field(8, gt=0, description="validation windows per forward pass")
    max_tokens: int | None = Field(None, gt=1, description="score only the first N validation tokens; null = all")
    sliding_stride: float | None = Field(
        None, gt=0, le=1, description="also score with overlapping windows a fraction of the context apart, as "
                                      "evaluate.sliding_stride does (e.g. 0.5); null = only consecutive windows")


Positive = Annotated[int | float, Field(gt=0)]
Count = Annotated[int, Field(gt=0)]


class GridConfig(Section):
    """The grid: every combination of these lists is a cell (a DVC ``matrix`` stage)."""

    # int | float: a cell's name is its values as written (6, not 6.0), as DVC's stage names are
    tflops: list[Positive] = Field(min_length=1, description="training budget per cell, 10^12 model FLOPs")
    n_layer: list[Count] = Field(min_length=1, description="transformer blocks")
    n_embd: list[Count] = Field(min_length=1, description="width of the residual stream")
    optimizer: list[Literal["adamw", "muon"]] = Field(min_length=1)
    learning_rate: list[Positive] = Field(min_length=1, description="peak learning rates")
    schedule: list[Literal["wsd", "cosine"]] = Field(min_length=1)
    batch_size: list[Count] = Field(min_length=1, description="sequences per optimizer step")
    levers: list[str] = Field(  # required: dvc.yaml's lever stage reads it, [] included
        description="research levers: each entry adds a cell to every combination above, e.g. 'qk_norm', "
                    "'ema_decay=0.999' or 'mlp=relu2+logit_softcap=15'; [] = none (README, 'Research levers')")

    @field_validator("levers")
    @classmethod
    def _levers_parse(cls, value: list[str]) -> list[str]:
        for spec in value:
            parse_levers(spec)
        if len(set(value)) < len(value):
            raise ValueError(f"grid.levers={value} lists a setting twice")
        return value


class StudyMlflowConfig(Section):
    experiment: str = Field("openllm-studies", min_length=1, description="MLflow experiment of the study runs")
    study: str = Field("budget", min_length=1, description="name of the study run (its cells are child runs)")


class StudyConfig(Section):
    model: ShapeConfig = ShapeConfig()
    train: dict[str, Any] = Field({}, description="TrainConfig fields every cell shares (not the grid's levers)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate / peak")
    score: ScoreConfig = ScoreConfig()
    grid: GridConfig | None = Field(None, description="required in a study's params.yaml (load_study checks)")
    mlflow: StudyMlflowConfig = StudyMlflowConfig()

    def digest(self, data_sha256: str) -> str:
        """sha256 of everything cells share (not the grid): equal digests, one study run."""
        shared = self.model_dump(include={"model", "train", "min_lr_ratio", "score"}) | {"data": data_sha256}
        return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Cell:
    tflops: int | float
    n_layer: int
    n_embd: int
    optimizer: str
    learning_rate: int | float
    schedule: str
    batch_size: int
    levers: str = ""  # one entry of grid.levers; "" = none, the default model and training

    @property
    def name(self) -> str:
        """The values joined by '-', in grid order: the name DVC gives the cell's stage (``cell@<name>``,
        or ``lever@<name>`` with the levers last)."""
        return "-".join(str(getattr(self, axis)) for axis in CELL_AXES) + (f"-{self.levers}" if self.levers else "")

    def to_dict(self) -> dict[str, Any]:
        """The cell's values (``levers`` only when set, so a lever-free cell's result is what it was)."""
        return {k: v for k, v in asdict(self).items() if k != "levers" or v}


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study's params.yaml; a bad value raises :class:`StudyError` naming it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        study = StudyConfig.model_validate(raw if raw is not None else {})
    except FileNotFoundError:
        raise StudyError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: invalid YAML: {exc}") from None
    except ValidationError as exc:
        by_field = {_describe(e).split("=")[0]: _describe(e) for e in exc.errors()}  # int | float: one line
        raise StudyError(f"{path}: " + "; ".join(by_field.values())) from None
    if study.grid is None:
        raise StudyError(f"{path}: 'grid' is required (the lists whose combinations are the cells)")
    levers = sorted(GRID_LEVERS & set(study.train))
    if levers:
        raise StudyError(f"{path}: train.{levers[0]} is set per cell (grid or budget), not in train")
    try:
        TrainConfig(**study.train)
    except ValidationError as exc:
        raise StudyError(f"{path}: " + "; ".join(_describe(e, "train.") for e in exc.errors())) from None
    return study


def _describe(error: dict[str, Any], prefix: str = "") -> str:
    """One pydantic error as ``field=value: rule``."""
    field = ".".join(str(part) for part in error["loc"] if part not in ("int", "float"))  # union branches
    value = "" if error["type"] == "missing" else f"={error.get('input')!r}"  # not the whole enclosing dict
    return f"{prefix}{field}{value}: {error['msg']}"


def grid_cells(grid: GridConfig) -> list[Cell]:
    """Every combination of the grid's lists, in the order DVC's ``matrix`` runs them: the ``cell``
    stage's, then the ``lever`` stage's (each combination again with each entry of ``grid.levers``)."""
    combinations = list(itertools.product(*(getattr(grid, axis) for axis in CELL_AXES)))
    return [Cell(*values) for values in combinations] + [
        Cell(*values, levers=levers) for values in combinations for levers in grid.levers]


def model_config(study: StudyConfig, cell: Cell, vocab_size: int):
    """The cell's :class:`~openllm.model.GPTConfig`; an impossible shape raises :class:`StudyError`."""
    from .model import GPTConfig

    if cell.n_embd % study.model.head_dim:
        raise StudyError(f"n_embd={cell.n_embd} must be a multiple of model.head_dim={study.model.head_dim}")
    shape = {"n_layer": cell.n_layer, "n_embd": cell.n_embd, "n_head": cell.n_embd // study.model.head_dim,
             "intermediate_size": round(study.model.mlp_ratio * cell.n_embd),
             "context_length": study.model.context_length}
    levers = parse_levers(cell.levers)["model"] if cell.levers else {}
    try:
        return GPTConfig(vocab_size=vocab_size, **ModelConfig(**shape).resolved(), **levers)
    except ValidationError as exc:
        raise StudyError(f"cell {cell.name}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    except ValueError as exc:
        raise StudyError(f"cell {cell.name}: {exc}") from None


def budget_steps(cell: Cell, flops_per_token: int, context: int) -> int:
    """Optimizer steps the cell's budget buys: whole steps, never more FLOPs than the budget."""
    return int(cell.tflops * TERA // (flops_per_token * cell.batch_size * context))


def train_config(study: StudyConfig, cell: Cell, steps: int) -> TrainConfig:
    """The shared train settings with the cell's levers and its step count."""
    if steps <= study.train.get("warmup_steps", TrainConfig().warmup_steps):
        raise StudyError(f"cell {cell.name}: its budget of {cell.tflops} TFLOPs buys {steps} steps, not more than "
                         "the warmup (raise grid.tflops or lower train.warmup_steps)")
    levers = parse_levers(cell.levers)["train"] if cell.levers else {}
    try:
        # every lever off unless the cell turns it on (params.yaml's defaults turn the average on)
        return TrainConfig(**({"ema_decay": None} | study.train | levers), max_steps=steps, checkpoint_steps=[steps], optimizer=cell.optimizer,
                           learning_rate=cell.learning_rate, min_learning_rate=cell.learning_rate * study.min_lr_ratio,
                           schedule=cell.schedule, batch_size=cell.batch_size)
    except ValidationError as exc:
        raise StudyError(f"cell {cell.name}: " + "; ".join(_describe(e, "train.") for e in exc.errors())) from None


class CellTrainer:
    """One cell's model, optimizer, data and schedule, stepped by the train stage's ``train_step``.

    ``steps`` defaults to what the cell's budget buys; a caller with another budget (wall-clock
    time, in bench/budget.py) passes its own and may replace ``schedule``.
    """

    def __init__(self, study: StudyConfig, cell: Cell, tokenized_dir: Path, steps: int | None = None):
        import torch

        from .device import resolve_device
        from .ema import WeightAverage
        from .model import GPT
        from .optim import build_optimizer
        from .schedule import Schedule
        from .tokenizer import load_tokens
        from .train import TrainingState
        from .windows import WindowSampler

        self.tokenized_dir = Path(tokenized_dir)
        self.meta = read_json(self.tokenized_dir / "meta.json")
        self.config = model_config(study, cell, self.meta["vocab_size"])
        self.flops_per_token = GPT(self.config).estimate_flops_per_token()  # a throwaway; the real one is seeded
        context = self.config.context_length
        cfg = self.cfg = train_config(study, cell, budget_steps(cell, self.flops_per_token, context)
                                      if steps is None else steps)
        self.setup = resolve_device(cfg.device, cfg.precision, cfg.compile, cfg.deterministic, distributed=False)
        torch.manual_seed(cfg.seed)
        self.model = self.forward = GPT(self.config).to(self.setup.device).train()
        self.sampler = WindowSampler(load_tokens(self.tokenized_dir, "train"), context, cfg.seed, cfg.window_start)
        ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.state = TrainingState(build_optimizer(self.model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay,
                                                   (cfg.beta1, cfg.beta2)), self.sampler, ema)
        self.schedule = Schedule.from_config(cfg)

    def compile(self) -> None:
        """torch.compile the model now (when the settings ask for it), as the train stage does."""
        import torch

        from .device import compile_model

        if self.setup.compile:
            x, _ = self.sampler.batch(torch.zeros(self.cfg.batch_size, dtype=torch.long), self.setup.device)
            self.forward = compile_model(self.model, x, self.setup, required=self.cfg.compile == "true")

    def step(self) -> float:
        """One update at the schedule's rate; return the loss (a non-finite one does not count as a step)."""
        from .train import train_step

        progress = self.state.progress
        batch = self.sampler.batch(self.sampler.next_starts(self.cfg.batch_size), self.setup.device)
        loss, _ = train_step(self.forward, self.model, self.state.optimizer, [batch], self.schedule.lr(progress.step),
                             self.cfg.grad_clip, self.setup)
        if math.isfinite(loss):
            progress.step += 1
            progress.tokens_seen += self.cfg.batch_size * self.config.context_length
            progress.last_train_loss = loss
            if self.state.ema is not None:
                self.state.ema.update(progress.step)
        return loss

    def score(self, cfg: ScoreConfig) -> dict[str, Any]:
        """Bits per byte of the trained weights, or of their average with ``ema_decay``."""
        with self.state.ema.applied() if self.state.ema is not None else contextlib.nullcontext():
            return score_validation(self.model, self.tokenized_dir, self.meta, cfg, self.setup)


def run_cell(study: StudyConfig, cell: Cell, tokenized_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Train one cell for its budget and score it: ``(result, timings)``.

    The result holds only what a rerun on the same machine reproduces; timings go to MLflow.
    """
    trainer = CellTrainer(study, cell, tokenized_dir)
    progress = trainer.state.progress
    started = time.perf_counter()  # compiling counts: it is part of what a cell costs
    trainer.compile()
    diverged = False
    while progress.step < trainer.cfg.max_steps and not diverged:
        diverged = not math.isfinite(trainer.step())  # a lever that diverges is a result, not an error
    train_seconds = time.perf_counter() - started
    scores = trainer.score(study.score)
    result = {
        "cell": cell.to_dict(), "name": cell.name, "model": trainer.config.to_dict(),
        "parameters": trainer.model.num_parameters(), "flops_per_token": trainer.flops_per_token,
        "steps": progress.step, "tokens": progress.tokens_seen,
        "train_flops": trainer.flops_per_token * progress.tokens_seen,
        "budget_flops": cell.tflops * TERA, "warmup_steps": trainer.cfg.warmup_steps,
        "train_loss": progress.last_train_loss if progress.step else None, "diverged": diverged,
        "precision": trainer.setup.precision_name, "data_sha256": trainer.meta["train"]["sha256"],
        **(scores if not diverged else {"val_protocol": scores["val_protocol"]}),
    }
    return result, {"train_seconds": train_seconds,
                    "train_tokens_per_second": progress.tokens_seen / max(train_seconds, 1e-9)}


def score_validation(model, tokenized_dir: Path, meta: dict[str, Any], cfg: ScoreConfig, setup) -> dict[str, Any]:
    """Bits per byte over the validation split (or its first ``max_tokens``), with the protocol."""
    from .evaluate import token_nats
    from .scoring import language_metrics
    from .tokenizer import load_tokenizer, load_tokens

    tokens, text_bytes = load_tokens(tokenized_dir, "val"), meta["val"]["bytes"]
    capped = cfg.max_tokens is not None and cfg.max_tokens < len(tokens)
    if capped:
        tokens = np.asarray(tokens[: cfg.max_tokens])
        text_bytes = len(load_tokenizer(tokenized_dir / meta["tokenizer"]).decode(tokens.tolist()).encode("utf-8"))
    context = model.config.context_length
    stride = max(1, round(context * cfg.sliding_stride)) if cfg.sliding_stride else None
    model.eval()
    with setup.autocast():
        total, count = token_nats(model, tokens, cfg.batch_size)
        sliding = token_nats(model, tokens, cfg.batch_size, stride=stride)[0] if stride else None
    figures = language_metrics(total, count, text_bytes)
    scope = "first " + str(len(tokens)) if capped else "all"
    return {"val_bits_per_byte": figures["bits_per_byte"], "val_loss": figures["loss"], "val_tokens": count,
            "val_bytes": text_bytes, "val_protocol": {"window": context, "stride": context, "tokens": scope},
            **({} if stride is None else {
                "val_bits_per_byte_sliding": language_metrics(sliding, count, text_bytes)["bits_per_byte"],
                "val_sliding_protocol": {"window": context, "stride": stride, "tokens": scope}})}


# --- MLflow: one study run, a child run per cell ---------------------------------------------------


def study_run_id(mlflow, study: StudyConfig, data_sha256: str) -> str:
    """The study's parent run (found by its digest, else created): cells of one setup share it."""
    from .tracking import flatten

    digest = study.digest(data_sha256)
    found = mlflow.search_runs(filter_string=f"tags.`openllm.study_digest` = '{digest}'", max_results=1,
                               output_format="list")
    if found:
        return found[0].info.run_id
    tags = {"openllm.study": study.mlflow.study, "openllm.study_digest": digest}
    with mlflow.start_run(run_name=f"{study.mlflow.study}-{digest[:7]}", tags=tags) as run:
        mlflow.log_params(flatten(study.model_dump(exclude={"grid", "mlflow"}), "shared."))
        return run.info.run_id


def log_cell(study: StudyConfig, result: dict[str, Any], timings: dict[str, float]) -> str:
    """Log a cell as a child run of the study run; return the child's run id."""
    from . import tracking

    mlflow = tracking.setup(study.mlflow.experiment)
    parent = study_run_id(mlflow, study, result["data_sha256"])
    tags = tracking.run_tags({"openllm.study": study.mlflow.study, "openllm.cell": result["name"]})
    with mlflow.start_run(run_name=result["name"], parent_run_id=parent, tags=tags) as run:
        mlflow.log_params(result["cell"] | {"parameters": result["parameters"], "steps": result["steps"]})
        figures = {k: result[k] for k in ("val_bits_per_byte", "val_loss", "train_loss", "train_flops") if
                   isinstance(result.get(k), (int, float))}
        mlflow.log_metrics(figures | timings)
        return run.info.run_id


def log_study_files(study: StudyConfig, data_sha256: str, paths: list[Path]) -> str:
    """Attach the table and plots to the study run; return its id."""
    from . import tracking

    mlflow = tracking.setup(study.mlflow.experiment)
    run_id = study_run_id(mlflow, study, data_sha256)
    with mlflow.start_run(run_id=run_id):
        for path in paths:
            mlflow.log_artifact(str(path))
    return run_id



# --- the table and plots, from the cells' result files -----------------------------------------


def collect_results(cells_dir: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """The results of the grid's cells (files of cells no longer in the grid are left out)."""
    rows = []
    for cell in cells:
        path = Path(cells_dir) / f"{cell.name}.json"
        if not path.is_file():
            raise StudyError(f"{path} not found: run the cell's stage (dvc repro) first")
        rows.append(read_json(path))
    return rows


def fit_power_law(x: list[float], y: list[float], min_r2: float = 0.9) -> dict[str, float] | None:
    """``y = a * x**b`` fitted by least squares in log-log space; None when it does not fit.

    It fits when there are at least three distinct ``x`` and the fit explains ``min_r2`` of
    the variance of ``log y``.
    """
    points = [(a, b) for a, b in zip(x, y) if a and b and a > 0 and b > 0 and math.isfinite(b)]
    if len({a for a, _ in points}) < 3:
        return None
    log_x, log_y = np.log([a for a, _ in points]), np.log([b for _, b in points])
    slope, intercept = np.polyfit(log_x, log_y, 1)
    residual = log_y - (intercept + slope * log_x)
    spread = float(np.sum((log_y - log_y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / spread if spread > 0 else 0.0
    return {"a": float(math.exp(intercept)), "b": float(slope), "r2": r2} if r2 >= min_r2 else None


def study_fits(rows: list[dict[str, Any]]) -> dict[str, dict[str, float] | None]:
    """Power laws of bits per byte against parameters (per budget) and against compute (best cell per budget)."""
    scored = [r for r in rows if r.get("val_bits_per_byte") is not None]
    fits: dict[str, dict[str, float] | None] = {}
    for tflops in sorted({r["cell"]["tflops"] for r in scored}):
        same = [r for r in scored if r["cell"]["tflops"] == tflops]
        fits[f"parameters at {tflops:g} TFLOPs"] = fit_power_law([r["parameters"] for r in same],
                                                                  [r["val_bits_per_byte"] for r in same])
    best = {}
    for r in scored:
        key = r["cell"]["tflops"]
        if key not in best or r["val_bits_per_byte"] < best[key]["val_bits_per_byte"]:
            best[key] = r
    fits["compute (best cell per budget)"] = fit_power_law([r["train_flops"] for r in best.values()],
                                                           [r["val_bits_per_byte"] for r in best.values()])
    return fits
