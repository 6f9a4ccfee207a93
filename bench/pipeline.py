"""End to end: the default `dvc repro` from a clean state, a no-op `dvc repro`, and quality per compute.

Copies the project (the files git tracks or would track) into a fresh folder, runs the default
pipeline there with the same virtual environment, and times it stage by stage. Then, in the
same run, trains the character-level baseline (bench/char_baseline.py: 4 layers, 4 heads, 128
wide, context 64) on the same training split twice: for the same wall-clock time that the
`train` stage took, and by nanoGPT's documented CPU recipe (2,000 iterations of batch 12,
learning rate 1e-3 decaying to 1e-4), timed; and OpenLLM's default settings once more, for the
recipe's time. All are scored on the whole validation split in bits per byte. Also times int8
against fp32 decoding on the final export.

    python bench/pipeline.py --out bench/results/pipeline.json [--keep DIR | --here]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget import params_trainer, train_for  # noqa: E402
from char_baseline import NANOGPT_ITERATIONS, train_and_score, train_recipe  # noqa: E402

from openllm.config import load_params  # noqa: E402
from openllm.fileio import write_json  # noqa: E402
from openllm.perf import cpu_name  # noqa: E402
from openllm.runtime import OnnxGenerator  # noqa: E402
from openllm.sampling import Sampling  # noqa: E402
from openllm.study import ScoreConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def copy_project(dest: Path) -> None:
    """The files of the project that git tracks or would track (no outputs, no .venv)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)  # a clean state: nothing of an earlier run
    shutil.rmtree(dest / "metrics", ignore_errors=True)


def repro(repo: Path, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Run `dvc repro`; return its wall time and the seconds from each stage's start to the next."""
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in process.stdout:
        tail = (tail + [line])[-40:]
        if match := re.search(r"Running stage '([^']+)'", line):
            marks.append((match.group(1), time.perf_counter()))
            print(f"  [{time.perf_counter() - started:7.1f} s] {match.group(1)}", flush=True)
    if process.wait():
        raise SystemExit("dvc repro failed:\n" + "".join(tail))
    finished = time.perf_counter()
    stages = {name: (marks[i + 1][1] if i + 1 < len(marks) else finished) - at for i, (name, at) in enumerate(marks)}
    return finished - started, stages


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline.json"))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    where.add_argument("--here", action="store_true",
                       help="run in this repository itself, which must have no pipeline outputs and no DVC cache "
                            "yet (as after a fresh clone); its outputs and dvc.lock stay, as after `make run`")
    return parser.parse_args()


def prepare_repo(args: argparse.Namespace) -> tuple[Path | None, Path]:
    """The work folder (None with ``--here``) and the repository to run in: a fresh copy, or this one."""
    if args.here:
        # With outputs, or a cache DVC could restore them from, stages would be skipped, not timed.
        if (ROOT / "data" / "raw").exists() or (ROOT / ".dvc" / "cache").exists():
            raise SystemExit("--here needs a clean state: `make clean` and remove .dvc/cache first")
        return None, ROOT
    work = args.keep or Path(tempfile.mkdtemp(prefix="openllm-bench-pipeline-"))
    repo = work / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    copy_project(repo)
    return work, repo


