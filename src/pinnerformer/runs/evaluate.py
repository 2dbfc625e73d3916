"""`pinnerformer evaluate`: a run's model scored on its held-out users (`evaluation.evaluate`), into RUN/eval/."""

from __future__ import annotations

from pathlib import Path

import json

from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.blend import BlendChoice, BlendConfig, check_blend_applies, choose_weight, fit_knn
from pinnerformer.evaluation.evaluate import EvaluateOptions, evaluate_model
from pinnerformer.evaluation.protocols import resolve_protocol
from pinnerformer.evaluation.report import EvaluationReport, write_report
from pinnerformer.io import write_json_atomic, portable_path
from pinnerformer.objectives.teacher_distillation import Teacher
from pinnerformer.runs.run_dir import RunDir, config_diffs
from pinnerformer.training import run_files as rf
from pinnerformer.training.config import TrainConfig
from pinnerformer.training.retrieval import fitted_max_len


BLEND = "blend.json"  # RUN/blend.json: the blend's λ as chosen on validation for a checkpoint (evaluation.blend)


def blend_path(run: RunDir, exclude_history: bool) -> Path:
    """Where the λ for one protocol is kept: blend.json under the protocol the run was selected with
    (eval.exclude_history), blend-history-in.json / blend-history-removed.json under the other."""
    if exclude_history == run.config.eval.exclude_history:
        return run.path / BLEND
    return run.path / f"blend-history-{'removed' if exclude_history else 'in'}.json"


def evaluate_run(run: RunDir, ds: Dataset, options: EvaluateOptions, log=print, blend: BlendConfig | None = None,
                 progress: bool = False, blend_from: RunDir | None = None) -> tuple[EvaluationReport, Path, Path]:
    """The report, and where its JSON and Markdown were written (RUN/eval/PROTOCOL-SPLIT[-history-excluded].*).
    blend: the item-kNN blend's settings (default: the run's `blend` section); when on, λ is chosen on validation
    for the checkpoint evaluated, under the protocol scored (history in the ranking or removed: where users come
    back to their own items, the neighbours rank those and the best λ differs), or read from where it was kept
    (`blend_path`) when chosen for the same checkpoint, data and settings. blend_from (a refit only): the run it
    repeats, whose λ (chosen on that run's validation) the refit is blended with (`carried_blend`); without it a
    refit is scored as the network alone. progress: bars over the rows scored (the λ grid's, then the report's)."""
    model = run.load_model(ds, options.checkpoint)
    protocol = resolve_protocol(options.protocol or run.protocol, ds.manifest.clock)
    # held-out users: those of the run's split when it has one (a future-window run), whatever the protocol scored
    held_out = run.held_out_users(options.split) if (run.path / rf.SPLIT).exists() else None
    if held_out is None and protocol == "future-window":
        run.held_out_users(options.split)  # raises: future-window evaluation needs users held out from training
    choice, refit = None, run.config.eval.refit_epochs is not None
    if not refit and blend_from is not None:
        raise PinnerformerError(f"--blend-from: {portable_path(run.path)} is not a refit (eval.refit_epochs); its "
                                "blend's λ is chosen on its own validation")
    if refit and blend_from is not None:
        if blend is not None and not blend.item_knn:
            raise PinnerformerError("--blend-from blends the refit with the item-kNN neighbours: it contradicts "
                                    "--no-item-knn")
        blend = (run.config.blend if blend is None else blend).model_copy(update={"item_knn": True})
        check_blend_applies(protocol, held_out)
        choice = carried_blend(run, blend_from, ds, blend, log, progress, options.exclude_history)
    elif refit:  # trained on the validation targets: λ cannot be chosen on them
        if blend is not None and blend.item_knn:
            raise PinnerformerError(f"{portable_path(run.path)} is a refit (eval.refit_epochs): it trained on the "
                                    "validation targets, so the item-kNN blend's λ cannot be chosen on them; score "
                                    "it as the network alone (--no-item-knn), or blend it with the λ the run it "
                                    "repeats chose (--blend-from RUN)")
        if run.config.blend.item_knn and blend is None:
            log("a refit (eval.refit_epochs): scored as the network alone (no validation left to choose the blend's "
                "λ on; --blend-from RUN carries over the λ of the run it repeats)")
    else:
        blend = run.config.blend if blend is None else blend
        if blend.item_knn:
            check_blend_applies(protocol, held_out)
            choice = blend_choice(run, ds, model, options.checkpoint, blend, log, progress, options.exclude_history)
    report = evaluate_model(model, ds, protocol, options, held_out, run=portable_path(run.path), log=log,
                            blend=choice, progress=progress)
    js, md = write_report(report, run.path / rf.EVAL)
    return report, js, md


