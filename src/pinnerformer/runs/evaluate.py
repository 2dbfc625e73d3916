"""`pinnerformer evaluate`: a run's model scored on its held-out users (`evaluation.evaluate`), into RUN/eval/."""

from __future__ import annotations

from pathlib import Path

from pinnerformer.data.dataset import Dataset
from pinnerformer.evaluation.evaluate import EvaluateOptions, evaluate_model
from pinnerformer.evaluation.protocols import resolve_protocol
from pinnerformer.evaluation.report import EvaluationReport, write_report
from pinnerformer.runs.run_dir import RunDir
from pinnerformer.training import run_files as rf


def evaluate_run(run: RunDir, ds: Dataset, options: EvaluateOptions, log=print
                 ) -> tuple[EvaluationReport, Path, Path]:
    """The report, and where its JSON and Markdown were written (RUN/eval/PROTOCOL-SPLIT[-history-excluded].*)."""
    model = run.load_model(ds, options.checkpoint)
    protocol = resolve_protocol(options.protocol or run.protocol, ds.manifest.clock)
    # held-out users: those of the run's split when it has one (a future-window run), whatever the protocol scored
    held_out = run.held_out_users(options.split) if (run.path / rf.SPLIT).exists() else None
    if held_out is None and protocol == "future-window":
        run.held_out_users(options.split)  # raises: future-window evaluation needs users held out from training
    report = evaluate_model(model, ds, protocol, options, held_out, run=str(run.path.resolve()), log=log)
    js, md = write_report(report, run.path / rf.EVAL)
    return report, js, md
