"""The ``check`` stage: validate the pool and every task file before any model work.

    python -m icons.run stages=[check]                                   # the embedded benchmark
    python -m icons.run stages=[check] data=llava_json data.path=pool.jsonl data.image_root=images

Every record is read and checked (:mod:`icons.data.check`); a summary is logged and written to
``<run_dir>/check/`` (``summary.json``, ``problems.jsonl``, ``truncated.jsonl`` and
``repeated_ids.jsonl``: records whose id an earlier record has, with both positions; ids are
labels, so they are listed and kept unless ``data.repeated_ids=error``). Under
``data.on_bad_record=error`` any problem stops the run with a
:class:`~icons.data.llava_json.BadInputError` whose one line names the first problem's file,
record position, id, field and what is wrong; under ``skip`` only problems that no skipping can
cure stop it (a file that cannot be read, an empty pool or validation set, colliding task names).
"""
from __future__ import annotations

import logging

from .. import tracking
from ..data.check import check_inputs, problem_kinds, summary_lines
from ..data.llava_json import BadInputError, file_signature, summary_error
from ..data.sources import data_key, data_sources, model_key
from ..io import config_hash, write_json, write_jsonl
from ..pipeline.cached import cached_stage
from ..pipeline.rundir import Run, finished, section

log = logging.getLogger(__name__)


def stage_check(run: Run) -> dict:
    cfg = run.cfg
    out = run.run_dir / "check"
    try:
        src = data_sources(cfg)
    except BadInputError as err:
        log.error("check: %s", err)
        raise
    key = config_hash({**section(cfg, "data", "tasks"), "model": model_key(cfg),
                       "files": [file_signature(p) for p in [src.pool, *src.val.values(), *src.test.values()]],
                       **data_key(cfg)})

    def compute(wrun) -> dict:
        report = check_inputs(cfg, src)
        write_jsonl(out / "problems.jsonl", report["problems"])
        write_jsonl(out / "truncated.jsonl", report["truncated"])
        write_jsonl(out / "repeated_ids.jsonl", report["repeated"])
        write_json(out / "summary.json", {"files": report["files"], "max_length": report["max_length"],
                                          "n_problems": len(report["problems"]), "n_fatal": len(report["fatal"]),
                                          "on_bad_record": cfg.data.on_bad_record})
        for line in summary_lines(report):
            log.info("check: %s", line)
        probs, fatal = report["problems"], report["fatal"]
        # the counts reach W&B whether the check passes or not
        tracking.log_summary(wrun, {"check/records": report["files"][0].get("records", 0),
                                    "check/problems": len(probs), "check/fatal": len(fatal),
                                    "check/truncated": len(report["truncated"]),
                                    "check/repeated_ids": len(report["repeated"]),
                                    **{f"check/problems/{k}": v for k, v in problem_kinds(probs).items()}})
        tracking.log_files(wrun, "check-problems", "check", [out / "summary.json", out / "problems.jsonl"])
        where = f"; all listed in {out / 'problems.jsonl'}"
        if fatal:
            raise BadInputError(summary_error(fatal, where), fatal)
        if probs and cfg.data.on_bad_record == "error":
            raise BadInputError(summary_error(probs, where + "; data.on_bad_record=skip skips bad records"), probs)
        pool = report["files"][0]
        return {"records": pool["records"], "ok": pool["ok"], "with_image": pool["with_image"],
                "text_only": pool["text_only"], "problems": len(probs), "truncated": len(report["truncated"]),
                "repeated_ids": len(report["repeated"]), "on_bad_record": cfg.data.on_bad_record}

    reused = finished(out, key) is not None
    m = cached_stage(run, "check", out, key, compute)
    if reused:
        log.info("check: passed before for these files (%s pool records, %s problems)", m["records"], m["problems"])
    return m