def carried_blend(refit: RunDir, selection: RunDir, ds: Dataset, cfg: BlendConfig, log=print,
                  progress: bool = False, exclude_history: bool | None = None) -> BlendChoice:
    """A refit's blend: λ as `selection`, the run the refit repeats, chose it on its validation for its best
    checkpoint (under the protocol scored; default: the one it was selected with), carried over as the refit's
    epoch count is (the neighbours are then fit on the refit's training part, `evaluation.blend.fit_knn`).
    `selection` must be that run: leave-one-out, finished, on this dataset, with the refit's configuration but
    eval.refit_epochs (and the blend's settings), and refit_epochs its best epoch + 1."""
    where = portable_path(selection.path)
    if refit.summary() is None:  # an interrupted refit is not the network the carried epoch count and λ belong to
        raise PinnerformerError(f"{portable_path(refit.path)} has not finished training (no summary.json): resume it "
                                "to the end before blending it")
    if selection.protocol != "leave-one-out" or selection.config.eval.refit_epochs is not None:
        raise PinnerformerError(f"--blend-from {where}: the run a refit repeats is a leave-one-out run that is not a "
                                "refit itself (its λ is chosen on validation targets it did not train on)")
    summary = selection.summary()
    if summary is None:
        raise PinnerformerError(f"--blend-from {where} has not finished training (no summary.json): its best "
                                "checkpoint, and so its λ, may still change")
    for run in (selection, refit):
        fp = run.description.dataset.fingerprint
        if fp != ds.manifest.fingerprint:
            raise PinnerformerError(f"--blend-from: {portable_path(run.path)} was trained on dataset {fp}, not on "
                                    f"{ds.path} ({ds.manifest.fingerprint}): the refit and the run it repeats must "
                                    "have seen exactly this dataset")
    ours = refit.config.model_dump(exclude={"blend"})
    ours["eval"]["refit_epochs"] = None
    # what a resume may change without changing the run (the machine, the patience) may differ; the schedule may not
    free = RunDir.RESUME_MAY_CHANGE - {"optim.max_epochs"}
    theirs = selection.config.model_dump(exclude={"blend"})
    differ = [f"{k} {a!r} (the refit: {b!r})" for k, a, b in config_diffs(theirs, ours) if k not in free]
    if differ:
        raise PinnerformerError(f"--blend-from {where}: not the run {portable_path(refit.path)} repeats; their "
                                f"configurations differ: {'; '.join(differ)}")
    if refit.config.eval.refit_epochs != summary.best_epoch + 1:
        raise PinnerformerError(f"--blend-from {where} chose epoch {summary.best_epoch} on validation, but the refit "
                                f"trained for {refit.config.eval.refit_epochs} epochs, not {summary.best_epoch + 1}")
    choice = blend_choice(selection, ds, None, "best", cfg, log, progress,  # its model loaded only to choose λ
                          exclude_history)
    log(f"a refit: blended with λ = {choice.weight:g}, chosen on validation by {where} (the run it repeats)")
    return choice.model_copy(update={"chosen_by": where})


def blend_choice(run: RunDir, ds: Dataset, model, checkpoint: str, cfg: BlendConfig, log=print,
                 progress: bool = False, exclude_history: bool | None = None) -> BlendChoice:
    """λ for this checkpoint under one protocol (exclude_history; default: the one the run was selected with): as
    kept (`blend_path`) when chosen for the same checkpoint file, dataset, neighbours, grid and protocol; otherwise
    chosen on validation now (and kept). model: the checkpoint's model, or None to load it only when λ has to be
    chosen."""
    sha = run.checkpoint_sha256(checkpoint)
    exclude = run.config.eval.exclude_history if exclude_history is None else exclude_history
    path = blend_path(run, exclude)
    if path.exists():
        try:
            earlier = BlendChoice.model_validate(json.loads(path.read_text()))
        except (ValueError, OSError):
            earlier = None  # unreadable (an older layout, not a file): chosen again
        if (earlier is not None and earlier.checkpoint == sha and earlier.fingerprint == ds.manifest.fingerprint
                and earlier.knn == cfg.knn and earlier.history_excluded == exclude
                and earlier.weights == cfg.weights):
            return earlier
    log(f"choosing the item-kNN blend weight on validation (history {'removed' if exclude else 'in'})")
    model = run.load_model(ds, checkpoint) if model is None else model
    choice = choose_weight(model, ds, cfg, exclude, sha, run.config.eval.k, log=log, progress=progress)
    try:
        write_json_atomic(path, choice)
    except OSError as e:  # a run folder one may read but not write (a shared copy): λ is used, not kept
        log(f"note: the blend's choice could not be kept in {portable_path(path)} ({e.strerror or e}); it will be "
            "chosen again next time")
    log(f"blend: λ = {choice.weight:g} (validation {choice.metric} {choice.validation[f'{choice.weight:g}']:.4f})")
    return choice


