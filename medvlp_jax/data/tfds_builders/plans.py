"""What each TFDS builder writes, taken from the data set's own converter: a ``common.Plan``.

A converter (``data/sources/<name>.py``) reads the download layout, assigns splits and returns its tasks
through ``common.write_examples``; inside ``common.collect_plans()`` it writes nothing and hands over the
``Plan`` instead. So a TFDS data set holds exactly the examples, ids, labels, splits and images that
``launch/prepare_data.py`` writes with the same options, and no parsing is done twice.

The demo has no ``write_examples`` step (it renders its images), so ``demo_plan`` lists its reports and
splits them with the demo module's own functions, in ``demo_iu.prepare_demo``'s order.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

from medvlp_jax.data.sources import common


def converter_plan(prepare: Callable[..., Any], source_dir: str, **options: Any) -> common.Plan:
    """The Plan of ``prepare(source_dir, out_dir, **options)`` (a ``prepare_<name>`` converter), unwritten.

    Raises:
      RuntimeError: the converter did not end in exactly one ``common.write_examples`` call.
    """
    with common.collect_plans() as plans:
        prepare(source_dir, "", **options)
    if len(plans) != 1:
        raise RuntimeError(f"{prepare.__module__}.{prepare.__name__} planned {len(plans)} data sets, expected 1")
    return plans[0]


def demo_plan(archive: Optional[str] = None, *, seed: int = 0, image_size: int = 128, limit: Optional[int] = None,
              splits: Sequence[float] = (0.8, 0.1, 0.1)) -> common.Plan:
    """The demo set (IU reports + rendered radiographs) as a Plan: one task per report, ``load`` renders it.

    Same selection, split and order as ``demo_iu.prepare_demo(out_dir, seed=, image_size=, limit=)``: reports
    without findings or impression are dropped, the first ``limit`` kept (report-number order), split by
    ``demo_iu.split_reports`` and written split by split in its shuffled order.

    Args:
      archive: ``NLMCXR_reports.tgz`` (default: the installed torchxrayvision's).
      seed: split and rendering seed.
      image_size: rendered side.
      limit: keep the first ``limit`` usable reports.
      splits: train/validation/test fractions.
    """
    from medvlp_jax.data import text as text_lib
    from medvlp_jax.data.sources import demo_iu
    import numpy as np
    reports, dropped = [], {"no_findings_or_impression": 0}
    for rep in text_lib.iter_iu_reports(archive):
        if not rep.text:
            dropped["no_findings_or_impression"] += 1
            continue
        reports.append(rep)
    total = len(reports) + sum(dropped.values())
    if limit is not None:
        dropped["beyond_limit"] = max(0, len(reports) - limit)
        reports = reports[:limit]
    which, order = demo_iu.split_reports(len(reports), seed, splits)
    labels = (np.stack([demo_iu.labels_for(r.major) for r in reports]) if reports
              else np.zeros((0, len(demo_iu.CLASS_NAMES))))
    class_counts = {s: {c: int(labels[which == i, j].sum()) for j, c in enumerate(demo_iu.CLASS_NAMES)}
                    for i, s in enumerate(demo_iu.SPLITS)}
    tasks = [common.Task(split, f"IU report {reports[k].report_id}", reports[k])
             for i, split in enumerate(demo_iu.SPLITS) for k in order if which[k] == i]
    extra_info = {
        "image_size": image_size, "channels": 1, "source": demo_iu.SOURCE, "seed": seed,
        "report_license": demo_iu.REPORT_LICENSE, "extra_finding_names": list(demo_iu.EXTRA_FINDINGS),
        "dropped": dropped, "class_counts": class_counts,
    }
    return common.Plan(
        name=demo_iu.NAME, class_names=tuple(demo_iu.CLASS_NAMES), splits=tuple(demo_iu.SPLITS), tasks=tasks,
        load=functools.partial(demo_iu.make_example, seed=seed, image_size=image_size), limit=None,
        skip_bad=False, num_workers=0, dropped=dict(dropped), counts={"total_reports": total},
        extra_info=extra_info)
