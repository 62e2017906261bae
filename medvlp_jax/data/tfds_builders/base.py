"""The TFDS builder every medvlp_jax data set shares: a converter's Plan, written as TFDS shards.

A concrete builder (``builders.py``) names its data set, its classes, the manual-download layout, and how
to get its ``common.Plan`` from the manual directory; this class does the rest:

* ``_info``: features mirroring our schema (``features.py``) and a ``metadata.json`` holding what our
  ``dataset_info.json`` holds (``name``, ``schema_version``, ``class_names``, the converter's extra info,
  dropped and skipped counts), which ``info.read_tfds_info`` turns back into our info dict;
* ``_split_generators``: one generator per non-empty split of the plan;
* ``_generate_examples``: loads each task with the converter's ``load`` (worker processes if asked), skips
  or raises on unreadable images exactly as ``common.write_examples`` does, and numbers the written
  examples of a split 0..n-1 (the schema's ``index``; TFDS shuffles records across shards, the index
  stays the example's identity).

Options (image size, seed, limit, ...) are the converter's keyword arguments, carried by ``MedvlpConfig``;
``make_config`` names a non-default set so that its data lands in its own directory. How many processes
load images (``num_workers``) changes no byte of the data, so it is a constructor argument instead:
``tfds.builder("medvlp_mimic_cxr", data_dir=..., num_workers=8)``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Optional

import tensorflow_datasets as tfds

from medvlp_jax.data import images, schema
from medvlp_jax.data.sources import common
from medvlp_jax.data.tfds_builders import features as features_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class MedvlpConfig(tfds.core.BuilderConfig):
    """A builder config: ``options`` are keyword arguments of the data set's converter (``image_size``, ...)."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def config_name(options: dict[str, Any], defaults: dict[str, Any]) -> str:
    """"default", or the options that differ from ``defaults`` as "key=value" joined by "-" (TFDS-safe)."""
    diff = {k: v for k, v in sorted(options.items()) if defaults.get(k) != v}
    if not diff:
        return "default"
    parts = []
    for k, v in diff.items():
        text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        parts.append(f"{k}{''.join(c if c.isalnum() or c in '._' else '_' for c in text)}")
    return "-".join(parts)


def _jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars and tuples turned into JSON values (TFDS writes metadata with json.dump)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


class SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the medvlp_jax builders (not registered itself). See the module docstring.

    Subclasses set ``name``, ``SOURCE`` (our data set name, e.g. "chexpert"), ``BUILDER_CONFIGS`` and
    ``DEFAULT_OPTIONS`` and implement ``class_names()`` and ``make_plan(manual_dir)``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "medvlp_jax schema version 1."}
    SOURCE: str = ""
    DESCRIPTION: str = ""
    DEFAULT_OPTIONS: dict[str, Any] = {}
    NEEDS_MANUAL_DIR = True

    def __init__(self, *, num_workers: int = 0, **kwargs: Any):
        """TFDS's builder arguments (``data_dir``, ``config``, ...) plus ``num_workers``: image-loading
        processes (0: this one)."""
        super().__init__(**kwargs)
        self._num_workers = int(num_workers)
        self._plan: Optional[common.Plan] = None
        self._plan_key: Optional[str] = None
        self._skipped: list[str] = []

    # -- what a subclass provides --------------------------------------------------------------------

    def class_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def make_plan(self, manual_dir: Optional[str]) -> common.Plan:
        raise NotImplementedError

    # -- options and plan ----------------------------------------------------------------------------

    @property
    def options(self) -> dict[str, Any]:
        """The converter's keyword arguments: the defaults, updated by the config's options."""
        config = self.builder_config
        return {**self.DEFAULT_OPTIONS, **(config.options if isinstance(config, MedvlpConfig) else {})}

    @classmethod
    def make_config(cls, **options: Any) -> MedvlpConfig:
        """The config for these converter options (a predefined one when they match it)."""
        unknown = set(options) - set(cls.DEFAULT_OPTIONS)
        if unknown:
            raise ValueError(f"{cls.name}: unknown option(s) {sorted(unknown)}; it takes {sorted(cls.DEFAULT_OPTIONS)}")
        for config in cls.BUILDER_CONFIGS:
            full = {**cls.DEFAULT_OPTIONS, **config.options}
            if all(full.get(k) == v for k, v in options.items()):
                return config
        full = {**cls.DEFAULT_OPTIONS, **options}
        return MedvlpConfig(name=config_name(full, cls.DEFAULT_OPTIONS), options=full,
                            description=f"{cls.SOURCE} with {options}")

    def plan(self, manual_dir: Optional[str]) -> common.Plan:
        """The converter's plan for ``manual_dir`` (computed once per builder and directory)."""
        key = str(manual_dir)
        if self._plan is None or self._plan_key != key:
            self._plan, self._plan_key = self.make_plan(manual_dir), key
        return self._plan

    def split_sizes(self, manual_dir: Optional[str]) -> dict[str, int]:
        """Examples per split before any unreadable image is skipped (``limit`` applied)."""
        plan = self.plan(manual_dir)
        sizes = {s: 0 for s in plan.splits}
        for t in common.limit_tasks(plan.tasks, plan.limit):
            sizes[t.split] += 1
        return sizes

    # -- TFDS ----------------------------------------------------------------------------------------

    def _info(self) -> tfds.core.DatasetInfo:
        names = list(self.class_names())
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=features_lib.features(len(names), bit_depth=int(self.options.get("bit_depth", 8))),
            metadata=tfds.core.MetadataDict(name=self.SOURCE, schema_version=schema.SCHEMA_VERSION,
                                            class_names=names),
        )

    def _manual_dir(self, dl_manager) -> Optional[str]:
        if not self.NEEDS_MANUAL_DIR:
            return None
        return str(dl_manager.manual_dir)          # TFDS raises with MANUAL_DOWNLOAD_INSTRUCTIONS if absent

    def _split_generators(self, dl_manager):
        manual_dir = self._manual_dir(dl_manager)
        plan = self.plan(manual_dir)
        if tuple(plan.class_names) != tuple(self.class_names()):
            raise ValueError(f"{self.name}: the converter's classes {plan.class_names} differ from the builder's "
                             f"{self.class_names()}")
        self._skipped = []
        self.info.metadata.update(_jsonable({**plan.extra_info, "name": plan.name, "counts": plan.counts}))
        sizes = self.split_sizes(manual_dir)
        empty = [s for s, n in sizes.items() if n == 0]
        if empty:
            log.info("%s: splits %s have no examples and are not written", self.name, empty)
        return {s: self._generate_examples(plan, s) for s, n in sizes.items() if n > 0}

    def _generate_examples(self, plan: common.Plan, split: str):
        tasks = [t for t in common.limit_tasks(plan.tasks, plan.limit) if t.split == split]
        num_classes = len(plan.class_names)
        written = 0
        for task, (status, value) in zip(tasks, common.load_tasks(plan.load, tasks, self._num_workers)):
            if status == "bad":
                path, reason = value
                if not plan.skip_bad:
                    raise images.ImageReadError(path, f"{reason} (pass the option skip_bad=True to skip unreadable "
                                                      "images; they are listed in the metadata's skipped_files)")
                log.warning("skipping unreadable image %s: %s", path, reason)
                self._skipped.append(path)
                self.info.metadata["skipped_files"] = list(self._skipped)
                dropped = dict(plan.dropped)
                dropped["bad_image"] = len(self._skipped)
                self.info.metadata["dropped"] = dropped
                continue
            yield written, features_lib.tfds_example(value, written, num_classes)
            written += 1
        self.info.metadata.setdefault("dropped", _jsonable(plan.dropped))
        self.info.metadata.setdefault("skipped_files", [])