def repro_env(repo: Path) -> dict[str, str]:
    """This venv first on PATH, the repository's own code and MLflow store, a cold compile cache."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               PYTHONPATH=str(repo / "src"), TQDM_DISABLE="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own store
    # A cold torch.compile, as on a fresh machine: no kernels cached by earlier runs.
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="openllm-bench-inductor-")
    return env


def commit_copy(repo: Path, env: dict[str, str]) -> None:
    """Make the copy a git repository of its own (DVC needs one)."""
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=repo, env=env, check=True)


def end_to_end(repo: Path, env: dict[str, str]) -> dict:
    """Seconds of the clean `dvc repro`, of each of its stages and of a second, no-op one."""
    print(f"dvc repro from a clean state in {repo}", flush=True)
    clean_seconds, stages = repro(repo, env)
    started = time.perf_counter()
    noop = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    noop_seconds = time.perf_counter() - started
    assert "Running stage" not in noop.stdout, noop.stdout
    return {"clean_repro_seconds": clean_seconds, "noop_repro_seconds": noop_seconds, "stage_seconds": stages}


def quality(repo: Path, train_seconds: float) -> dict:
    """The last checkpoint's figures against two character-level baselines on the same split: one
    trained for the train stage's wall-clock time, and nanoGPT's documented CPU recipe."""
    train = json.loads((repo / "metrics" / "train.json").read_text())
    vocab_size = json.loads((repo / "data" / "tokenized" / "meta.json").read_text())["vocab_size"]
    evaluations = sorted((repo / "metrics" / "evaluate").glob("step-*.json"),
                         key=lambda p: int(p.stem.removeprefix("step-")))
    final = json.loads(evaluations[-1].read_text())

    print(f"character-level baseline: training for {train_seconds:.0f} s (the train stage's time)", flush=True)
    baseline = train_and_score(train_seconds, repo / "data" / "raw")
    print(f"nanoGPT's CPU recipe: {NANOGPT_ITERATIONS:,} iterations, timed", flush=True)
    recipe = train_recipe(repo / "data" / "raw")
    print(f"OpenLLM with the default settings: training for {recipe['train_seconds']:.0f} s (the recipe's time)",
          flush=True)
    at_recipe_time = openllm_for(repo, recipe["train_seconds"])
    return {
        "openllm": {"preset": load_params(repo / "params.yaml").model.preset, "optimizer": train["optimizer"],
                    "compiled": train["compiled"],
                    "steps": train["steps"], "vocab_size": vocab_size, "parameters": train["parameters"],
                    "train_seconds": train_seconds, "tokens_per_second": train["tokens_seen"] / train_seconds,
                    "checkpoint": final["step"], "val_bits_per_byte": final["val_bits_per_byte"],
                    "val_loss": final["val_loss"]},
        "char_baseline": baseline,
        "bits_per_byte_reduction": 1 - final["val_bits_per_byte"] / baseline["val_bits_per_byte"],
        "nanogpt_recipe": recipe,
        "bits_per_byte_reduction_vs_recipe": 1 - final["val_bits_per_byte"] / recipe["val_bits_per_byte"],
        "train_time_vs_recipe": train_seconds / recipe["train_seconds"],
        "openllm_at_recipe_time": at_recipe_time,
        "bits_per_byte_reduction_vs_recipe_same_time": 1 - at_recipe_time["val_bits_per_byte"] / recipe["val_bits_per_byte"],
    }


def openllm_for(repo: Path, seconds: float) -> dict:
    """The default model and training settings (params.yaml), trained for ``seconds`` with the schedule
    fitted to them (compiling included), scored as the evaluate stage scores a checkpoint."""
    trainer = params_trainer(load_params(repo / "params.yaml"), repo / "data" / "tokenized")
    train_seconds = train_for(trainer, seconds)
    scores = trainer.score(ScoreConfig())
    return {"parameters": trainer.model.num_parameters(), "steps": trainer.state.progress.step,
            "train_seconds": train_seconds, "val_bits_per_byte": scores["val_bits_per_byte"],
            "val_protocol": scores["val_protocol"]}


def decode_seconds(generator: OnnxGenerator, repeats: int = 3) -> float:
    """Seconds of the fastest greedy generation from one token to the full context."""
    greedy = Sampling(temperature=0.0, max_new_tokens=generator.context_length - 1)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        generator.generate_tokens([[generator.eos_id]], greedy)
        times.append(time.perf_counter() - started)
    return min(times)


def int8_figures(repo: Path, step: int) -> dict | None:
    """The int8 model's decode speed (measured here) and quality (from the export's own check)
    against fp32, for the export of ``step``; None without an int8 model."""
    folder = repo / "models" / "export" / f"step-{step}"
    export_json = folder / "export.json"
    if not (export_json.is_file() and "int8" in (exported := json.loads(export_json.read_text()))):
        return None
    i = exported["int8"]
    fp32, int8 = OnnxGenerator.load(folder), OnnxGenerator.load(folder, quantized=True)
    return {"decode_speedup": decode_seconds(fp32) / decode_seconds(int8), "bits_per_byte_change": i["bits_per_byte_change"],
            "relative_change": i["bits_per_byte_change"] / i["bits_per_byte_fp32"],
            "perplexity_change_percent": i["perplexity_change_percent"]}


def main() -> None:
    args = parse_args()
    work, repo = prepare_repo(args)
    env = repro_env(repo)
    if not args.here:
        commit_copy(repo, env)
    timings = end_to_end(repo, env)
    scores = quality(repo, timings["stage_seconds"]["train"])  # train.json holds no timings
    result = {
        "machine": {"platform": platform.platform(), "processor": cpu_name(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "end_to_end": timings,
        "quality": scores,
    }
    if (int8 := int8_figures(repo, scores["openllm"]["checkpoint"])) is not None:
        result["int8"] = int8
    write_json(args.out, result, sort_keys=False)  # keep the order the report prints
    print(json.dumps(result["end_to_end"] | {"quality": result["quality"]["bits_per_byte_reduction"]}, indent=2))
    shutil.rmtree(env["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    if work is not None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
