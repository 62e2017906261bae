"""Import other methods' released PyTorch checkpoints as pretraining workdirs that our evaluators read.

    from medvlp_jax import released
    result = released.import_checkpoint("mgca", "mgca_vit_base.ckpt", released.ImportOptions(
        tokenizer_dir="checkpoints/Bio_ClinicalBERT", data_root="data/mimic_cxr"))
    print(result.report.text())
    released.write_workdir("runs/mgca_released", result.config, result.variables, result.method_params,
                           result.report)
    # then: python launch/evaluate.py --config=configs/eval/suite.py --checkpoint=runs/mgca_released

Formats (one module each; docs/checkpoint_import.md):
  mgca    HKU-MedAI/MGCA Lightning ``.ckpt``, ViT-B/16 or ResNet-50 image encoder (found from the keys).
  gloria  marshuang80/gloria Lightning ``.ckpt``, ResNet-50.

Modules: ``reader`` (restricted unpickling, torch optional), ``namemap`` (the report, head maps, shape checks),
``towers`` (ViT / ResNet / BERT sections), ``configs`` (the workdir's config), ``workdir`` (writing it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from medvlp_jax.released import gloria, mgca
from medvlp_jax.released.configs import ImportOptions, check_tokenizer
from medvlp_jax.released.namemap import CheckpointImportError, ReleasedImportReport
from medvlp_jax.released.reader import LoadedCheckpoint, TorchRequired, read_checkpoint
from medvlp_jax.released.workdir import check_shapes, write_workdir

FORMATS: dict[str, Callable[[LoadedCheckpoint, ImportOptions], tuple]] = {
    "mgca": mgca.convert,
    "gloria": gloria.convert,
}

__all__ = ["FORMATS", "CheckpointImportError", "ImportOptions", "ImportResult", "LoadedCheckpoint",
           "ReleasedImportReport", "TorchRequired", "import_checkpoint", "read_checkpoint", "write_workdir"]


@dataclasses.dataclass
class ImportResult:
    """A converted checkpoint, ready for ``write_workdir``.

    Attributes:
      config: the full pretraining config (architecture, quirks, method, data paths).
      variables: {"params": DualEncoder params, "batch_stats": BatchNorm running statistics} (numpy).
      method_params: the objective's parameters (MGCA: {"prototypes": [K, d]}; GLoRIA: {}).
      report: every key's fate and the shape checks.
    """
    config: Any
    variables: dict
    method_params: dict
    report: ReleasedImportReport


def import_checkpoint(fmt: str, path: str, options: ImportOptions = ImportOptions(), *,
                      check_tokenizer_dir: bool = True) -> ImportResult:
    """Reads, converts and shape-checks a released checkpoint.

    Args:
      fmt: a key of ``FORMATS``.
      path: the checkpoint file.
      options: tokenizer / data paths, head counts, image encoder, text length.
      check_tokenizer_dir: check that ``options.tokenizer_dir`` exists and fits the vocabulary.

    Returns:
      ImportResult; ``result.report.ok`` tells whether every key was accounted for and every shape fits
      (``write_workdir`` refuses otherwise).

    Raises:
      TorchRequired: torch is not installed (one line).
      CheckpointImportError: unknown format, unreadable file, wrong format, unsupported architecture (one line).
    """
    if fmt not in FORMATS:
        raise CheckpointImportError(f"unknown checkpoint format {fmt!r}; known: {sorted(FORMATS)}")
    ckpt = read_checkpoint(path)
    config, variables, method_params, report = FORMATS[fmt](ckpt, options)
    report.lightning = dict(ckpt.meta)
    if ckpt.stand_ins:
        report.notes.append(f"unpickled with inert stand-ins for {len(ckpt.stand_ins)} non-tensor globals "
                            f"({', '.join(ckpt.stand_ins)}); their contents are not used")
    if check_tokenizer_dir:
        check_tokenizer(options.tokenizer_dir, int(config.model.text.vocab_size))
    check_shapes(config, variables, method_params, report)
    return ImportResult(config=config, variables=variables, method_params=method_params, report=report)
