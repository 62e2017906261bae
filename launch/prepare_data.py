"""Turn a data set into medvlp_jax TFRecord shards (schema: medvlp_jax/data/schema.py).

  python launch/prepare_data.py demo --out=data/demo_iu                     # built-in demo (IU reports)
  python launch/prepare_data.py mimic_cxr --source=/data/mimic-cxr-jpg/2.0.0 --out=data/mimic_cxr
  python launch/prepare_data.py chexpert --source=/data/CheXpert-v1.0-small --out=data/chexpert
  python launch/prepare_data.py rsna --source=/data/rsna-pneumonia --out=data/rsna
  python launch/prepare_data.py siim --source=/data/siim-acr --out=data/siim
  python launch/prepare_data.py covidx --source=/data/covidx --out=data/covidx
  python launch/prepare_data.py ms_cxr --source=/data/ms-cxr --images=/data/mimic-cxr-jpg/2.0.0 --out=data/ms_cxr
  python launch/prepare_data.py object_cxr --source=/data/object-CXR --out=data/object_cxr
  python launch/prepare_data.py synthetic --out=/tmp/syn                    # tiny, for smoke tests
  python launch/prepare_data.py blobs --out=data/blobs                      # localization sanity world

Each converter reads the official download layout (see README "Data") and prints counts and the reasons
for every dropped record.

--format=tfds builds the same examples with the TensorFlow Datasets builders (medvlp_jax/data/tfds_builders):
--out is then a TFDS data directory, the data set lands in <out>/medvlp_<name>/<config>/<version> (printed as
"root": point config.data.root there) and tfds.load("medvlp_<name>", data_dir=<out>) reads it too:

  python launch/prepare_data.py demo --format=tfds --out=data/tfds
  python launch/prepare_data.py chexpert --format=tfds --source=/data/CheXpert-v1.0-small --out=data/tfds
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONVERTERS = {   # name -> (module, function); imported lazily so one broken reader never blocks another
    "mimic_cxr": ("medvlp_jax.data.sources.mimic_cxr", "prepare_mimic_cxr"),
    "chexpert": ("medvlp_jax.data.sources.chexpert", "prepare_chexpert"),
    "rsna": ("medvlp_jax.data.sources.rsna", "prepare_rsna"),
    "siim": ("medvlp_jax.data.sources.siim", "prepare_siim"),
    "covidx": ("medvlp_jax.data.sources.covidx", "prepare_covidx"),
    "ms_cxr": ("medvlp_jax.data.sources.ms_cxr", "prepare_ms_cxr"),
    "object_cxr": ("medvlp_jax.data.sources.object_cxr", "prepare_object_cxr"),
}


def main(argv=None):
    from medvlp_jax.app import ArgumentParser
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)
    demo = sub.add_parser("demo", help="IU chest X-ray reports + rendered radiographs (built-in)")
    demo.add_argument("--out", default="data/demo_iu")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--image_size", type=int, default=128)
    demo.add_argument("--num_shards", type=int, default=4)
    demo.add_argument("--vocab_size", type=int, default=3000)
    demo.add_argument("--limit", type=int, default=None)
    _add_format(demo)
    syn = sub.add_parser("synthetic", help="tiny synthetic pairs for smoke tests")
    syn.add_argument("--out", required=True)
    syn.add_argument("--num_train", type=int, default=64)
    syn.add_argument("--num_test", type=int, default=32)
    blobs = sub.add_parser("blobs", help="bright blobs named by zone: a world where localization is unambiguous")
    blobs.add_argument("--out", required=True)
    blobs.add_argument("--num_train", type=int, default=2048)
    blobs.add_argument("--num_test", type=int, default=256)
    blobs.add_argument("--image_size", type=int, default=64)
    blobs.add_argument("--seed", type=int, default=0)
    for name in CONVERTERS:
        p = sub.add_parser(name, help=f"{name} from its official download layout")
        p.add_argument("--source", required=True, help="root of the downloaded data set")
        p.add_argument("--out", required=True)
        p.add_argument("--image_size", type=int, default=256)
        p.add_argument("--num_shards", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--skip_bad", action="store_true", help="count and skip unreadable images")
        p.add_argument("--limit", type=int, default=None)
        if name == "ms_cxr":
            p.add_argument("--images", required=True, help="MIMIC-CXR-JPG root the MS-CXR paths point into")
        if name == "mimic_cxr":
            p.add_argument("--reports", default=None, help="directory of mimic-cxr-reports (default: --source)")
        _add_format(p)
    args = parser.parse_args(argv)
    from medvlp_jax import app
    # Bad input (a missing or malformed source file, an unwritable --out) ends with one line and exit 2.
    app.run_main(lambda: _prepare(args), jax_launcher=False, input_errors=(ValueError,))


def _check_source(args) -> None:
    if not os.path.isdir(args.source):
        raise FileNotFoundError(f"--source={args.source} is not a directory; pass the root of the {args.dataset} "
                                f"download (see README, Data)")


def _prepare(args) -> None:
    from medvlp_jax.config_lib import check_output_dir
    if getattr(args, "source", None) is not None:
        _check_source(args)
    check_output_dir(args.out, "--out")
    if getattr(args, "format", "tfrecord") == "tfds":
        summary = _prepare_tfds(args)
        print(json.dumps(summary, indent=1, default=str))
        return

    if args.dataset == "demo":
        from medvlp_jax.data import prepare
        summary = prepare.prepare_demo(args.out, seed=args.seed, image_size=args.image_size,
                                       num_shards=args.num_shards, vocab_size=args.vocab_size, limit=args.limit)
    elif args.dataset == "blobs":
        from medvlp_jax.data.sources import blobs as blobs_lib
        summary = blobs_lib.prepare_blobs(args.out, num_train=args.num_train, num_test=args.num_test,
                                          image_size=args.image_size, seed=args.seed)
    elif args.dataset == "synthetic":
        from medvlp_jax.data.sources import synthetic
        summary = synthetic.prepare_synthetic(args.out, num_train=args.num_train, num_test=args.num_test)
    else:
        import importlib
        module, fn = CONVERTERS[args.dataset]
        kwargs = dict(image_size=args.image_size, num_shards=args.num_shards, seed=args.seed,
                      skip_bad=args.skip_bad, limit=args.limit)
        if args.dataset == "ms_cxr":
            kwargs["images_dir"] = args.images
        if args.dataset == "mimic_cxr" and args.reports:
            kwargs["reports_dir"] = args.reports
        summary = getattr(importlib.import_module(module), fn)(args.source, args.out, **kwargs)
    print(json.dumps(summary, indent=1, default=str))


def _add_format(parser) -> None:
    parser.add_argument("--format", choices=("tfrecord", "tfds"), default="tfrecord",
                        help="tfrecord: shards + dataset_info.json in --out; tfds: the TFDS builder, --out is its "
                             "data_dir (the data set goes to <out>/medvlp_<name>/<config>/<version>)")


def _prepare_tfds(args) -> dict:
    """The data set built by its TFDS builder (same examples as the converter); the demo also gets its tokenizer."""
    from medvlp_jax.data import tfds_builders
    if args.dataset == "demo":
        summary = tfds_builders.prepare("medvlp_demo_iu", args.out, num_shards=args.num_shards, seed=args.seed,
                                        image_size=args.image_size, limit=args.limit)
        from medvlp_jax.data import prepare
        summary["tokenizer"] = prepare.train_tokenizer(summary["root"], vocab_size=args.vocab_size)
        return summary
    options = dict(image_size=args.image_size, seed=args.seed, skip_bad=args.skip_bad, limit=args.limit)
    if args.dataset == "ms_cxr":
        options["images_dir"] = args.images
    if args.dataset == "mimic_cxr" and args.reports:
        options["reports_dir"] = args.reports
    return tfds_builders.prepare(f"medvlp_{args.dataset}", args.out, manual_dir=args.source,
                                 num_shards=args.num_shards, **options)


if __name__ == "__main__":
    main()