def load_teacher(path: str | Path, ds: Dataset, log=print, blend: float | None = None,
                 max_len: int | None = None) -> Teacher:
    """The frozen teacher of `loss.teacher` (objectives/teacher_distillation.py): a trained leave-one-out run on
    exactly this dataset (not a descendant: its training part must be the student's), its best checkpoint, and its
    item-kNN blend with the λ it chose on validation (chosen now, as `pinnerformer evaluate` would, when the run
    has a blend and had not chosen one yet). blend: another λ (`loss.teacher_blend`; 0: the network alone).
    max_len: the student's M; the teacher reads the student's input windows, so its own M must be as long."""
    try:
        run = RunDir(Path(path))
    except PinnerformerError as e:
        raise PinnerformerError(f"loss.teacher: {e}; train the teacher first") from None
    if run.protocol != "leave-one-out" or run.config.eval.refit_epochs is not None:
        what = f"the {run.protocol} protocol" if run.protocol != "leave-one-out" else "a refit (eval.refit_epochs)"
        raise PinnerformerError(f"loss.teacher {str(path)!r} was trained under {what}: a teacher must be a "
                                "leave-one-out run trained on every timeline but its last two actions (its blend "
                                "chosen on the validation targets, which a refit trained on)")
    if run.summary() is None:  # its best checkpoint may still change: a student of it could not be repeated
        raise PinnerformerError(f"loss.teacher {str(path)!r} has not finished training (no summary.json): resume it "
                                f"to the end (`pinnerformer train -o {portable_path(run.path)} --resume ...`) first")
    fp = run.description.dataset.fingerprint
    if fp != ds.manifest.fingerprint:
        raise PinnerformerError(f"loss.teacher {str(path)!r} was trained on dataset {fp}, not on {ds.path} "
                                f"({ds.manifest.fingerprint}): a teacher must have seen exactly the student's data")
    if max_len is not None and run.config.data.max_len < max_len:
        raise PinnerformerError(f"loss.teacher {str(path)!r} reads windows of at most {run.config.data.max_len} "
                                f"actions (data.max_len), shorter than the student's {max_len}: train the teacher "
                                "with the student's data.max_len and data.max_len_cap")
    model = run.load_model(ds)
    for p in model.parameters():
        p.requires_grad_(False)
    knn, weight = None, 0.0
    if blend and not run.config.blend.item_knn:
        raise PinnerformerError(f"loss.teacher_blend {blend:g}: {portable_path(run.path)} has no item-kNN blend "
                                "(blend.item_knn) to weigh")
    if run.config.blend.item_knn:
        # the teacher's distribution masks the user's own items (objectives/teacher_distillation.py): the λ chosen
        # with them removed from the ranking
        weight = (blend_choice(run, ds, model, "best", run.config.blend, log, exclude_history=True).weight
                  if blend is None else blend)
        knn = fit_knn(ds, run.config.blend.knn) if weight else None
    source = f"{portable_path(run.path)} (checkpoint {run.checkpoint_sha256('best')[:16]})"
    log(f"teacher: {source}, item-kNN blend λ {weight:g}")
    return Teacher(model=model, knn=knn, blend_weight=weight, source=source, n_items=ds.manifest.n_items)


def teacher_for(cfg: TrainConfig, ds: Dataset, log=print) -> Teacher | None:
    """The teacher a training config distils from (`loss.teacher`), or None when it distils from none."""
    if not cfg.loss.teacher_weight:
        return None
    return load_teacher(cfg.loss.teacher, ds, log=log, blend=cfg.loss.teacher_blend,
                        max_len=fitted_max_len(cfg, ds).data.max_len)
