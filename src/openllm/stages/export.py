"""Stage ``export``: one checkpoint -> ``models/export/step-N`` (ONNX with KV cache, checked, registered)."""

from __future__ import annotations

import sys

from ..config import load_params
from ..export import export_checkpoint, validation_tokens
from ..paths import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_DIR, TOKENIZED_DIR, evaluation_path, step_folder
from . import stage_main


def run(args) -> None:
    params = load_params(args.params)
    checkpoint, out = step_folder(CHECKPOINTS_DIR, args.step), step_folder(EXPORT_DIR, args.step)
    report = export_checkpoint(
        checkpoint, out, params.export, params.evaluate.sampling, params.mlflow,
        eval_tokens=validation_tokens(TOKENIZED_DIR, checkpoint),
        metrics_path=evaluation_path(METRICS_DIR, args.step),
    )
    extras = [f"max |logit diff| {report['verification']['max_abs_diff_logits']:.1e}"]
    if "int8" in report:
        extras.append(f"int8 {report['int8']['decode_speedup']:.2f}x faster, "
                      f"{report['int8']['bits_per_byte_change']:+.4f} bits/byte")
    if "mlflow" in report:
        extras.append(f"registered {report['mlflow']['registered_model']} v{report['mlflow']['version']}")
    print(f"step-{args.step}: " + ", ".join(extras) + f" -> {out}")


main = stage_main(run, __doc__, step=True)

if __name__ == "__main__":
    sys.exit(main())
