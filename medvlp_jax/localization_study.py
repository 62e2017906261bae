"""Does each method's local branch learn where findings are? Seeds x methods in the blob world (issue 10).

The blob world (``data/sources/blobs.py``) puts bright findings at random places and names them in the report,
so a word-to-patch map can only point into a finding by reading the image and the phrase. This module trains
each method there (its ``configs/<method>.py:test`` model: a 1-layer ViT with an 8x8 grid of 8-px patches
at 64 px, batch 32, AdamW 1e-3), scores phrase grounding on the world's test split (the grounding evaluator:
own maps and phrase-patch cosine maps, the pointing game's chance, signed contrast and map specificity), and
tabulates mean and sample SD over seeds:

    python launch/localization_study.py --out=runs/blobs_study --steps=600 --seeds=0,1,2 \\
        --methods=convirt,gloria,mgca,mgca:local_negatives=batch,sista,aga,plan

A method spec is ``name[:field=value[+field=value]]`` (fields of ``config.method``). Each run is
``<out>/<label>_s<seed>`` (a pretraining workdir: ``launch/evaluate.py`` works on it); a run whose
``eval/grounding.json`` exists is not trained again, so a killed study resumes. ``grounding_curve`` scores a run
at initialisation and every K steps of its training (``--every=K``): when maps gain or lose the findings.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Any, Optional, Sequence

import ml_collections

# The world of tests/test_localization.py: 1,024 training and 128 test images of 64 px.
WORLD = dict(num_train=1024, num_test=128, image_size=64, num_shards=2)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One setting of the study: a method and the ``config.method`` fields that differ from its config."""
    method: str
    fields: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """'mgca' or 'mgca_local_negatives=batch' (a directory name)."""
        return "_".join([self.method, *(f"{k}={v}" for k, v in self.fields)])


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def parse_spec(spec: str) -> MethodSpec:
    """'mgca:local_negatives=batch+local_chunk=8' -> MethodSpec('mgca', (('local_negatives', 'batch'), ...))."""
    method, _, rest = spec.partition(":")
    fields = []
    for part in filter(None, rest.split("+")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"method spec {spec!r}: expected name[:field=value[+field=value]], got {part!r}")
        fields.append((key, _value(value)))
    return MethodSpec(method, tuple(fields))


def curve_steps(steps: int, every: int) -> list[int]:
    """The steps a grounding curve scores: 0 (initialisation), every ``every``-th step, and ``steps``."""
    return [0, *range(every, steps, every), steps]


