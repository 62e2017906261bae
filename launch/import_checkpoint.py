"""Import a released PyTorch checkpoint (MGCA, GLoRIA) as a workdir that launch/evaluate.py reads like one of ours.

  python launch/import_checkpoint.py --format=mgca --source=/ckpts/mgca/vit_base.ckpt --out=runs/mgca_vit_released \
      --tokenizer_dir=checkpoints/Bio_ClinicalBERT --data_root=data/mimic_cxr
  python launch/import_checkpoint.py --format=gloria --source=/ckpts/gloria/chexpert_resnet50.ckpt \
      --out=runs/gloria_released --tokenizer_dir=checkpoints/Bio_ClinicalBERT --data_root=data/mimic_cxr
  python launch/evaluate.py --config=configs/eval/suite.py --checkpoint=runs/mgca_vit_released

The workdir gets config.json (the method's paper config with the released architecture and its quirks), a
step-0 checkpoint (both towers, all projection heads, BatchNorm running statistics, MGCA's prototypes) and
import_report.json (every key: loaded / ignored with the reason / missing / unexpected, and the shape checks).
The import is refused, with one ``error:`` line, when any key is missing or unexpected or any shape disagrees.
The file is read with torch.load(weights_only=True) (torch must be installed; see docs/checkpoint_import.md).
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")


def resolve_source(source: str) -> str:
    """The checkpoint file: ``source`` itself, or the single checkpoint file in the directory ``source``."""
    from medvlp_jax.released import CheckpointImportError
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        found = sorted(f for f in os.listdir(source) if f.endswith(CHECKPOINT_SUFFIXES))
        if len(found) == 1:
            return os.path.join(source, found[0])
        raise CheckpointImportError(f"--source directory {source} holds {len(found)} checkpoint files "
                                    f"{found[:6]}: pass the file itself")
    raise CheckpointImportError(f"--source {source} does not exist")


def main(argv=None) -> None:
    from medvlp_jax import released
    from medvlp_jax.app import ArgumentParser
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=sorted(released.FORMATS),
                        help="whose checkpoint: mgca (ViT-B/16 or ResNet-50) or gloria (ResNet-50)")
    parser.add_argument("--source", required=True, help="the released .ckpt file (or a directory holding only it)")
    parser.add_argument("--out", required=True, help="new workdir to write")
    parser.add_argument("--tokenizer_dir", default=released.ImportOptions.tokenizer_dir,
                        help="local tokenizer of the released model (Bio_ClinicalBERT: vocab.txt); not in the file")
    parser.add_argument("--data_root", default=released.ImportOptions.data_root,
                        help="prepared data the workdir's config points at (launch/prepare_data.py)")
    parser.add_argument("--image_encoder", default="auto", choices=("auto", "vit", "resnet50"),
                        help="MGCA's image encoder; auto reads it from the keys")
    parser.add_argument("--image_heads", type=int, default=None, help="ViT heads (default: width / 64)")
    parser.add_argument("--text_heads", type=int, default=None, help="BERT heads (default: width / 64)")
    parser.add_argument("--max_text_len", type=int, default=None,
                        help="tokens per report (default: 112 MGCA, 97 GLoRIA)")
    args = parser.parse_args(argv)

    options = released.ImportOptions(tokenizer_dir=args.tokenizer_dir, data_root=args.data_root,
                                     image_heads=args.image_heads, text_heads=args.text_heads,
                                     image_encoder=args.image_encoder, max_text_len=args.max_text_len)
    try:
        result = released.import_checkpoint(args.format, resolve_source(args.source), options)
        print(result.report.text())
        released.write_workdir(args.out, result.config, result.variables, result.method_params, result.report)
    except released.CheckpointImportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out} (config.json, checkpoints/0, import_report.json); evaluate it with:\n"
          f"  python launch/evaluate.py --config=configs/eval/suite.py --checkpoint={args.out}")


if __name__ == "__main__":
    main()