def study_config(config: ml_collections.ConfigDict, root: str, *, steps: int, seed: int = 0,
                 method_fields: Sequence[tuple[str, Any]] = (), every: int = 0) -> ml_collections.ConfigDict:
    """A method's ``test`` config trained on the blob world prepared in ``root`` (see module docstring); with
    ``every`` > 0 it keeps a checkpoint every ``every`` steps for ``grounding_curve``.

    Raises:
        ValueError: a method field that the method's settings do not have (checked by building the objective),
            or ``every`` outside [0, steps].
    """
    if not 0 <= every <= steps:
        raise ValueError(f"every={every}: must be between 0 (no curve) and the number of steps ({steps})")
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = seed
    c.data.root, c.data.name = root, "blobs"
    c.data.tokenizer_dir = os.path.join(root, "tokenizer")
    c.data.max_text_len = 32
    c.data.resize = c.data.crop = c.model.image.image_size = WORLD["image_size"]
    c.model.text.vocab_size = 128
    c.train.batch_size, c.train.total_steps = 32, steps
    c.train.log_every_steps, c.train.ckpt_every_steps, c.train.eval_at_end = 50, every or steps, False
    if every:
        c.train.keep_ckpts = len(curve_steps(steps, every))
    c.optim.lr = 1e-3
    c.method.update(dict(method_fields))
    from medvlp_jax import methods
    methods.make_objective(c.method, steps_per_epoch=WORLD["num_train"] // c.train.batch_size)   # validates
    return c


def prepare_world(root: str) -> None:
    """Writes the blob world to ``root`` unless it is there (the same bytes every time)."""
    if not os.path.exists(os.path.join(root, "dataset_info.json")):
        from medvlp_jax.data.sources import blobs
        blobs.prepare_blobs(root, **WORLD)


def grounding_eval_config(num_heatmaps: int = 4) -> ml_collections.ConfigDict:
    """The grounding evaluator on the run's own data (the blob world), test split."""
    from medvlp_jax import evaluators
    c = ml_collections.ConfigDict()
    c.evaluators = ["grounding"]
    c.grounding = ml_collections.ConfigDict(dict(
        data=evaluators.default_data(), batch_size=0, seed=0, map="auto", also_cosine=True, also_oracle=True,
        grid_alignment="encoder", num_heatmaps=num_heatmaps, heatmaps_dir="", limit_examples=0))
    return c


def run_setting(config: ml_collections.ConfigDict, workdir: str, *, untrained: bool = True,
                every: int = 0) -> None:
    """Pretrains ``config`` in ``workdir`` (unless its grounding result exists) and evaluates grounding, also of
    the same architecture at initialisation with ``untrained``, and over training with ``every`` (the config
    must come from ``study_config(..., every=every)``)."""
    from medvlp_jax import evaluators
    from medvlp_jax.train import loop
    if not os.path.exists(os.path.join(workdir, "eval", "grounding.json")):
        loop.run(config, workdir)
        evaluators.run_suite(grounding_eval_config(), workdir)
    if untrained and not os.path.exists(os.path.join(workdir, "eval", "grounding_untrained.json")):
        evaluators.run_suite(grounding_eval_config(num_heatmaps=0), workdir, untrained=True)
    if every:
        grounding_curve(workdir, config.train.total_steps, every)


CURVE_FILE = "grounding_curve.jsonl"


def read_curve(workdir: str) -> list[dict[str, Any]]:
    """The rows of ``<workdir>/eval/grounding_curve.jsonl`` ({"step": s, grounding results...}), by step."""
    path = os.path.join(workdir, "eval", CURVE_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sorted(rows, key=lambda r: r["step"])


def grounding_curve(workdir: str, steps: int, every: int) -> list[dict[str, Any]]:
    """Grounding of the run's maps at ``curve_steps(steps, every)`` (step 0: the encoders at initialisation),
    appended to ``eval/grounding_curve.jsonl``; steps already there are not scored again (a killed study
    resumes), and the first and last are taken from ``eval/grounding_untrained.json`` / ``grounding.json`` when
    those exist (the same weights and protocol). When do a method's maps gain or lose the findings?

    Raises:
        CheckpointError: a step without its checkpoint (the run was trained without ``every``).
    """
    import jax
    from medvlp_jax import errors
    from medvlp_jax.evaluators import common, grounding
    rows = read_curve(workdir)
    done = {r["step"] for r in rows}
    cfg = grounding_eval_config(num_heatmaps=0).grounding
    for step in curve_steps(steps, every):
        if step in done:
            continue
        res = None
        if step in (0, steps):      # the same weights and protocol as the suite's untrained / final evaluation
            res = read_results(workdir, untrained=(step == 0))
        if res is None:
            try:
                run = common.load_run(workdir, untrained=True) if step == 0 else common.load_run(workdir, step=step)
            except errors.CheckpointError as e:
                raise errors.CheckpointError(f"{e}. A grounding curve needs a checkpoint every {every} steps: this "
                                             f"run was trained without them; train it again in a new --out") from None
            res = grounding.evaluate(run, cfg)
        row = {"step": step, **{k: float(v) for k, v in res.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "eval", CURVE_FILE), "a") as f:
                f.write(json.dumps(row) + "\n")
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def read_results(workdir: str, untrained: bool = False) -> Optional[dict[str, Any]]:
    """``<workdir>/eval/grounding[_untrained].json`` or None."""
    path = os.path.join(workdir, "eval", "grounding_untrained.json" if untrained else "grounding.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# (column title, result key, format)
COLUMNS = (
    ("own PG", "pointing_game", "{:.3f}"),
    ("own CNR", "cnr", "{:.2f}"),
    ("own mIoU", "miou", "{:.3f}"),
    ("own signed contrast", "signed_contrast", "{:+.2f}"),
    ("own phrase specificity", "phrase_specificity", "{:.2f}"),
    ("own PG, several-phrase images", "pointing_game_multi", "{:.3f}"),
    ("same maps on the other phrases' boxes", "pointing_game_multi_other", "{:.3f}"),
    ("cosine PG", "cosine/pointing_game", "{:.3f}"),
    ("cosine CNR", "cosine/cnr", "{:.2f}"),
    ("cosine signed contrast", "cosine/signed_contrast", "{:+.2f}"),
    ("oracle PG", "oracle/pointing_game", "{:.3f}"),
)


def summarize(results: Sequence[dict[str, Any]], columns=COLUMNS) -> dict[str, Any]:
    """{key: (mean, sample SD or 0.0, n)} of every column's key over several seeds' results of one setting;
    'chance' the mean chance."""
    out: dict[str, Any] = {}
    for _, key, _ in columns:
        values = [float(r[key]) for r in results if r.get(key) is not None]
        if values:
            out[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
    chance = [float(r["pointing_game_chance"]) for r in results if "pointing_game_chance" in r]
    out["chance"] = statistics.mean(chance) if chance else None
    return out


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    mean, sd, n = value
    return fmt.format(mean) if n == 1 else f"{fmt.format(mean)} ± {sd:.3f}"


def markdown_table(rows: Sequence[tuple[str, int, Sequence[dict[str, Any]]]]) -> str:
    """One row per (label, steps, results of its seeds): mean ± sample SD of every COLUMNS entry."""
    head = ["setting", "steps", "seeds", *(t for t, _, _ in COLUMNS), "PG chance"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, steps, results in rows:
        s = summarize(results)
        chance = "-" if s["chance"] is None else f"{s['chance']:.3f}"
        lines.append(f"| {label} | {steps} | {len(results)} | "
                     + " | ".join(_cell(s.get(key), fmt) for _, key, fmt in COLUMNS) + f" | {chance} |")
    return "\n".join(lines)


CURVE_COLUMNS = tuple(c for c in COLUMNS if c[1] in (
    "pointing_game", "signed_contrast", "phrase_specificity", "pointing_game_multi", "pointing_game_multi_other",
    "cosine/pointing_game"))


def curve_table(label: str, curves: Sequence[Sequence[dict[str, Any]]]) -> str:
    """Grounding over training of one setting: one row per step, mean ± sample SD over the seeds' curves."""
    head = ["setting", "step", "seeds", *(t for t, _, _ in CURVE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    by_step: dict[int, list[dict[str, Any]]] = {}
    for curve in curves:
        for row in curve:
            by_step.setdefault(int(row["step"]), []).append(row)
    for step, rows in sorted(by_step.items()):
        s = summarize(rows, CURVE_COLUMNS)
        lines.append(f"| {label} | {step} | {len(rows)} | "
                     + " | ".join(_cell(s.get(key), fmt) for _, key, fmt in CURVE_COLUMNS) + " |")
    return "\n".join(lines)


def study_rows(out: str, specs: Sequence[MethodSpec], seeds: Sequence[int], steps: int,
               untrained: bool = True) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """The table rows of a study's results in ``out`` (trained settings, then their untrained baselines)."""
    rows, baselines = [], {}
    for spec in specs:
        dirs = [os.path.join(out, f"{spec.label}_s{seed}") for seed in seeds]
        results = [r for r in (read_results(d) for d in dirs) if r is not None]
        rows.append((spec.label, steps, results))
        if untrained and spec.method not in baselines:
            baselines[spec.method] = [r for r in (read_results(d, True) for d in dirs) if r is not None]
    rows += [(f"{method} untrained", 0, results) for method, results in baselines.items()]
    return rows
